"""`testbed bench links`."""
from __future__ import annotations

import typer


def command(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Benchmark: links."""
    raise typer.Exit(2)
