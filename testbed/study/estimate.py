"""`testbed reproduce ... --estimate`: a study's rough wall time on a 2-core CPU, per CPU class, from the
HumanEval problems' canonical solutions and measured step costs (no model is run)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testbed.study.sizes import FLEET_POLICIES, SIZES, Size

# One generated token-step (SLM + LLM, every device of a 16-row tile at once) on a 2-core CPU, per CPU
# class. bf16: measured on a 2-core Intel Xeon with AVX512-BF16 and AMX at 2 threads (actors.threads
# auto): the small study's hlm point, 146 token-steps with prefill and exact fidelity, took 71 s, and
# the whole study about 19 min (~0.5 s a step; it was ~1.7 s at 1 thread on an AMD EPYC with
# AVX512-BF16). fp32: a CPU without native bf16 (AVX2 only) runs the forwards ~3.5x slower (scaled,
# not measured here).
CPU_CLASSES = {"bf16": "native bf16 (AVX512-BF16 / AMX)", "fp32": "fp32 only (AVX2, no native bf16)"}
STEP_S = {"bf16": 0.5, "fp32": 1.8}
PREFILL_TILE_S = {"bf16": 0.1, "fp32": 0.3}  # one 16-row tile of prompt prefill through both models (GEMMs only)
STEP_WEIGHT = {"llm-only": 0.75, "slm-only": 0.25}  # by parameter count: the LLM ~3/4 of a step, the SLM ~1/4
TILE = 16  # rows of one packed GEMM tile: up to 16 devices cost what one does
# Completion lengths when generation stops (eos / HumanEval stop sequences). Measured: slm-only on
# HumanEval/40..55 with 256 tokens (temperature 1, bf16 on a 2-core Xeon with AMX-BF16): 15 of 16
# completions stopped, after 0.3-2.8x their canonical solution's Qwen tokens (the longest at 131, 1.8x a
# 74-token canonical; median 30); one (HumanEval/41, 6 canonical tokens) never did and ran to 256.
# A finishing completion: canonical x factor + margin, (expected, pessimistic); RAMBLE_P: the chance
# that a device runs to max_new_tokens instead (1 in 16 measured).
COMPLETION_FACTOR = (1.8, 2.8)
COMPLETION_MARGIN = (16, 16)
RAMBLE_P = 1 / 16


def cpu_class() -> str:
    """This machine's CPU class for the estimate: bf16 when the CPU has native bf16 (avx512_bf16 or
    amx_bf16 in /proc/cpuinfo), else fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def batch_steps(lengths: Sequence[int], tile: int = TILE) -> int:
    """Token-steps (in 16-row tiles) of one batch whose devices generate `lengths` tokens each and leave
    the batch when they stop: sum over steps of ceil(devices still generating / tile). One tile: the
    longest completion."""
    ls = np.sort(np.asarray(lengths, dtype=np.int64))
    if not len(ls):
        return 0
    steps, prev = 0, 0
    for j, L in enumerate(ls):  # from step prev to L, len(ls) - j devices are still generating
        steps += int(L - prev) * math.ceil((len(ls) - j) / tile)
        prev = int(L)
    return steps


def _token_lengths(texts: Sequence[str]) -> tuple[list[int], str]:
    try:
        from agents.models import load_tokenizer

        tok = load_tokenizer("qwen2.5-coder:slm")
        return [len(tok(t)["input_ids"]) for t in texts], "Qwen tokenizer"
    except Exception:  # noqa: BLE001 - no prepared pair: approximate
        return [max(1, int(len(t) / 3.2)) for t in texts], "chars / 3.2"


def completion_lengths(canonical: Sequence[int], max_new_tokens: int, which: int) -> list[int]:
    """Expected (which=0) or pessimistic (which=1) length per problem of a completion that finishes
    (COMPLETION_FACTOR, COMPLETION_MARGIN), capped at max_new_tokens."""
    f, m = COMPLETION_FACTOR[which], COMPLETION_MARGIN[which]
    return [min(max_new_tokens, int(math.ceil(c * f + m))) for c in canonical]


def point_steps(lengths: Sequence[int], max_new_tokens: int, which: int, p: float = RAMBLE_P) -> float:
    """Token-steps (tiles) of one point's batch whose finishing completions have `lengths`, when each device
    independently runs to max_new_tokens with probability p (it never stops). Expected (which=0): no device
    runs on with probability (1 - p)^n, else round(p n) (at least one) of them do, the longest-finishing
    ones. Pessimistic (which=1): ceil(2 p n) (at least one) run on."""
    n = len(lengths)
    if n == 0:
        return 0.0
    ls = sorted(lengths)

    def with_ramblers(k: int) -> int:
        return batch_steps(ls[: n - k] + [max_new_tokens] * k)

    if which == 1:
        return float(with_ramblers(min(n, max(1, math.ceil(2 * p * n)))))
    none = (1 - p) ** n
    return none * batch_steps(ls) + (1 - none) * with_ramblers(min(n, max(1, round(p * n))))


@dataclass
class Work:
    """What a study computes: token-steps [expected, pessimistic] and without stops, prefill tiles, runs,
    devices (the largest batch)."""

    steps: list[float]
    no_stop: float
    tiles: int
    runs: int
    devices: int


