"""`testbed bench policies`: per-token cost of the estimators and online k* (policies.benchmark), and of
the exact fidelity of each preset (its decision law expanded over every draft, agents.fidelity) next to
the branch measure it replaced."""

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
    out["exact_fidelity"] = fidelity_cost(vocab, min(batch, 4), repeats)
    if json_out:
        print(json.dumps(out, indent=2))
        return
    print(f"V = {out['vocab_size']}, batch = {out['batch']}, 1 torch thread; ms per token")
    for kind, rows in out["per_token"].items():
        print(f"[{kind}]")
        for name, value in rows.items():
            print(f"  {name:40s} {value}")
    print("[exact fidelity: ms per token, lm-like logits; x branch = / the branch measure's cost]")
    for name, r in out["exact_fidelity"].items():
        print(
            f"  {name:40s} {r['exact_ms']:>9.2f} ms  "
            f"(x{r['ratio_to_branch']:.0f} branch, {r['transmit_groups']} k groups)"
        )


PRESETS = {
    "hlm": {"name": "hlm"},
    "u-hlm": {"name": "u-hlm", "threshold": "fixed", "u_th": 0.25},
    "cu-hlm (online k*)": {"name": "cu-hlm", "threshold": "fixed", "u_th": 0.25},
    "cu-hlm-offline": {"name": "cu-hlm-offline", "threshold": "fixed", "u_th": 0.25, "k": 14},
    "cu-hlm-adaptive (max u)": {"name": "cu-hlm-adaptive", "estimator": "max"},
    "rand-hlm": {"name": "rand-hlm", "skip_rate": 0.3},
}


def fidelity_cost(vocab: int, batch: int, repeats: int) -> dict:
    """Per preset: process-CPU ms per token of agents.fidelity.exact_fidelity (the committed token's law
    over every draft, then its TV to y) at one torch thread, and its ratio to the branch measure's."""
    import numpy as np
    import torch

    from agents.fidelity import branch_fidelity, exact_fidelity
    from agents.speculative import softmax_t
    from policies import load_policy
    from policies.base import DecisionContext
    from policies.benchmark import _best, lm_like_logits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        z = lm_like_logits(batch, vocab).numpy()
        zy = z + np.random.default_rng(1).normal(0.0, 1.0, z.shape).astype(np.float32)  # the LLM: a nearby law
        rows = [(z[b], softmax_t(z[b], 1.0), softmax_t(zy[b], 1.0)) for b in range(batch)]
        out = {}
        for name, spec in PRESETS.items():
            policy = load_policy(spec)
            laws = [
                policy.decide_batch(zb[None], [DecisionContext(0, b, 0, 1.0, int(x.argmax()), x)])[0].law
                for b, (zb, x, _) in enumerate(rows)
            ]

            def best(fn):  # ms per token, process CPU, best of `repeats` (as the estimators' rows)
                return _best(fn, repeats) / batch * 1e3

            exact = best(
                lambda rows=rows, laws=laws: [exact_fidelity(zb, x, law, y) for (zb, x, y), law in zip(rows, laws)]
            )
            branch = best(lambda rows=rows: [branch_fidelity(x, y, None) for _, x, y in rows])
            groups = max(len(law.draft_law(zb, x).groups) for (zb, x, _), law in zip(rows, laws))
            out[name] = {
                "exact_ms": round(exact, 3),
                "branch_ms": round(branch, 3),
                "ratio_to_branch": round(exact / max(branch, 1e-9), 1),
                "transmit_groups": groups,
            }
        return out
    finally:
        torch.set_num_threads(threads)
