from __future__ import annotations

import json
import re
import sys
import time
import traceback
from pathlib import Path

import typer

from testbed.config.io import bundled_scenarios


def run(
    scenario: str = typer.Argument(..., help=f"Scenario file or bundled name ({', '.join(bundled_scenarios())})."),
    out: Path = typer.Option(None, "--out", help="Results folder (default runs/<name>-<time>)."),
    clock: str = typer.Option(None, "--clock", help="Override the clock: virtual | wall."),
    address: str = typer.Option(None, "--address", help="Join an existing Ray cluster (e.g. auto or host:6379)."),
    engine: str = typer.Option("ray", "--engine", help="ray (actors + ZeroMQ) or local (single process)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    metrics_port: str = typer.Option(
        None,
        "--metrics-port",
        help="Serve Prometheus metrics on this port, as "
        "metrics.port: 0 = any free port, off = none (default: the scenario's).",
    ),
    linger: float = typer.Option(0.0, "--linger", help="Keep serving metrics this many seconds after the end."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML/PNG report."),
    dtype: str = typer.Option(None, "--dtype", help="Override models.dtype: auto | bfloat16 | float32 | float16."),
    threads: str = typer.Option(
        None,
        "--threads",
        help="Override actors.threads (the content forwards' torch threads): auto (every usable core) | N.",
    ),
    profile: bool = typer.Option(False, "--profile", help="Time the compute limit too and print the time breakdown."),
    no_accuracy: bool = typer.Option(False, "--no-accuracy", help="Skip executing HumanEval tests (pass@1)."),
    debug: bool = typer.Option(False, "--debug", help="On a failure, print the full traceback too."),
) -> None:
    """Run a scenario end to end and write tokens.parquet, summary.json, scenario.yaml.

    Every check runs before anything starts or is written (testbed.preflight, each run of a sweep).
    A failure at run time prints one paragraph: what failed and where the partial results are
    (exit 1; the traceback with --debug). Ctrl-C keeps the partial results too (exit 130)."""
    from rich.console import Console

    err = Console(stderr=True)
    points, base = _checked_points(scenario, out, clock, dtype, threads, metrics_port, engine, address)
    summaries = {}
    for point in points:
        out_dir = base if len(points) == 1 else base / point.name
        opts = _options(point, out_dir, engine, address, metrics_port, linger, no_report, profile, no_accuracy)
        summaries[point.name] = _run_point(point, opts, summaries, base, debug)
        _show(err, summaries[point.name], f"{point.name}  ({out_dir})", profile)
    if len(points) > 1:
        _show_sweep(err, summaries, base, report=not no_report)
    if json_out:
        print(json.dumps(summaries[points[0].name] if len(points) == 1 else summaries, indent=2))


def _checked_points(scenario: str, out: Path | None, clock, dtype, threads, metrics_port, engine: str, address):
    """The scenario with the command line's overrides, as its sweep's points, every one through
    preflight before anything runs (a bad last run must not leave half a sweep behind); and the
    results folder. Exits 2 on a bad scenario."""
    from testbed.preflight import preflight
    from testbed.scenario import ScenarioError, expand_sweep, load_scenario, override

    try:
        s = load_scenario(scenario)
        changes = {}
        if clock:
            changes["clock"] = clock
        if dtype:
            changes["models.dtype"] = dtype
        if threads:
            changes["actors.threads"] = int(threads) if threads.strip().isdigit() else threads
        if metrics_port not in (None, "off"):  # validated as metrics.port (an int 0..65535)
            changes["metrics.port"] = metrics_port
        if changes:
            s = override(s, changes)
        points = expand_sweep(s)
        for point in points:
            preflight(
                point,
                engine=engine,
                address=address or s.address,
                source=scenario if len(points) == 1 else f"{scenario} (sweep run {point.name})",
            )
    except ScenarioError as e:
        _say(str(e))
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _say("interrupted before the run started; nothing was written")
        raise typer.Exit(130) from None
    return points, out or Path("runs") / f"{s.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _options(
    point,
    out_dir: Path,
    engine: str,
    address,
    metrics_port,
    linger: float,
    no_report: bool,
    profile: bool,
    no_accuracy: bool,
):
    from testbed.run import RunOptions

    return RunOptions(
        out_dir=out_dir,
        engine=engine,
        address=address or point.address,
        progress=True,
        report=not no_report,
        metrics_port=None if metrics_port == "off" else point.metrics.port,
        metrics_host=point.metrics.host,
        linger_s=linger,
        profile=profile,
        accuracy=not no_accuracy,
    )


