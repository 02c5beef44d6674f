"""A study's table rows and what is read off them: the papers' token throughput of a point, the accuracy
bound fidelity implies, the paired accuracy columns, and cu-hlm's frontier for comparisons at equal
fidelity (docs/design.md section 7).

Token throughput as the papers define it: the inverse of the per-token delay, SLM compute + uplink +
LLM compute (+ the verdict's downlink) for a transmitted token, the SLM step alone for a skipped one.
A device's tokens are sequential (the next draft starts when the previous token is committed), so its
span, first draft start to last commit, is the sum of its per-token delays and tokens / span = 1 / mean
per-token delay (testbed.results device_throughput). The study's throughput of a policy is the same
over all its tokens, 1 / (mean per-token delay over every token of every device) = total tokens / sum
of the devices' spans (`paper_throughput`, from each device's tokens and span in the point's
tokens.parquet). Devices stop at eos or a stop sequence and so generate different numbers of tokens:
the harmonic mean of the per-device throughputs would weigh a 5-token device like a 256-token one, and
is the study's throughput only when every device generates the same number of tokens.

Every scored point is compared with llm-only paired (the same problems and seeds: the per-problem
difference of pass rates with its standard error, McNemar's exact test or, with several samples per
problem, the sign test) and next to the bound fidelity implies, |delta pass@1| <= mean over sequences of
min(1, summed per-token TV) (`tv_accuracy_bound`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from testbed.study.points import Point


def device_tokens_spans(tokens: Any, emulated_seconds: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per device (sorted by id): tokens generated and span, first t_draft_start to last t_commit, the
    span testbed.figures.device_throughput divides by (emulated_seconds where unknown). tokens: the
    tokens table or the path of a point's tokens.parquet."""
    import pandas as pd

    df = (
        pd.read_parquet(tokens, columns=["device", "t_draft_start", "t_commit"])
        if isinstance(tokens, (str, Path))
        else tokens
    )
    g = df.groupby("device", sort=True)
    span = (g["t_commit"].max() - g["t_draft_start"].min()).to_numpy(np.float64)
    if emulated_seconds is not None:
        span = np.where(np.isfinite(span) & (span > 0), span, emulated_seconds)
    return g.size().to_numpy(np.float64), span


def paper_throughput(summary: dict, tokens: Any = None) -> float | None:
    """The study's token throughput of a point: 1 / (mean per-token delay over every token of every
    device) = total tokens / sum of device spans (module docstring). With `tokens` (the point's tokens
    table or its tokens.parquet) it is computed from each device's tokens and span, exact whatever
    number of tokens each device generated (generation stops at eos / stop sequences). Without, from
    the summary alone: the harmonic mean of the per-device throughputs, which is the same number only
    when every device generated the same number of tokens."""
    if tokens is not None:
        n, span = device_tokens_spans(tokens, summary.get("emulated_seconds"))
        ok = np.isfinite(span) & (span > 0)
        return float(n[ok].sum() / span[ok].sum()) if ok.any() else None
    x = [v for v in (summary.get("throughput_tokens_per_s") or {}).get("devices", {}).values() if v]
    return len(x) / sum(1.0 / v for v in x) if x else None


def tv_accuracy_bound(tokens: Any) -> float | None:
    """The bound on |pass@1 - llm-only's pass@1| that fidelity implies (docs/design.md section 7): a [0, 1]
    metric of a sequence moves by at most the TV distance between the sequence's law and the LLM's, which
    is at most min(1, sum of the per-token TVs); averaged over the devices (sequences) with a fidelity_tv
    for every token. None where no device has one (or the table has no fidelity_tv)."""
    import pandas as pd

    if isinstance(tokens, (str, Path)):
        try:
            df = pd.read_parquet(tokens, columns=["device", "fidelity_tv"])
        except (KeyError, ValueError, OSError):
            return None
    else:
        if "fidelity_tv" not in tokens:
            return None
        df = tokens[["device", "fidelity_tv"]]
    g = df.groupby("device", sort=True)["fidelity_tv"]
    known = g.count() == g.size()
    if not known.any():
        return None
    return float(np.minimum(1.0, g.sum()[known]).mean())


