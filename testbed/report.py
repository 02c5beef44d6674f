"""Run reports: PNG plots and one self-contained HTML page from run directories.

A run directory holds tokens.parquet, summary.json and scenario.yaml (testbed/results.py).
`write_report(run_dirs, out_dir)` draws, for every run:

- throughput: per tier, and per device (fairness, with Jain's index);
- timeline: uploads and skips over emulated time, and a per-device raster of both;
- uncertainty vs beta: observed beta of uploads and shadow beta of skipped tokens, the fitted
  line beta ~ a*u + b, the paper's line, the risk-averse threshold u_th = -b/a;
- k and payload distributions of the uploads;
- token latency CDF per tier with p50/p95/p99;

and, when several runs are given, policies side by side: throughput vs accuracy proxy vs uplink
bytes. Accuracy proxies: the acceptance rate (accepted / uploaded drafts) and the LLM agreement,
1 - mean beta over all drafted tokens (shadow beta for skipped ones): the expected fraction of
tokens the LLM would have kept as drafted. Fidelity (exact, no sampling noise; docs/design.md section 7)
is a table row: the mean per-token TV distance to the LLM's distribution, and its sum over a
device's sequence (mean over devices), which bounds how far the law of a device's output is
from the LLM's (testbed/results.py defines both).

The PNGs are written next to report.html, which embeds them (base64): the page stands alone.
Matplotlib is used through its object API (no pyplot, no global state).
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from policies.rejection import PAPER_A, PAPER_B  # beta ~ a*u + b, TinyLlama/Llama-2 (the paper)
from testbed import figures as F
from testbed.results import format_bytes

DPI = 110
MAX_RASTER_DEVICES = 40
MAX_SCATTER = 20_000
MAX_DEVICE_BARS = 64
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
UPLOAD_COLOR, SKIP_COLOR = "#1f77b4", "#ff7f0e"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    tokens: pd.DataFrame
    summary: dict
    scenario_text: str
    label: str = ""
    tiers: list[str] = field(default_factory=list)

    @property
    def policies(self) -> list[str]:
        return list(dict.fromkeys(self.tokens["policy"].astype(str)))

    @property
    def emulated_seconds(self) -> float:
        e = self.summary.get("emulated_seconds")
        if e:
            return float(e)
        return float(self.tokens["t_commit"].max()) if len(self.tokens) else 0.0


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories; a directory without summary.json whose subdirectories are runs (a sweep)
    stands for those subdirectories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file() or (p / "tokens.parquet").is_file():
            out.append(p)
            continue
        subs = sorted(q for q in p.iterdir() if q.is_dir() and (q / "summary.json").is_file()) if p.is_dir() else []
        if not subs:
            raise FileNotFoundError(f"{p}: not a run directory (no summary.json / tokens.parquet, no runs inside)")
        out.extend(subs)
    return out


def load_run(path: str | Path) -> Run:
    path = Path(path)
    tokens_path = path / "tokens.parquet"
    if not tokens_path.is_file():
        raise FileNotFoundError(f"{tokens_path} missing")
    import pyarrow.parquet as pq

    from testbed.results import REPORT_COLUMNS, read_tokens

    # Only the columns the figures read: a 10,000-device run's every column would not fit the driver's
    # memory budget (issue 9: driver under 1 GB). Files from before a column existed are read whole.
    have = set(pq.read_schema(tokens_path).names)
    tokens = read_tokens(tokens_path, REPORT_COLUMNS) if have >= set(REPORT_COLUMNS) else pd.read_parquet(tokens_path)
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    scen = path / "scenario.yaml"
    text = scen.read_text(encoding="utf-8") if scen.is_file() else ""
    run = Run(path, tokens, summary, text)
    run.tiers = list(dict.fromkeys(tokens["tier"].astype(str)))
    return run


def _label_runs(runs: list[Run]) -> None:
    for r in runs:
        name = r.summary.get("scenario") or r.summary.get("name") or r.path.name
        r.label = "+".join(r.policies) or str(name)
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"


# ---------------------------------------------------------------------------------------------
# Figures: summary.json's where it has them, else computed from the tokens (testbed.figures)
# ---------------------------------------------------------------------------------------------
def run_figures(run: Run) -> dict[str, Any]:
    """The figures the report shows for one run (summary values, computed ones where absent)."""
    df, s = run.tokens, run.summary
    emu = run.emulated_seconds
    n = len(df)
    computed = F.token_figures(df, s.get("vocab_size"))
    lat = computed["token_latency_s"]
    per_dev = F.device_throughput(df, emu or 1.0) if n else pd.Series(dtype=float)
    thr = s.get("throughput_tokens_per_s") or {}

    def pick(key, value):
        v = s.get(key)
        return value if v is None else v

    lat_s = s.get("token_latency_s") or {}
    return {
        "tokens": pick("tokens", n),
        "emulated_seconds": emu,
        "wall_seconds": s.get("wall_seconds"),
        "throughput": thr.get("system") if isinstance(thr, dict) and thr.get("system") is not None else F.num(F.ratio(n, emu)),
        "skip_rate": pick("skip_rate", computed["skip_rate"]),
        "acceptance_rate": pick("acceptance_rate", computed["acceptance_rate"]),
        "llm_agreement": F.num(F.llm_agreement(df)),
        "vocab_compression": pick("vocab_compression", computed["vocab_compression"]),
        "uplink_bytes": pick("uplink_bytes", computed["uplink_bytes"]),
        "uplink_bytes_per_token": pick("uplink_bytes_per_token", computed["uplink_bytes_per_token"]),
        "latency_p50": lat_s.get("p50", lat["p50"]),
        "latency_p95": lat_s.get("p95", lat["p95"]),
        "latency_p99": lat_s.get("p99", lat["p99"]),
        "jain_fairness": pick("jain_fairness", F.num(F.jain(per_dev.to_numpy()))),
        "verifier_batch_size_mean": s.get("verifier_batch_size_mean"),
        "devices": int(df["device"].nunique()) if n else 0,
        "fidelity_tv_mean": pick("fidelity_tv_mean", computed["fidelity_tv_mean"]),
        "fidelity_tv_sequence_mean": pick("fidelity_tv_sequence_mean", computed["fidelity_tv_sequence_mean"]),
        "fidelity_tv_branch_mean": pick("fidelity_tv_branch_mean", computed["fidelity_tv_branch_mean"]),
        "fidelity_approximate_tokens": pick("fidelity_approximate_tokens", computed["fidelity_approximate_tokens"]),
    }


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def new_figure(w: float, h: float, ncols: int = 1, nrows: int = 1, dpi: int = DPI, **kw):
    """A matplotlib Figure (object API, no pyplot state) and its axes grid, gridded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _tier_colors(tiers: Sequence[str]) -> dict[str, str]:
    return {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(tiers)}