def _run_point(point, opts, summaries: dict, base: Path, debug: bool) -> dict:
    """One run's summary; on Ctrl-C or a failure one paragraph (what, where the partial results are)
    and the exit code: 130 interrupted, 2 a bad scenario, 1 a failure."""
    from testbed.run import run_scenario
    from testbed.scenario import ScenarioError

    t0 = time.time()
    try:
        return run_scenario(point, opts)
    except KeyboardInterrupt:
        _say(
            f"interrupted: {point.name} stopped after {time.time() - t0:.0f} s. "
            f"{_partial(opts.out_dir, summaries, base)}"
        )
        raise typer.Exit(130) from None
    except ScenarioError as e:  # the plan's own checks (preflight passed above: only if the machine changed)
        _say(str(e))
        raise typer.Exit(2) from None
    except Exception as e:  # noqa: BLE001 - one paragraph instead of a traceback
        if debug:
            traceback.print_exc()
        _say(
            f"testbed run failed: {point.name} ({opts.engine} engine) stopped after {time.time() - t0:.0f} s: "
            f"{describe_error(e).rstrip('.')}. {_partial(opts.out_dir, summaries, base)}"
            + ("" if debug else " Run again with --debug for the full traceback.")
        )
        raise typer.Exit(1) from None


def _show(err, summary: dict, title: str, profile: bool) -> None:
    from testbed import results

    err.print(results.summary_table(summary, title=title))
    if profile:
        from testbed.profile import profile_table

        err.print(profile_table(summary))


def _show_sweep(err, summaries: dict, base: Path, report: bool) -> None:
    """The sweep's points side by side: a table, and the report."""
    from testbed import results

    err.print(results.comparison_table(summaries))
    if report:
        from testbed.report import write_report

        err.print(f"report: {write_report([base / name for name in summaries], base / 'report')}")


def _say(text: str) -> None:
    # Plain stderr, not rich: no markup eating "[...]" and no wrapping inside a paragraph.
    print(text, file=sys.stderr, flush=True)


def describe_error(e: BaseException) -> str:
    """One line for an exception: its type and message; for an actor's error (Ray wraps it, or a
    message carries a formatted traceback) the original error's last line."""
    cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError: the actor's own exception
    if isinstance(cause, BaseException):
        e = cause
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    name = type(e).__name__
    if not lines:
        return name
    head = lines[0]
    if any(line.startswith("Traceback") for line in lines[1:]) or (len(lines) > 1 and lines[0].startswith("ray::")):
        last = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), lines[-1])
        head = last if head.startswith(("Traceback", "ray::")) else f"{head.rstrip(':')}: {last}"
    actor = next((line for line in lines if line.startswith("class_name:")), None)  # ray ActorDiedError
    text = " ".join(head.split()) + (f" ({actor})" if actor else "")
    text = text if text.startswith(name) else f"{name}: {text}"
    return text if len(text) <= 500 else text[:497] + "..."


def _partial(out_dir: Path, summaries: dict, base: Path) -> str:
    """Where the partial results are: the run's folder and what it holds."""
    done = f" The sweep's {len(summaries)} finished run(s) are complete in {base}." if summaries else ""
    if not out_dir.exists():
        return f"Nothing was written for it.{done}"
    files = sorted(p.name for p in out_dir.iterdir())
    if files == ["scenario.yaml"]:
        return f"Partial results are in {out_dir} (only scenario.yaml: no token was committed).{done}"
    return f"Partial results are in {out_dir} ({', '.join(files)}).{done}"