def _paired_cells(point: Point, acc: dict) -> dict:
    """The accuracy columns of a row: unbiased pass@1 over problems and the paired comparison with
    llm-only (testbed.accuracy.paired); llm-only's own row is the reference (difference 0, no test)."""
    unb = acc.get("unbiased") or {}
    pr = acc.get("paired") or {}
    ref = point.policy == "llm-only" and "pass_at_1" in acc
    return {
        "pass_at_1": unb.get("pass_at_1", acc.get("pass_at_1")),
        "pass_at_1_stderr": unb.get("stderr", acc.get("stderr")),
        "n_problems": unb.get("n_problems", acc.get("n_prompts")),
        "samples_per_problem": unb.get("samples_per_problem"),
        "pass_at_1_diff": 0.0 if ref else pr.get("diff"),
        "pass_at_1_diff_stderr": None if ref else pr.get("stderr"),
        "pass_at_1_diff_ci95": None if ref else pr.get("ci95"),
        "paired_test": None if ref else pr.get("test"),
        "mcnemar_p": None if ref else pr.get("mcnemar_p"),
        "discordant": None if ref else pr.get("discordant"),
        "distinguishable_95": None if ref else pr.get("distinguishable_95"),
    }


def paper_row(point: Point, summary: dict, hlm_throughput: float | None, tokens: Any = None) -> dict:
    """One table row; tokens (the point's tokens table or tokens.parquet) gives the exact throughput and
    the TV bound on accuracy (without it: the summary's harmonic mean, no bound)."""
    acc = summary.get("accuracy") or {}
    thr = paper_throughput(summary, tokens)
    rel, rel_se = acc.get("pass_at_1_relative"), acc.get("pass_at_1_relative_stderr")
    if point.policy == "llm-only" and acc.get("pass_at_1"):
        rel, rel_se = 1.0, None  # the reference itself
    return {
        "point": point.name,
        "label": point.label,
        "group": point.group,
        "policy": point.policy,
        **point.meta,
        "throughput_tokens_per_s": thr,
        "throughput_ratio_hlm": thr / hlm_throughput if thr and hlm_throughput else None,
        "skip_rate": summary.get("skip_rate"),
        "vocab_compression": summary.get("vocab_compression"),
        "acceptance_rate": summary.get("acceptance_rate"),
        "uplink_bytes_per_token": summary.get("uplink_bytes_per_token"),
        **_paired_cells(point, acc),
        "pass_at_1_relative": rel,
        "pass_at_1_relative_stderr": rel_se,
        "fidelity_tv": summary.get("fidelity_tv_mean"),
        "fidelity_tv_sequence": summary.get("fidelity_tv_sequence_mean"),
        "fidelity_tv_branch": summary.get("fidelity_tv_branch_mean"),
        "pass_at_1_tv_bound": None if tokens is None else tv_accuracy_bound(tokens),
        "tokens": summary.get("tokens"),
        "devices": summary.get("devices"),
    }


def cu_hlm_frontier(rows: list[dict]) -> list[dict]:
    """cu-hlm's threshold sweep (risk-averse, fixed u_th, risk-prone; theta at its default) as the upper
    concave hull of its (fidelity, skip rate) points: what cu-hlm can reach at each fidelity. Mixing two
    thresholds at random (per sequence, with probability lam) skips lam s_1 + (1 - lam) s_2 and, as TV is
    convex, costs at most lam f_1 + (1 - lam) f_2, so every point of a hull segment is attainable or
    bettered; the Pareto staircase of the measured points lies at or below it and would understate
    cu-hlm. Sorted by fidelity; a point under the hull (dominated, or beaten by a mixture) is left out."""
    pts = sorted(
        (
            r
            for r in rows
            if r["policy"] == "cu-hlm"
            and r["group"] in ("policy", "u_th")
            and r.get("fidelity_tv") is not None
            and r.get("skip_rate") is not None
        ),
        key=lambda r: (r["fidelity_tv"], -r["skip_rate"]),
    )
    hull: list[dict] = []
    for r in pts:
        if hull and r["skip_rate"] <= hull[-1]["skip_rate"]:
            continue  # no more skipping for more distortion
        while len(hull) >= 2 and _below_chord(hull[-2], hull[-1], r):
            hull.pop()
        hull.append(r)
    return hull