def _tier_label(run: Run, tier: str) -> str:
    pol = run.tokens.loc[run.tokens["tier"] == tier, "policy"].astype(str).unique()
    return f"{tier} ({', '.join(pol)})"


def plot_throughput(run: Run, path: Path) -> Path:
    df, emu = run.tokens, run.emulated_seconds
    colors = _tier_colors(run.tiers)
    per_dev = F.device_throughput(df, emu or 1.0)
    dev_tier = df.groupby("device", sort=True)["tier"].first().astype(str)
    tier_thr = (run.summary.get("throughput_tokens_per_s") or {}).get("tiers") or {}
    fig, ax = new_figure(11, 4.2, ncols=2, width_ratios=[1, 2.2])
    a0, a1 = ax[0]
    vals = [tier_thr.get(t) for t in run.tiers]
    vals = [F.span_throughput(df[df["tier"] == t], emu) if v is None else v for t, v in zip(run.tiers, vals)]
    bars = a0.bar(range(len(run.tiers)), vals, color=[colors[t] for t in run.tiers])
    a0.bar_label(bars, fmt="%.1f", fontsize=9)
    a0.set_xticks(range(len(run.tiers)), [_tier_label(run, t) for t in run.tiers], rotation=15, ha="right")
    a0.set_ylabel("tokens / emulated s")
    a0.set_title("Throughput per tier")
    a0.margins(y=0.15)
    # per device, grouped by tier
    order = sorted(per_dev.index, key=lambda d: (run.tiers.index(dev_tier[d]), d))
    y = per_dev.loc[order].to_numpy()
    c = [colors[dev_tier[d]] for d in order]
    if len(order) <= MAX_DEVICE_BARS:
        a1.bar(range(len(order)), y, color=c)
        a1.set_xticks(range(len(order)), [str(d) for d in order], fontsize=7 if len(order) > 24 else 9,
                      rotation=90 if len(order) > 24 else 0)
        a1.set_xlabel("device")
    else:
        a1.scatter(range(len(order)), y, c=c, s=6)
        a1.set_xlabel(f"device (grouped by tier, {len(order)} devices)")
    a1.axhline(float(np.mean(y)), color="k", lw=1, ls="--", label=f"mean {np.mean(y):.1f}")
    j = run.summary.get("jain_fairness")
    j = F.jain(y) if j is None else j
    a1.set_title(f"Throughput per device (own span)   Jain fairness = {j:.3f}")
    a1.set_ylabel("tokens / emulated s")
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[t], label=_tier_label(run, t)) for t in run.tiers]
    a1.legend(handles=handles + a1.get_legend_handles_labels()[0], fontsize=8, loc="lower right")
    a1.set_ylim(0, max(y) * 1.12 if len(y) else 1)
    return _save(fig, path)


