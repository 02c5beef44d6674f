"""`testbed bench policies`: per-token cost of the estimators and online k* (policies.benchmark)."""
from __future__ import annotations

import json

import typer


def command(
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    vocab: int = typer.Option(151936, "--vocab", min=2),
    batch: int = typer.Option(32, "--batch", min=1),
    repeats: int = typer.Option(3, "--repeats", min=1),
    logits: str = typer.Option(None, "--logits", help=".npy [N, V] of real SLM logits to measure as well."),
) -> None:
    """Milliseconds per token of each uncertainty estimator and of online k*, fast path vs naive."""
    from policies.benchmark import run

    out = run(vocab, batch, repeats, logits)
    if json_out:
        print(json.dumps(out, indent=2))
        return
    print(f"V = {out['vocab_size']}, batch = {out['batch']}, 1 torch thread; ms per token")
    for kind, rows in out["per_token"].items():
        print(f"[{kind}]")
        for name, value in rows.items():
            print(f"  {name:40s} {value}")
