"""Where a run's real time goes, and how close it came to what the hardware allows.

`breakdown` turns the actors' timings (agents.timing) into summary.json's `profile` block:
start-up (Ray, model load), model compute per role and phase (SLM prefill/decode, LLM
prefill/verify), the maths (draft sampling, policy, codec, verification), transport and waiting.
Actors run in parallel, so per-actor seconds can add up to more than the wall time.

`compute_limit` (``testbed run --profile``) is the yardstick: the run's own forwards, token for
token, timed again in this process by the benchmark code at the best batch sizes the run's devices
allow (all prompts in one prefill, decode/verify at the best of 1..32 sessions <= devices), in the
run's dtype and thread count, SLM then LLM (one after the other: a device's draft waits for its
verdict). Its headline figure is `wall / compute limit`, with wall the emulation phase (actors up to
last token); the whole wall, start-up included, is reported next to it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

COMPUTE = ("slm.prefill", "slm.decode", "llm.prefill", "llm.verify_forward")
MATHS = ("draft", "policy", "codec", "verify_math")
BATCHES = (1, 2, 4, 8, 16, 32)


def breakdown(
    wall_s: float,
    emulation_s: float,
    startup: Mapping[str, float],
    groups: Mapping[str, Mapping],
    verifier: Mapping[str, Mapping],
) -> dict:
    """The profile block from merged group timings and the verifier's timings."""

    def pick(src, names):
        return {
            n: {"seconds": round(src[n]["seconds"], 4), "calls": src[n]["calls"], "tokens": src[n]["items"]}
            for n in names
            if n in src
        }

    both = {**groups, **verifier}
    compute = pick(both, COMPUTE)
    return {
        "wall_s": round(wall_s, 3),
        "emulation_s": round(emulation_s, 3),
        "startup_s": {k: round(v, 3) for k, v in startup.items()},
        "compute": compute,
        "compute_s": round(sum(c["seconds"] for c in compute.values()), 3),
        "maths": pick(both, MATHS),
        "transport_s": {
            "groups": round(groups.get("transport", {}).get("seconds", 0.0), 3),
            "verifier": round(verifier.get("transport", {}).get("seconds", 0.0), 3),
        },
        "wait_s": {
            "groups": round(groups.get("wait", {}).get("seconds", 0.0), 3),
            "verifier": round(verifier.get("wait", {}).get("seconds", 0.0), 3),
        },
    }


def _context(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(0, min(vocab, 30_000), n).tolist()


def _rate_prefill(lm, lengths: list[int]) -> float:
    """Tokens/s of one batched prefill of prompts of these lengths (all in one call)."""
    rng = np.random.default_rng(0)
    items = [(("limit-prefill", i), _context(rng, n, lm.vocab_size)) for i, n in enumerate(lengths)]
    with lm.uncached():  # computed, not copied from the prefix cache (agents.lm)
        lm.extend(items[:1], logits=False)  # warm-up
        lm.drop(items[0][0])
        t0 = time.perf_counter()
        lm.extend(items, logits=False)
        dt = time.perf_counter() - t0
    for sid, _ in items:
        lm.drop(sid)
    return sum(lengths) / dt


def compute_limit(
    slm,
    llm,
    profile: Mapping,
    prompt_lengths: list[int],
    n_devices: int,
    threads: Mapping[str, int],
    served: Mapping[str, int] | None = None,
) -> dict:
    """Seconds the run's forwards need at the best batch sizes. slm/llm: BatchedLM (None when the
    role did no compute); profile: the breakdown block of the run; threads: torch threads per role
    ("slm", "llm"), as the run's actors had them; served: prompt tokens per role that the run's
    prefix caches served (agents.lm.PrefixCache)."""
    import torch

    from testbed.benchmarks.verifier import raw_tokens_per_s

    compute = profile["compute"]
    context = int(np.mean(prompt_lengths)) if prompt_lengths else 64
    batches = [b for b in BATCHES if b <= max(1, n_devices)]
    out: dict = {"batches_tried": batches}
    total = 0.0
    for role, lm, prefill, step in (
        ("slm", slm, "slm.prefill", "slm.decode"),
        ("llm", llm, "llm.prefill", "llm.verify_forward"),
    ):
        # prompt tokens the prefix cache served were copied, not computed: no compute to bound
        need_prefill = max(0, compute.get(prefill, {}).get("tokens", 0) - (served or {}).get(role, 0))
        need_step = compute.get(step, {}).get("tokens", 0)
        if lm is None or not (need_prefill or need_step):
            continue
        torch.set_num_threads(threads[role])
        prefill_rate = _rate_prefill(lm, prompt_lengths) if need_prefill else None
        rates = {b: raw_tokens_per_s(lm, b, context, steps=3) for b in batches} if need_step else {}
        best = max(rates, key=rates.get) if rates else None
        seconds = (need_prefill / prefill_rate if prefill_rate else 0.0) + (need_step / rates[best] if best else 0.0)
        out[role] = {
            "prefill_tokens": need_prefill,
            "prefill_tokens_per_s": prefill_rate,
            "step_tokens": need_step,
            "best_batch": best,
            "step_tokens_per_s": {str(b): round(r, 2) for b, r in rates.items()},
            "seconds": round(seconds, 3),
            "measured_s": round(
                compute.get(prefill, {}).get("seconds", 0.0) + compute.get(step, {}).get("seconds", 0.0), 3
            ),
        }
        total += seconds
    out["seconds"] = round(total, 3)
    return out


def profile_table(summary: Mapping):
    """The profile block of a summary as a rich table (seconds, calls, tokens, tokens/s)."""
    from rich.table import Table

    prof = summary.get("profile") or {}
    info = summary.get("compute") or {}
    machine = info.get("machine", {})
    dtype = info.get("dtype", {})
    t = Table(
        title=f"where the time went ({machine.get('cpu_capability', '?')}, slm {dtype.get('slm')}, "
        f"llm {dtype.get('llm')})"
    )
    for col in ("part", "seconds", "calls", "tokens", "tokens/s"):
        t.add_column(col, justify="right")
    t.add_row("wall (all)", f"{prof.get('wall_s', 0):.2f}", "", "", "")
    for name, sec in (prof.get("startup_s") or {}).items():
        t.add_row(f"start-up: {name}", f"{sec:.2f}", "", "", "")
    t.add_row("emulation (actors up to last token)", f"{prof.get('emulation_s', 0):.2f}", "", "", "")
    for group in ("compute", "maths"):
        for name, c in (prof.get(group) or {}).items():
            rate = f"{c['tokens'] / c['seconds']:.1f}" if group == "compute" and c["seconds"] > 0 else ""
            t.add_row(name, f"{c['seconds']:.2f}", str(c["calls"]), str(c["tokens"]), rate)
    for name in ("transport_s", "wait_s"):
        for who, sec in (prof.get(name) or {}).items():
            t.add_row(f"{name[:-2]} ({who})", f"{sec:.2f}", "", "", "")
    limit = prof.get("compute_limit")
    if limit:
        t.add_row("compute limit (best batches)", f"{limit['seconds']:.2f}", "", "", "")
        t.add_row("emulation / compute limit", f"{prof.get('wall_over_compute_limit')}", "", "", "")
        t.add_row(
            "wall (all) / compute limit",
            f"{prof['wall_s'] / limit['seconds']:.2f}" if limit["seconds"] else "",
            "",
            "",
            "",
        )
    return t