def plot_timeline(run: Run, path: Path) -> Path:
    df = run.tokens
    fig, ax = new_figure(11, 5.6, nrows=2, height_ratios=[1, 1.3], sharex=True)
    a0, a1 = ax[0][0], ax[1][0]
    t = df["t_commit"].to_numpy(float)
    tx = df["transmitted"].to_numpy(bool)
    end = float(np.nanmax(t)) if len(t) else 1.0
    bins = np.linspace(0, end, min(80, max(20, len(t) // 20)) + 1)
    width = bins[1] - bins[0]
    up, _ = np.histogram(t[tx], bins)
    sk, _ = np.histogram(t[~tx], bins)
    mid = (bins[:-1] + bins[1:]) / 2
    a0.bar(bins[:-1], up / width, width, align="edge", color=UPLOAD_COLOR, alpha=0.85, label="uploaded")
    a0.bar(bins[:-1], sk / width, width, bottom=up / width, align="edge", color=SKIP_COLOR, alpha=0.85, label="skipped")
    a0.set_ylabel("tokens / emulated s")
    a0r = a0.twinx()
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = sk / (up + sk)
    a0r.plot(mid, rate, color="k", lw=1.2, marker=".", ms=4, label="skip rate")
    a0r.set_ylim(0, 1.05)
    a0r.set_ylabel("skip rate")
    h0, l0 = a0.get_legend_handles_labels()
    h1, l1 = a0r.get_legend_handles_labels()
    a0.legend(h0 + h1, l0 + l1, loc="upper right", fontsize=8, ncols=3)
    a0.set_title("Uploads and skips over emulated time")
    # raster
    devices = sorted(df["device"].unique())
    if len(devices) > MAX_RASTER_DEVICES:
        idx = np.linspace(0, len(devices) - 1, MAX_RASTER_DEVICES).round().astype(int)
        devices = [devices[i] for i in idx]
    sub = df[df["device"].isin(devices)]
    pos = {d: i for i, d in enumerate(devices)}
    yy = sub["device"].map(pos).to_numpy()
    stx = sub["transmitted"].to_numpy(bool)
    a1.scatter(sub["t_commit"].to_numpy()[stx], yy[stx], marker="|", s=40, color=UPLOAD_COLOR, label="uploaded", lw=1)
    a1.scatter(sub["t_commit"].to_numpy()[~stx], yy[~stx], marker="|", s=40, color=SKIP_COLOR, label="skipped", lw=1)
    dev_tier = df.groupby("device")["tier"].first().astype(str)
    step = max(1, math.ceil(len(devices) / 16))  # at most ~16 readable labels
    ticks = list(range(0, len(devices), step))
    a1.set_yticks(ticks, [f"{devices[i]} {dev_tier[devices[i]]}" for i in ticks], fontsize=8)
    a1.set_ylim(-0.7, len(devices) - 0.3)
    a1.invert_yaxis()
    a1.set_xlabel("emulated time (s)")
    a1.set_title("Tokens per device (commit time)" + (f", {len(devices)} of {df['device'].nunique()} devices"
                                                       if len(devices) < df["device"].nunique() else ""))
    a1.legend(loc="upper right", fontsize=8, ncols=2)
    return _save(fig, path)


def plot_uncertainty_beta(run: Run, path: Path) -> Path:
    df = run.tokens
    fig, ax = new_figure(7.5, 5.2)
    a = ax[0][0]
    m = np.isfinite(df["uncertainty"].to_numpy(float)) & np.isfinite(df["beta"].to_numpy(float))
    d = df[m]
    if len(d) > MAX_SCATTER:
        d = d.sample(MAX_SCATTER, random_state=0)
    rng = np.random.default_rng(0)
    u = d["uncertainty"].to_numpy(float)
    jitter = rng.uniform(-0.008, 0.008, len(u))
    shadow = d["beta_is_shadow"].to_numpy(bool) if "beta_is_shadow" in d else np.zeros(len(d), bool)
    b = d["beta"].to_numpy(float)
    a.scatter(u[~shadow] + jitter[~shadow], b[~shadow], s=9, alpha=0.35, color=UPLOAD_COLOR, label="beta (uploaded)")
    a.scatter(u[shadow] + jitter[shadow], b[shadow], s=9, alpha=0.35, color=SKIP_COLOR, label="shadow beta (skipped)")
    # mean beta per uncertainty level
    full = df[m]
    if len(full):
        means = full.groupby(full["uncertainty"].round(3))["beta"].mean()
        a.plot(means.index, means.to_numpy(), "o", color="k", ms=4, label="mean beta per u")
    xs = np.linspace(0, 1, 50)
    fit = F.beta_fit(df)
    if fit is not None:
        fa, fb, n = fit.a, fit.b, fit.n
        a.plot(xs, np.clip(fa * xs + fb, -0.05, 1.05), color="#d62728", lw=2,
               label=f"fit: beta = {fa:.3f} u {'+' if fb >= 0 else '-'} {abs(fb):.3f}  (n={n})")
        if fa > 0 and 0 < -fb / fa < 1:
            a.axvline(-fb / fa, color="#d62728", ls=":", lw=1.2, label=f"risk-averse u_th = -b/a = {-fb / fa:.3f}")
    a.plot(xs, np.clip(PAPER_A * xs + PAPER_B, -0.05, 1.05), color="gray", ls="--", lw=1.2,
           label=f"paper: {PAPER_A} u - {abs(PAPER_B)}")
    a.set_xlim(-0.03, 1.03)
    a.set_ylim(-0.05, 1.05)
    a.set_xlabel("uncertainty u")
    a.set_ylabel("rejection probability beta")
    a.set_title("Uncertainty vs rejection probability")
    a.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_k_payload(run: Run, path: Path) -> Path:
    df = run.tokens
    up = df[df["transmitted"].to_numpy(bool) & (df["k"].to_numpy() > 0)]
    colors = _tier_colors(run.tiers)
    fig, ax = new_figure(11, 4.2, ncols=2)
    for a, col, xlabel, title in ((ax[0][0], "k", "vocabulary entries k per upload", "Entries per upload (k)"),
                                  (ax[0][1], "payload_bytes", "payload bytes per upload", "Payload per upload")):
        vals = up[col].to_numpy(float)
        vals = vals[vals > 0]
        if len(vals) == 0:
            a.text(0.5, 0.5, "no uploads", ha="center", va="center", transform=a.transAxes)
            a.set_title(title)
            continue
        lo, hi = max(1.0, vals.min()), vals.max()
        bins = np.logspace(np.log10(lo) - 0.05, np.log10(hi) + 0.05, 40)
        data, cs, labels = [], [], []
        for t in run.tiers:
            v = up.loc[up["tier"] == t, col].to_numpy(float)
            v = v[v > 0]
            if len(v):
                data.append(v)
                cs.append(colors[t])
                med = np.median(v)
                labels.append(f"{_tier_label(run, t)}  median {med:,.0f}")
        a.hist(data, bins=bins, stacked=True, color=cs, label=labels)
        a.set_xscale("log")
        a.set_xlabel(xlabel)
        a.set_ylabel("uploads")
        a.set_title(title)
        a.legend(fontsize=8)
    return _save(fig, path)


CDF_POINTS = 2000  # a CDF plotted through this many order statistics: the picture, not 640k vertices


def _cdf(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, F(x)) at up to CDF_POINTS evenly spaced ranks of sorted values, the last one included."""
    n = len(sorted_values)
    idx = np.unique(np.linspace(0, n - 1, min(n, CDF_POINTS)).astype(np.int64))
    return sorted_values[idx], (idx + 1) / n


def plot_latency_cdf(run: Run, path: Path) -> Path:
    df = run.tokens
    colors = _tier_colors(run.tiers)
    fig, ax = new_figure(8.5, 4.8)
    a = ax[0][0]
    lat_all = F.token_latency(df) * 1000
    for t in run.tiers:
        lat = np.sort(F.token_latency(df[df["tier"] == t]) * 1000)
        if len(lat):
            a.step(*_cdf(lat), where="post", color=colors[t], lw=1.6, label=_tier_label(run, t))
    if len(lat_all):
        s = np.sort(lat_all)
        a.step(*_cdf(s), where="post", color="k", lw=1.2, ls="--", label="all")
        for q, ls in zip(F.LATENCY_QUANTILES, (":", "-.", (0, (6, 2)))):
            v = float(np.percentile(lat_all, q))
            a.axvline(v, color="dimgray", ls=ls, lw=1.1, label=f"all p{q} = {v:.1f} ms")
        if s[-1] / max(s[0], 1e-9) > 50:
            a.set_xscale("log")
    a.set_ylim(0, 1.02)
    a.set_xlabel("token latency, draft start to commit (emulated ms)")
    a.set_ylabel("fraction of tokens")
    a.set_title("Token latency CDF")
    a.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_policies(runs: list[Run], figs: list[dict], path: Path) -> Path:
    fig, ax = new_figure(12, 8, ncols=2, nrows=2)
    labels = [r.label for r in runs]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(runs))]
    thr = [f["throughput"] for f in figs]
    upb = [f["uplink_bytes_per_token"] for f in figs]
    acc = [f["acceptance_rate"] for f in figs]
    agr = [f["llm_agreement"] for f in figs]
    proxy = [g if g is not None else a for g, a in zip(agr, acc)]
    proxy_name = "LLM agreement (1 - mean beta)" if any(g is not None for g in agr) else "acceptance rate"
    markers = "osD^vP*X"
    # the trade-off: throughput against accuracy, and against uplink cost (same colours)
    for i, lab in enumerate(labels):
        if thr[i] is None:
            continue
        kw = dict(s=110, color=colors[i], marker=markers[i % len(markers)], edgecolor="k", zorder=3)
        if proxy[i] is not None:
            ax[0][0].scatter([proxy[i]], [thr[i]], label=f"{lab}: {thr[i]:.1f} tok/s", **kw)
        if upb[i]:
            ax[0][1].scatter([upb[i]], [thr[i]], label=f"{lab}: {format_bytes(upb[i])} / token", **kw)
    a = ax[0][0]
    a.set_xlabel(proxy_name)
    a.set_ylabel("throughput (tokens / emulated s)")
    a.set_title("Throughput vs accuracy proxy")
    a.margins(x=0.25, y=0.2)
    a.legend(fontsize=8, loc="best")
    a = ax[0][1]
    a.set_xscale("log")
    a.set_xlabel("uplink bytes per token (log)")
    a.set_ylabel("throughput (tokens / emulated s)")
    a.set_title("Throughput vs uplink cost")
    a.margins(x=0.25, y=0.2)
    a.legend(fontsize=8, loc="best")
    # the figures as bars
    a = ax[1][0]
    x = np.arange(len(runs))
    w = 0.38
    accv = [np.nan if v is None else v for v in acc]
    agrv = [np.nan if v is None else v for v in agr]
    b1 = a.bar(x - w / 2, accv, w, color="#4c72b0", label="acceptance rate (uploaded drafts)")
    b2 = a.bar(x + w / 2, agrv, w, color="#55a868", label="LLM agreement (1 - mean beta)")
    for b, v in ((b1, accv), (b2, agrv)):
        a.bar_label(b, labels=["-" if np.isnan(y) else f"{y:.2f}" for y in v], fontsize=8)
    a.set_xticks(x, labels, rotation=15 if len(runs) > 3 else 0, ha="right" if len(runs) > 3 else "center", fontsize=9)
    a.set_ylim(0, 1.18)
    a.set_title("Accuracy proxies")
    a.legend(fontsize=8, loc="upper left", ncols=2)
    a = ax[1][1]
    v = [np.nan if y is None else y for y in upb]
    b = a.bar(x, v, color=colors)
    a.bar_label(b, labels=["-" if np.isnan(y) else format_bytes(y) for y in v], fontsize=8)
    a.set_xticks(x, labels, rotation=15 if len(runs) > 3 else 0, ha="right" if len(runs) > 3 else "center", fontsize=9)
    a.set_yscale("log")
    a.set_ylabel("bytes (log)")
    a.set_title("Uplink bytes per token")
    a.margins(y=0.15)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
def format_value(v: Any, kind: str = "2", missing: str = "-") -> str:
    """One figure as the reports print it (this report and testbed.reproduce_report's): kind pct, bytes,
    ms, s, int, x (a ratio), 3 or 2 (decimals), e (scientific); `missing` for None or not finite."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "bytes":
        return format_bytes(v)
    if kind == "ms":
        return f"{1000 * v:.1f} ms"
    if kind == "s":
        return f"{v:.2f} s"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "3":
        return f"{v:.3f}"
    if kind == "e":
        return f"{v:.2e}"
    return f"{v:.2f}"


ROWS = [
    ("emulated time", "emulated_seconds", "s"), ("wall time", "wall_seconds", "s"), ("devices", "devices", "int"),
    ("tokens", "tokens", "int"), ("throughput (tokens / emulated s)", "throughput", "2"),
    ("skip rate", "skip_rate", "pct"), ("acceptance rate", "acceptance_rate", "pct"),
    ("LLM agreement (1 - mean beta)", "llm_agreement", "3"),
    ("fidelity: TV to the LLM per token (mean)", "fidelity_tv_mean", "e"),
    ("fidelity: TV summed over a sequence (mean over devices)", "fidelity_tv_sequence_mean", "e"),
    ("fidelity of the branch taken (the approximation; per token, mean)", "fidelity_tv_branch_mean", "e"),
    ("tokens with only that approximation (a policy without a decision law)", "fidelity_approximate_tokens", "int"),
    ("vocabulary compression", "vocab_compression", "pct"),
    ("uplink bytes", "uplink_bytes", "bytes"), ("uplink bytes / token", "uplink_bytes_per_token", "bytes"),
    ("latency p50", "latency_p50", "ms"), ("latency p95", "latency_p95", "ms"), ("latency p99", "latency_p99", "ms"),
    ("Jain fairness", "jain_fairness", "3"), ("verifier batch size (mean)", "verifier_batch_size_mean", "2"),
]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1240px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:36px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{margin:22px 0 6px}table{border-collapse:collapse;margin:8px 0 16px;font-size:0.92em}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
figure{margin:10px 0 22px}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:0.9em}
.muted{color:#666;font-size:0.9em}details pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:0.85em}
.paper{color:#8c564b}
"""

CAPTIONS = {
    "throughput": "Throughput per tier and per device (tokens over the device's own span, draft start of its first "
                  "token to its last commit); Jain's index 1 = all devices equally served.",
    "timeline": "Top: tokens committed per emulated second, uploaded vs skipped, and the skip rate. Bottom: every "
                "token of (a sample of) devices at its commit time.",
    "uncertainty_beta": "Rejection probability beta = max(0, 1 - y_d/x_d) against the uncertainty u of the draft; "
                        "skipped tokens show the shadow beta the LLM would have had. Red: least-squares fit, whose "
                        "zero crossing is the risk-averse threshold.",
    "k_payload": "Vocabulary entries and payload bytes of every upload, stacked by tier (log scale).",
    "latency_cdf": "Distribution of token latency (emulated), per tier and overall, with p50/p95/p99.",
    "policies": "Runs side by side: throughput against uplink cost (marker size grows with the accuracy proxy), and "
                "each figure as bars. LLM agreement = 1 - mean beta over drafted tokens (shadow beta for skipped).",
}


def html_figure(path: Path, caption: str, title: str = "") -> str:
    """A PNG embedded in the page (data-plot: its file name), with its caption (and bold title)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    head = f"<b>{html.escape(title)}.</b> " if title else ""
    return (f'<figure><img alt="{html.escape(title or path.stem)}" data-plot="{html.escape(path.name)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{head}{html.escape(caption)}</figcaption></figure>')


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] | None = None) -> str:
    """A table of text cells (escaped); `classes`: a CSS class per row ("" for none)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        cls = f" class='{classes[i]}'" if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def html_page(title: str, parts: Sequence[str]) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def _tier_table(run: Run) -> str:
    tiers = run.summary.get("tiers") or {}
    if not tiers:
        return ""
    cols = [("devices", "devices", "int"), ("policy", "policy", "str"), ("tokens", "tokens", "int"),
            ("throughput", "throughput_tokens_per_s", "2"), ("skip", "skip_rate", "pct"),
            ("acceptance", "acceptance_rate", "pct"), ("compression", "vocab_compression", "pct"),
            ("uplink / token", "uplink_bytes_per_token", "bytes"), ("Jain", "jain_fairness", "3"),
            ("fidelity TV / token", "fidelity_tv_mean", "e"), ("fidelity TV / sequence", "fidelity_tv_sequence_mean", "e")]
    rows = []
    for t, b in tiers.items():
        row = [t]
        for _, key, kind in cols:
            v = b.get(key)
            row.append(str(v) if kind == "str" and v is not None else format_value(v, kind))
        lat = (b.get("token_latency_s") or {}).get("p95")
        row.append(format_value(lat, "ms"))
        rows.append(row)
    return html_table(["tier"] + [c[0] for c in cols] + ["latency p95"], rows)


PLOTS = [
    ("throughput", "Throughput and fairness", plot_throughput),
    ("timeline", "Skip / upload timeline", plot_timeline),
    ("uncertainty_beta", "Uncertainty vs beta", plot_uncertainty_beta),
    ("k_payload", "k and payload distributions", plot_k_payload),
    ("latency_cdf", "Token latency CDF", plot_latency_cdf),
]


def _slug(s: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in s).strip("-")
    return out or "run"


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Plots (PNG) and report.html for one or several run directories; returns the HTML path."""
    dirs = expand_run_dirs(run_dirs)
    if not dirs:
        raise ValueError("write_report: no run directories")
    runs = [load_run(d) for d in dirs]
    _label_runs(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = [run_figures(r) for r in runs]
    parts = [f"<h1>HLM testbed report</h1><p class='muted'>{len(runs)} run(s): "
             + ", ".join(html.escape(str(r.path)) for r in runs) + "</p>"]
    if len(runs) > 1:
        p = plot_policies(runs, figs, out / "policies.png")
        parts.append("<h2>Policies side by side</h2>")
        parts.append(html_table(["", *[r.label for r in runs]],
                                [[name, *(format_value(f.get(key), kind) for f in figs)] for name, key, kind in ROWS]))
        parts.append(html_figure(p, CAPTIONS["policies"], "Throughput vs accuracy proxy vs uplink bytes"))
    used: set[str] = set()
    for run, f in zip(runs, figs):
        prefix = _slug(run.label if len(runs) > 1 else "")
        while prefix in used:
            prefix += "_"
        used.add(prefix)
        name = run.summary.get("scenario") or run.summary.get("name") or run.path.name
        parts.append(f"<h2>{html.escape(run.label)}</h2><p class='muted'>{html.escape(str(run.path))} · scenario "
                     f"{html.escape(str(name))} · policies {html.escape(', '.join(run.policies))}</p>")
        parts.append(html_table(["figure", "value"], [[n, format_value(f.get(k), kind)] for n, k, kind in ROWS]))
        parts.append(_tier_table(run))
        for key, title, fn in PLOTS:
            png = out / (f"{prefix}_{key}.png" if len(runs) > 1 else f"{key}.png")
            fn(run, png)
            parts.append(f"<h3>{html.escape(title)}</h3>" + html_figure(png, CAPTIONS.get(key, ""), title))
        if run.scenario_text:
            parts.append(f"<details><summary>scenario.yaml</summary><pre>{html.escape(run.scenario_text)}</pre></details>")
    page = html_page("HLM testbed report", parts)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
