"""`testbed report RUN_DIR [RUN_DIR...]`: PNG plots and one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

import typer


def report(
    run_dirs: list[Path] = typer.Argument(
        ..., help="Run directories (tokens.parquet, summary.json); a sweep's folder stands for the runs inside it."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder (default: RUN_DIR/report for one run, ./report for several)."
    ),
) -> None:
    """Plots and an HTML page from run directories (several runs: policies side by side)."""
    from testbed.report import expand_run_dirs, write_report

    try:
        dirs = expand_run_dirs(run_dirs)
    except FileNotFoundError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    out_dir = out or (dirs[0] / "report" if len(dirs) == 1 else Path("report"))
    path = write_report(dirs, out_dir)
    typer.echo(str(path))