def paper_work(size: Size, canonical: Sequence[int], prompt_tokens: int) -> Work:
    """The paper study: every point's completions (point_steps, weighted by which models it runs) plus the
    calibration point's calibration_tokens on every device; every run prefills the prompts."""
    names = [
        "llm-only",
        "hlm",
        "slm-only",
        "u-hlm",
        "cu-hlm",
        "cu-hlm-offline",
        *["a"] * (len(size.risks) * len(size.adaptive_estimators)),
        "rp",
        *["u"] * len(size.u_th),
        *["t"] * len(size.theta),
        "rand-hlm",
    ]
    weight = sum(STEP_WEIGHT.get(n, 1.0) for n in names)
    devices = len(canonical) * size.samples
    cal = size.calibration_tokens * math.ceil(devices / TILE)
    steps = [
        weight
        * point_steps(completion_lengths(canonical, size.max_new_tokens, w) * size.samples, size.max_new_tokens, w)
        + cal
        for w in (0, 1)
    ]
    no_stop = weight * size.max_new_tokens * math.ceil(devices / TILE) + cal
    runs = len(names) + 1
    return Work(steps, no_stop, runs * math.ceil(prompt_tokens * size.samples / TILE), runs, devices)


def fleet_work(size: Size, n_problems: int, prompt_tokens: int) -> Work:
    """The fleet study: fleet_tokens on every device of every policy and fleet size, short enough that no
    stop is assumed, plus the calibration point."""
    no_stop, tiles, runs = 0.0, 0, 1
    for n in size.fleet_sizes:
        no_stop += sum(STEP_WEIGHT.get(p, 1.0) for p in FLEET_POLICIES) * size.fleet_tokens * math.ceil(n / TILE)
        tiles += len(FLEET_POLICIES) * math.ceil(prompt_tokens * n / n_problems / TILE)
        runs += len(FLEET_POLICIES)
    no_stop += size.calibration_tokens
    tiles += math.ceil(prompt_tokens / TILE)
    return Work([no_stop, no_stop], no_stop, tiles, runs, max(size.fleet_sizes))


def cpu_minutes(w: Work) -> dict:
    """Minutes per CPU class: token-steps x step cost + prefill tiles x tile cost."""
    cpus = {}
    for c, label in CPU_CLASSES.items():
        sec = [st * STEP_S[c] + w.tiles * PREFILL_TILE_S[c] for st in w.steps]
        cpus[c] = {
            "cpu": label,
            "token_step_s": STEP_S[c],
            "prefill_tile_s": PREFILL_TILE_S[c],
            "minutes": [x / 60 for x in sec],
            "minutes_without_stops": (w.no_stop * STEP_S[c] + w.tiles * PREFILL_TILE_S[c]) / 60,
        }
    return cpus


def estimate(kind: str, size: str | Size) -> dict:
    """Rough wall time of a study on a 2-core CPU, per CPU class (the papers' models; meaningless for tiny).

    The virtual clock computes content at full batch across devices (agents.engine), and with the packed
    forward up to 16 devices share one GEMM tile. Generation stops at eos / the HumanEval stop sequences,
    so a device leaves the batch when its completion ends: a paper point costs batch_steps of its devices'
    completion lengths (one tile: its longest completion), each problem's length estimated from its
    canonical solution (COMPLETION_FACTOR, COMPLETION_MARGIN) with a measured chance that a device never
    stops (RAMBLE_P, `point_steps`: an expected and a pessimistic count), plus the prompts' prefill. The
    calibration point runs calibration_tokens on every device. token_steps: [expected, pessimistic];
    minutes per CPU class likewise; without_stops: every device to max_new_tokens (what a run costs where
    generation does not stop)."""
    from testbed.prompts import humaneval_problems

    size = SIZES[size] if isinstance(size, str) else size
    problems = humaneval_problems()[size.offset : None if size.count is None else size.offset + size.count]
    lengths, how = _token_lengths([p["prompt"] for p in problems] + [p["canonical_solution"] for p in problems])
    prompt_tokens, canonical = sum(lengths[: len(problems)]), lengths[len(problems) :]
    if kind == "paper":
        w = paper_work(size, canonical, prompt_tokens)
    else:
        w = fleet_work(size, len(problems), prompt_tokens)
    cpus = cpu_minutes(w)
    lo, hi = cpus["bf16"]["minutes"][0] * 60, cpus["fp32"]["minutes"][1] * 60
    return {
        "kind": kind,
        "size": size.name,
        "runs": w.runs,
        "devices": w.devices,
        "samples": size.samples,
        "max_new_tokens": size.max_new_tokens,
        "token_steps": w.steps,
        "token_steps_without_stops": w.no_stop,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_from": how,
        "prefill_tiles": w.tiles,
        "longest_canonical_tokens": max(canonical) if canonical else 0,
        "cpu_classes": cpus,
        "this_cpu": cpu_class(),
        "seconds": [lo, hi],
        "minutes": [lo / 60, hi / 60],
        "assumptions": {
            "token_step_s": STEP_S,
            "prefill_tile_s": PREFILL_TILE_S,
            "step_weight": STEP_WEIGHT,
            "tile": TILE,
            "completion_factor": COMPLETION_FACTOR,
            "completion_margin": COMPLETION_MARGIN,
            "ramble_p": RAMBLE_P,
        },
    }
