"""`testbed content`: build and list content libraries (testbed.content, docs/design.md section 8)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from testbed.commands.run import _checked_points, _options, _run_point, _say, _show
from testbed.config.io import bundled_scenarios

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command("record")
def record(
    scenario: str = typer.Argument(..., help=f"Scenario file or bundled name ({', '.join(bundled_scenarios())})."),
    out: Path = typer.Option(..., "--out", help="The content library (a folder; made if missing)."),
    name: str = typer.Option(None, "--name", help="The recording's name (default <scenario>-seed<seed>-<time>)."),
    runs: Path = typer.Option(None, "--runs", help="Where the runs' results go (default runs/<name>-<time>)."),
    engine: str = typer.Option("local", "--engine", help="local (one process) or ray."),
    dtype: str = typer.Option(None, "--dtype", help="Override models.dtype: auto | bfloat16 | float32 | float16."),
    threads: str = typer.Option(None, "--threads", help="Override actors.threads: auto | N."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML/PNG report of each run."),
    no_accuracy: bool = typer.Option(False, "--no-accuracy", help="Skip executing HumanEval tests (pass@1)."),
    debug: bool = typer.Option(False, "--debug", help="On a failure, print the full traceback too."),
) -> None:
    """Run SCENARIO in the virtual clock and save each run's content as a recording of the library
    --out: every token's draft, decision, payload size, verdict, betas and fidelity, every sequence's
    prompt and stop, with the provenance (models, dtype, policies, prompts, seed, testbed version, CPU).
    A sweep (e.g. `sweep: {seed: [1, 2, 3]}`) records one recording per point. A tier then replays it
    without models: `content: {library: LIB}` (docs/design.md section 8)."""
    from rich.console import Console

    err = Console(stderr=True)
    points, base = _checked_points(scenario, runs, "virtual", dtype, threads, "off", engine, None)
    summaries: dict = {}
    for point in points:
        out_dir = base if len(points) == 1 else base / point.name
        opts = _options(point, out_dir, engine, None, "off", 0.0, no_report, False, no_accuracy)
        opts.save_content = out
        opts.recording = (f"{name}-{point.name}" if len(points) > 1 else name) if name else None
        opts.command = "testbed content " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None
        summaries[point.name] = _run_point(point, opts, summaries, base, debug)
        _show(err, summaries[point.name], f"{point.name}  ({out_dir})", False)
        recording = summaries[point.name].get("recording")
        if recording is None:
            _say(f"{point.name}: the run wrote no content record (it did not finish)")
            raise typer.Exit(1)
        _say(f"recorded: {recording}")


@app.command("ls")
def ls(
    library: str = typer.Argument(..., help="A content library: a folder or a bundled name."),
    json_out: bool = typer.Option(False, "--json", help="Print the recordings and their provenance as JSON."),
) -> None:
    """What a content library holds: its recordings, their policies, sequences and tokens, and where
    they came from (models, dtype, seed, CPU, testbed version)."""
    from rich.console import Console
    from rich.table import Table

    from testbed.content import Library, LibraryError

    try:
        lib = Library.open(library)
    except LibraryError as e:
        _say(str(e))
        raise typer.Exit(2) from None
    rows = []
    for r in lib.recordings:
        seqs = r.sequences.to_pydict()
        pv = r.provenance
        for label, spec in pv["policies"].items():
            chosen = [i for i, p in enumerate(seqs["policy"]) if p == label]
            rows.append(
                {
                    "recording": r.name,
                    "policy": label,
                    "parameters": spec if isinstance(spec, dict) else {},
                    "sequences": len(chosen),
                    "tokens": sum(seqs["n_tokens"][i] for i in chosen),
                    "prompts": len({seqs["prompt_index"][i] for i in chosen}),
                    "models": f"{pv['models']['slm']} / {pv['models']['llm']}",
                    "dtype": pv["dtype"]["llm"],
                    "seed": pv["seed"],
                    "max_new_tokens": pv["max_new_tokens"],
                    "cpu": f"{pv['machine'].get('cpu')} ({pv['machine'].get('cpu_capability')})",
                    "testbed": pv["testbed_version"],
                    "created": pv["created"],
                    "command": pv["command"],
                }
            )
    if json_out:
        print(json.dumps({"library": str(lib.path), "recordings": rows}, indent=2, default=str))
        return
    size = sum(f.stat().st_size for f in lib.path.rglob("*.parquet"))
    table = Table(title=f"{lib.path}  ({len(lib.recordings)} recordings, {size / 1e6:.2f} MB)")
    cols = ("recording", "policy", "sequences", "tokens", "prompts", "seed", "max_new_tokens")
    for col in cols:
        table.add_column(col, justify="left" if col in ("recording", "policy") else "right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in cols))
    Console().print(table)
    for r in lib.recordings:
        pv = r.provenance
        print(
            f"{r.name}: {pv['models']['slm']} / {pv['models']['llm']} ({pv['dtype']['llm']}), "
            f"{pv['machine'].get('cpu')} ({pv['machine'].get('cpu_capability')}), testbed {pv['testbed_version']}, "
            f"{pv['created']}"
        )
    for label, spec in sorted({(row["policy"], json.dumps(row["parameters"])) for row in rows}):
        print(f"{label}: {spec}")  # the parameters a tier's policy must match (pinned)
    commands = sorted({row["command"] for row in rows})
    print("recorded by: " + "; ".join(commands))
