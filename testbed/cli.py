"""The `testbed` command line. Each command group lives in testbed/commands/<name>.py."""

from __future__ import annotations

import typer

from testbed.commands import (
    accuracy,
    bench,
    calibrate,
    content,
    dashboards,
    links,
    models,
    policies,
    report,
    reproduce,
    run,
    validate,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Hybrid language model emulation testbed.")
app.add_typer(models.app, name="models", help="Prepare and list model pairs.")
app.add_typer(links.app, name="links", help="Named link profiles.")
app.add_typer(bench.app, name="bench", help="Benchmarks that print ratios measured in one run.")
app.add_typer(dashboards.app, name="dashboards", help="Prometheus/Grafana for live runs.")
app.add_typer(content.app, name="content", help="Record and list content libraries (replayed without models).")
app.add_typer(reproduce.app, name="reproduce", help="Reproduce the CU-HLM / U-HLM papers (resumable).")
app.command("accuracy")(accuracy.accuracy)
app.command("policies")(policies.policies)
app.command("calibrate")(calibrate.calibrate)
app.command("report")(report.report)
app.command("run")(run.run)
app.command("validate")(validate.validate)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
