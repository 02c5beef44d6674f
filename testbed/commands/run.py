from __future__ import annotations

import json
import time
from pathlib import Path

import typer


def run(
    scenario: str = typer.Argument(..., help="Scenario file or bundled name (default, paper, fleet-tiny, smoke)."),
    out: Path = typer.Option(None, "--out", help="Results folder (default runs/<name>-<time>)."),
    clock: str = typer.Option(None, "--clock", help="Override the clock: virtual | wall."),
    address: str = typer.Option(None, "--address", help="Join an existing Ray cluster (e.g. auto or host:6379)."),
    engine: str = typer.Option("ray", "--engine", help="ray (actors + ZeroMQ) or local (single process)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    metrics_port: int = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics here (0 = off)."),
    linger: float = typer.Option(0.0, "--linger", help="Keep serving metrics this many seconds after the end."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML/PNG report."),
    dtype: str = typer.Option(None, "--dtype", help="Override models.dtype: auto | bfloat16 | float32 | float16."),
    profile: bool = typer.Option(False, "--profile", help="Time the compute limit too and print the time breakdown."),
    no_accuracy: bool = typer.Option(False, "--no-accuracy", help="Skip executing HumanEval tests (pass@1)."),
) -> None:
    """Run a scenario end to end and write tokens.parquet, summary.json, scenario.yaml."""
    from rich.console import Console

    from testbed import results
    from testbed.runner import RunOptions, run_scenario
    from testbed.scenario import ScenarioError, expand_sweep, load_scenario, override

    err = Console(stderr=True)
    try:
        s = load_scenario(scenario)
        changes = {}
        if clock:
            changes["clock"] = clock
        if dtype:
            changes["models.dtype"] = dtype
        if changes:
            s = override(s, changes)
    except ScenarioError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    points = expand_sweep(s)
    base = out or Path("runs") / f"{s.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summaries = {}
    for point in points:
        out_dir = base if len(points) == 1 else base / point.name
        opts = RunOptions(out_dir=out_dir, engine=engine, address=address or s.address,
                          progress=True, report=not no_report,
                          metrics_port=metrics_port if metrics_port is not None else s.metrics.port, linger_s=linger,
                          profile=profile, accuracy=not no_accuracy)
        summaries[point.name] = run_scenario(point, opts)
        err.print(results.summary_table(summaries[point.name], title=f"{point.name}  ({out_dir})"))
        if profile:
            from testbed.profile import profile_table

            err.print(profile_table(summaries[point.name]))
    if len(points) > 1:
        err.print(results.comparison_table(summaries))
        if not no_report:  # the sweep's points side by side
            from testbed.report import write_report

            err.print(f"report: {write_report([base / name for name in summaries], base / 'report')}")
    if json_out:
        print(json.dumps(summaries[points[0].name] if len(points) == 1 else summaries, indent=2))
