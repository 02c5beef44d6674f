"""`testbed bench ...`: each benchmark lives in testbed/benchmarks/<name>.py and prints JSON."""

from __future__ import annotations

import typer

from testbed.benchmarks import codec, invariance, links, policies, verifier
from testbed.commands import models

app = typer.Typer(no_args_is_help=True)
app.command("codec")(codec.command)
app.command("links")(links.command)
app.command("verifier")(verifier.command)
app.command("policies")(policies.command)
app.command("invariance")(invariance.command)
app.command("models")(models.bench)  # also `testbed models bench`
