"""Every figure of a run, computed in one place: summary.json (testbed.results), the report
(testbed.report), calibration (testbed.calibrate) and the live collector (testbed.metrics)
all call these. Plain functions on numpy arrays and tokens DataFrames (tokens.parquet's
columns, testbed.results); the definitions are in testbed.results' module docstring.

Two conventions: the scalar helpers (jain, ratio, the rates) return NaN when a figure is
undefined, so they compose in arithmetic; `token_figures` returns the JSON-ready block of
summary.json, where undefined is None.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from policies.rejection import DegenerateFitError, RejectionFit, fit_rejection_model

LATENCY_QUANTILES = (50, 95, 99)  # p50 / p95 / p99, linear interpolation (numpy's default)


def num(x: Any) -> float | None:
    """A JSON-safe float: None for NaN, inf and None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def ratio(part: float, whole: float) -> float:
    """part / whole; NaN when whole is 0."""
    return part / whole if whole else math.nan


def jain(x: Any, n: int | None = None) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2) over the finite entries of x: 1 when all
    are equal, 1/n when one takes everything. n > len(x) counts the missing entries as 0 (the
    collector's active devices without tokens). NaN when undefined (no entries, all zero)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = len(x) if n is None else max(n, len(x))
    sq = float(np.sum(x * x))
    return float(np.sum(x)) ** 2 / (n * sq) if n and sq > 0 else math.nan


def skip_rate(skipped: int, tokens: int) -> float:
    """Tokens committed without an upload / tokens."""
    return ratio(skipped, tokens)


def acceptance_rate(accepted: int, uploads: int) -> float:
    """Accepted drafts / uploaded drafts (llm-only requests carry no draft: not uploads)."""
    return ratio(accepted, uploads)


def vocab_compression(entries: int, uploads: int, vocab_size: int) -> float:
    """1 - (vocabulary entries sent) / (|V| x uploads)."""
    return 1.0 - entries / (vocab_size * uploads) if uploads else math.nan


# ---------------------------------------------------------------------------- from the tokens


def device_throughput(df: pd.DataFrame, emulated_seconds: float) -> pd.Series:
    """Tokens per emulated second of each device over its own span, first draft start to last
    commit (index: device id, sorted); emulated_seconds where the span is unknown or empty."""
    g = df.groupby("device", sort=True)
    span = (g["t_commit"].max() - g["t_draft_start"].min()).fillna(emulated_seconds)
    span = span.where(span > 0, emulated_seconds)
    return (g.size() / span).astype(np.float64)


def span_throughput(df: pd.DataFrame, emulated_seconds: float) -> float:
    """Tokens of df over its span (a tier: first draft start to last commit), emulated_seconds
    where the span is unknown or empty; NaN when that is 0 too."""
    span = float(df["t_commit"].max() - df["t_draft_start"].min())
    span = span if math.isfinite(span) and span > 0 else emulated_seconds
    return ratio(len(df), span)


def token_latency(df: pd.DataFrame) -> np.ndarray:
    """t_commit - t_draft_start of every token where both are known (emulated seconds)."""
    lat = (df["t_commit"] - df["t_draft_start"]).to_numpy(dtype=np.float64)
    return lat[np.isfinite(lat)]


def latency_percentiles(lat: np.ndarray) -> dict[str, float | None]:
    """p50 / p95 / p99 and the mean of the latencies; None when there are none."""
    out: dict[str, float | None] = {
        f"p{q}": num(np.percentile(lat, q)) if len(lat) else None for q in LATENCY_QUANTILES
    }
    out["mean"] = num(lat.mean()) if len(lat) else None
    return out


def fidelity(df: pd.DataFrame) -> np.ndarray:
    """fidelity_tv of every token (NaN where unknown, and for tables from before the column)."""
    return df["fidelity_tv"].to_numpy(dtype=np.float64) if "fidelity_tv" in df else np.full(len(df), np.nan)


def sequence_fidelity(df: pd.DataFrame) -> pd.Series:
    """Per device, the sum of fidelity_tv over its sequence, for devices with a value at every
    token (the bound on the TV distance of the whole output, testbed.results)."""
    fid, device = fidelity(df), df["device"].to_numpy()
    order = np.argsort(device, kind="stable")
    ids, counts = np.unique(device[order], return_counts=True)
    if len(ids) and (counts == counts[0]).all():  # every device the same length (a fleet): one 2-D sum,
        rows = fid[order].reshape(len(ids), counts[0])  # each row summed as numpy sums a group alone
        seq = pd.Series(np.where(np.isfinite(rows).all(axis=1), rows.sum(axis=1), np.nan), index=ids)
    else:
        seq = pd.Series(fid).groupby(device).agg(lambda f: f.sum() if np.isfinite(f).all() else np.nan)
    return seq[np.isfinite(seq)]


def llm_agreement(df: pd.DataFrame) -> float:
    """1 - mean beta over drafted tokens (shadow beta for skipped ones): the expected fraction
    of tokens the LLM would have kept as drafted. NaN without a known beta."""
    beta = df["beta"].to_numpy(float) if "beta" in df else np.full(len(df), np.nan)
    drafted = df["draft_id"].to_numpy() >= 0 if "draft_id" in df else np.ones(len(df), bool)
    beta = beta[drafted & np.isfinite(beta)]
    return float(1 - beta.mean()) if len(beta) else math.nan


def beta_fit(df: pd.DataFrame) -> RejectionFit | None:
    """beta ~ a*u + b (policies.rejection) over drafted tokens with finite u and beta, shadow
    betas included; None when the tokens cannot determine it."""
    u, beta = df["uncertainty"].to_numpy(float), df["beta"].to_numpy(float)
    m = np.isfinite(u) & np.isfinite(beta)
    if "draft_id" in df:
        m &= df["draft_id"].to_numpy() >= 0
    try:
        return fit_rejection_model(u[m], beta[m])
    except DegenerateFitError:
        return None


def token_figures(df: pd.DataFrame, vocab_size: int | None) -> dict:
    """The figures of summary.json shared by the whole run and each tier (None: undefined;
    vocab_compression needs vocab_size)."""
    n = len(df)
    transmitted = df["transmitted"].to_numpy()
    uploads = transmitted & (df["draft_id"].to_numpy() >= 0)
    n_up = int(uploads.sum())
    beta, shadow = df["beta"].to_numpy(), df["beta_is_shadow"].to_numpy()
    real_beta, shadow_beta = beta[~shadow & np.isfinite(beta)], beta[shadow & np.isfinite(beta)]
    fid = fidelity(df)
    known = np.isfinite(fid)
    branch = df["fidelity_tv_branch"].to_numpy(float) if "fidelity_tv_branch" in df else np.full(n, np.nan)
    seq = sequence_fidelity(df)
    uplink = int(df["uplink_bytes"].sum())
    return {
        "tokens": n,
        "skip_rate": num(skip_rate(n - int(transmitted.sum()), n)),
        "acceptance_rate": num(acceptance_rate(int(df["accepted"].to_numpy()[uploads].sum()), n_up)),
        "vocab_compression": num(vocab_compression(df["k"].to_numpy()[uploads].sum(dtype=np.int64), n_up, vocab_size))
        if vocab_size
        else None,
        "uplink_bytes": uplink,
        "uplink_bytes_per_token": num(ratio(uplink, n)),
        "payload_bytes": int(df["payload_bytes"].sum()),
        "uploads": n_up,
        "retransmissions": int(df["retransmissions"].sum()),
        "token_latency_s": latency_percentiles(token_latency(df)),
        "beta_mean": num(real_beta.mean()) if len(real_beta) else None,
        "shadow_beta_mean": num(shadow_beta.mean()) if len(shadow_beta) else None,
        "fidelity_tv_mean": num(fid[known].mean()) if known.any() else None,
        "fidelity_tv_tokens": int(known.sum()),
        "fidelity_tv_sequence_mean": num(seq.mean()) if len(seq) else None,
        "fidelity_tv_sequences": int(len(seq)),
        # the branch measure (an approximation, for comparison) and the tokens that have only it (a plug-in
        # policy without a decision law)
        "fidelity_tv_branch_mean": num(branch[np.isfinite(branch)].mean()) if np.isfinite(branch).any() else None,
        "fidelity_approximate_tokens": int((np.isfinite(branch) & ~known).sum()),
    }
