"""summary.json from tokens.parquet's rows.

Summary definitions (summarize; computed by testbed.figures):
- throughput_tokens_per_s.system = tokens / emulated_seconds. For a device (and a tier) it is
  its tokens / its own span, from its first t_draft_start to its last t_commit, so fast devices
  that finish early show higher throughput (emulated_seconds is used when the span is unknown).
- token latency = t_commit - t_draft_start of each token (SLM step + upload + queueing +
  verification + downlink for a transmitted token; the SLM step alone for a skipped one);
  p50/p95/p99 by linear interpolation (numpy.percentile default).
- skip_rate = tokens not transmitted / tokens. acceptance_rate = accepted / transmitted drafts.
- vocab_compression = 1 - (sum of k over uploads) / (|V| x uploads), uploads = transmitted drafts.
- jain_fairness = (sum x)^2 / (n * sum x^2) over per-device throughput x (1 = perfectly fair).
- fidelity_tv_mean = mean fidelity_tv over the tokens where it is known (fidelity_tv_tokens of
  them). fidelity_tv_sequence_mean = the mean over devices of the sum of fidelity_tv over the
  device's tokens (devices with a value for every token: fidelity_tv_sequences). For one device
  the sum along its sequence, averaged over its randomness, bounds the TV distance between the
  law of its whole output and the LLM's for its prompt (the hybrid argument: swap one position's
  law at a time); one run gives one sample of that sum per device.
- stops: how the devices' sequences ended (eos, a stop sequence, length = max_new_tokens;
  unfinished = cut short) and the tokens each generated; tokens and throughput count the tokens
  actually generated (a stopped device generates fewer than max_new_tokens).
Undefined figures (e.g. acceptance with no uploads) are None (null in JSON).

Each figure is computed once: summary.json by summarize, from tokens.parquet's rows only (so a run cut
short, or a file from another machine, gives the same figures). The live collector (testbed.metrics)
folds the same events for Prometheus and the progress display, with the same definitions
(testbed.figures); nothing here reads it, and the progress display computes nothing itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from testbed.figures import device_throughput, jain, num, ratio, span_throughput, token_figures
from testbed.results.tokens import tokens_frame


def summarize(
    tokens: Any,
    *,
    emulated_seconds: float,
    wall_seconds: float,
    vocab_size: int,
    verifier_batches: list[int] | np.ndarray,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Every summary.json figure (module docstring has the definitions).

    tokens: the tokens table (DataFrame, records or dicts). verifier_batches: the size of every
    verifier batch. extra: more top-level fields (scenario name, lag, ...), must not clash.
    """
    df = tokens if isinstance(tokens, pd.DataFrame) else tokens_frame(tokens)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    per_device = device_throughput(df, emulated_seconds)
    batches = np.asarray(verifier_batches, dtype=np.float64)
    whole = token_figures(df, vocab_size)
    tiers = {}
    for tier in pd.unique(df["tier"]):  # in order of first appearance, one tier's rows at a time (memory)
        tdf = df[(df["tier"] == tier).to_numpy()]
        tiers[str(tier)] = {
            "devices": int(tdf["device"].nunique()),
            "policy": ",".join(dict.fromkeys(tdf["policy"].astype(str))),
            "throughput_tokens_per_s": num(span_throughput(tdf, emulated_seconds)),
            "jain_fairness": num(jain(per_device[tdf["device"].unique()])),
            **token_figures(tdf, vocab_size),
            "stops": stop_figures(tdf),
        }
    summary = {
        "emulated_seconds": num(emulated_seconds),
        "wall_seconds": num(wall_seconds),
        "tokens": whole.pop("tokens"),
        "devices": int(len(per_device)),
        "throughput_tokens_per_s": {
            "system": num(ratio(len(df), emulated_seconds)),
            "tiers": {t: b["throughput_tokens_per_s"] for t, b in tiers.items()},
            # per device up to PER_DEVICE_LIMIT devices (tokens.parquet has every device's rows)
            **(
                {"devices": {str(d): num(x) for d, x in per_device.items()}}
                if len(per_device) <= PER_DEVICE_LIMIT
                else {}
            ),
        },
        **whole,
        "jain_fairness": num(jain(per_device.to_numpy())),
        "verifier_batch_size_mean": num(batches.mean()) if len(batches) else None,
        "verifier_batches": int(len(batches)),
        "vocab_size": int(vocab_size),
        "stops": stop_figures(df, devices=len(per_device) <= PER_DEVICE_LIMIT),
        "tiers": tiers,
    }
    for key, value in (extra or {}).items():
        if key in summary:
            raise ValueError(f"extra field {key!r} clashes with a computed summary field")
        summary[key] = value
    return summary


STOP_REASONS = ("eos", "stop", "length")
# summary.json lists per-device figures (throughput, tokens, stop) up to this many devices: beyond, they
# would make it tens of MB (fleet-100k); tokens.parquet has every device's rows.
PER_DEVICE_LIMIT = 10_000


def stop_figures(df: pd.DataFrame, devices: bool = False) -> dict:
    """How the devices' sequences ended (stop_reason of each device's last row): devices per reason
    ("unfinished": no reason, a run cut short or a file from before stop_reason), and the tokens each
    device generated (mean, min, max); with `devices`, each device's tokens and reason too."""
    per_device = df.groupby("device", sort=True).size()
    reasons = dict.fromkeys(STOP_REASONS, 0)
    ended = pd.Series(dtype=str)
    if "stop_reason" in df.columns:
        ends = df["stop_reason"].astype(str)
        ended = pd.Series(ends[ends != ""].to_numpy(), index=df.loc[ends != "", "device"].to_numpy())
        for reason, n in ended.value_counts().items():
            reasons[str(reason)] = int(n)
    reasons["unfinished"] = int(len(per_device) - sum(reasons.values()))
    tokens = (
        {"mean": num(per_device.mean()), "min": int(per_device.min()), "max": int(per_device.max())}
        if len(per_device)
        else {"mean": None, "min": None, "max": None}
    )
    out = {"reasons": reasons, "tokens_per_device": tokens}
    if devices:
        out["devices"] = {
            str(d): {"tokens": int(n), "reason": str(ended.get(d, "unfinished"))} for d, n in per_device.items()
        }
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "tolist"):
        return _json_safe(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_summary(summary: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