def _below_chord(a: dict, b: dict, c: dict) -> bool:
    """b lies on or under the segment from a to c in the (fidelity, skip) plane."""
    (fa, sa), (fb, sb), (fc, sc) = ((r["fidelity_tv"], r["skip_rate"]) for r in (a, b, c))
    return (sb - sa) * (fc - fa) <= (sc - sa) * (fb - fa)


def equal_fidelity(rows: list[dict]) -> list[dict]:
    """Each cu-hlm-adaptive point against cu-hlm's threshold sweep at the same fidelity: the skip rate
    cu-hlm reaches at the adaptive point's fidelity, linearly interpolated along the upper concave hull
    of its points (cu_hlm_frontier: random mixing of thresholds attains it); the pass@1 of the two
    bracketing cu-hlm points. Below cu-hlm's lowest fidelity no threshold reaches it: `cu_hlm_skip_rate`
    is then that lowest point's skip rate and `bound` says cu-hlm cannot do better than that at any
    fidelity so low."""
    front = cu_hlm_frontier(rows)
    out = []
    if not front:
        return out
    f = np.array([r["fidelity_tv"] for r in front], float)
    s = np.array([r["skip_rate"] for r in front], float)
    for r in rows:
        if r["policy"] != "cu-hlm-adaptive" or r.get("fidelity_tv") is None or r.get("skip_rate") is None:
            continue
        x = float(r["fidelity_tv"])
        if x > f[-1]:
            continue  # beyond the sweep: nothing to compare with
        i = int(np.searchsorted(f, x))  # front[i - 1].fidelity < x <= front[i].fidelity
        lo, hi = front[max(i - 1, 0)], front[i]
        skip = float(np.interp(x, f, s))
        out.append(
            {
                "point": r["point"],
                "estimator": r.get("estimator"),
                "risk": r.get("risk"),
                "fidelity_tv": x,
                "skip_rate": r["skip_rate"],
                "pass_at_1": r.get("pass_at_1"),
                "pass_at_1_stderr": r.get("pass_at_1_stderr"),
                "vocab_compression": r.get("vocab_compression"),
                "cu_hlm_skip_rate": skip,
                "skip_gain": r["skip_rate"] - skip,
                "bound": bool(x < f[0]),
                "cu_hlm_bracket": [lo["point"], hi["point"]],
                "cu_hlm_pass_at_1": [lo.get("pass_at_1"), hi.get("pass_at_1")],
            }
        )
    return out


def fleet_row(point: Point, s: dict) -> dict:
    lat = s.get("token_latency_s") or {}
    return {
        "point": point.name,
        "label": point.label,
        "policy": point.policy,
        **point.meta,
        "system_throughput_tokens_per_s": (s.get("throughput_tokens_per_s") or {}).get("system"),
        "jain_fairness": s.get("jain_fairness"),
        "verifier_batch_size_mean": s.get("verifier_batch_size_mean"),
        "skip_rate": s.get("skip_rate"),
        "vocab_compression": s.get("vocab_compression"),
        "uplink_bytes_per_token": s.get("uplink_bytes_per_token"),
        "latency_p95_s": lat.get("p95"),
        "fidelity_tv": s.get("fidelity_tv_mean"),
        "devices": s.get("devices"),
        "tokens": s.get("tokens"),
    }
