"""`testbed accuracy RUN_DIR`: HumanEval pass@1 of a finished run (re-scored from its tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _fmt(p: float | None, se: float | None) -> str:
    return "n/a" if p is None else f"{100 * p:.1f}% ± {100 * (se or 0.0):.1f}"


def accuracy(
    run_dir: Path = typer.Argument(..., help="A finished run directory with HumanEval prompts."),
    reference: Path | None = typer.Option(
        None,
        "--reference",
        "-r",
        help="An llm-only run on the same prompts and seed: adds pass@1 relative to it and the per-prompt agreement.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the accuracy block as JSON."),
    workers: int | None = typer.Option(
        None, "--workers", "-j", min=1, help="Programs run at once (default: the usable CPUs)."
    ),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds per program."),
) -> None:
    """Execute every device's completion against its HumanEval tests (sandboxed subprocesses);
    writes RUN_DIR/accuracy.parquet and the `accuracy` block of RUN_DIR/summary.json."""
    from rich.console import Console
    from rich.table import Table

    from testbed.accuracy import AccuracyError, score_run

    try:
        result = score_run(run_dir, reference=reference, workers=workers, timeout_s=timeout)
    except AccuracyError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    b = result.block
    if json_out:
        print(json.dumps(b, indent=2))
        return
    table = Table(title=f"HumanEval pass@1 of {run_dir} ({b['prompts']}, {b['n']} devices)")
    for col in ("group", "n", "passed", "pass@1 ± s.e."):
        table.add_column(col, justify="left" if col == "group" else "right")
    table.add_row("all", str(b["n"]), str(b["passed"]), _fmt(b["pass_at_1"], b["stderr"]))
    for kind, key in (("tier", "tiers"), ("policy", "policies")):
        for name, st in b[key].items():
            table.add_row(f"{kind} {name}", str(st["n"]), str(st["passed"]), _fmt(st["pass_at_1"], st["stderr"]))
    if "reference" in b:
        ref = b["reference"]
        table.add_section()
        table.add_row("reference run", str(ref["n"]), str(ref["passed"]), _fmt(ref["pass_at_1"], ref["stderr"]))
        rel, se = b["pass_at_1_relative"], b["pass_at_1_relative_stderr"]
        table.add_row(
            "relative to reference", "", "", "n/a (reference pass@1 is 0)" if rel is None else f"{rel:.3f} ± {se:.3f}"
        )
        pr = b.get("paired") or {}
        if pr.get("diff") is not None:
            se = "n/a" if pr["stderr"] is None else f"{pr['stderr']:.3f}"
            table.add_row(
                "paired difference (run - reference)",
                str(pr["n_problems"]),
                "",
                f"{pr['diff']:+.3f} ± {se}, {pr['test']} p = {pr['mcnemar_p']:.3g} "
                f"({'distinguishable' if pr['distinguishable_95'] else 'not distinguishable'} at 95%)",
            )
        ag = b["agreement"]
        table.add_row(
            "per-prompt agreement",
            str(ag["n_prompts"]),
            "",
            "n/a" if ag["agreement"] is None else f"{100 * ag['agreement']:.1f}%",
        )
    console = Console()
    console.print(table)
    r = b["results"]
    console.print(
        f"  {r['passed']} passed, {r['failed']} failed, {r['timed out']} timed out "
        f"(timeout {b['timeout_s']:g} s)  -> {run_dir / 'accuracy.parquet'}"
    )
    if "reference" in b:
        console.print(f"  reference: {b['reference']['run_dir']}")
    for w in b.get("reference", {}).get("warnings", []):
        console.print(f"  [yellow]warning:[/yellow] {w}")
