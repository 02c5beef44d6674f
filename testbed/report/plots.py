"""The report's plots (PNG), one function per figure, each drawing one run (testbed.report.data.Run)
or several side by side.

Numbers come from the run's summary.json and its derived tables (testbed.report.data); the plots
read the tokens only to draw their distributions (timeline, rasters, scatter, histograms, CDF).
Matplotlib is used through its object API (no pyplot, no global state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from policies.rejection import PAPER_A, PAPER_B  # beta ~ a*u + b, TinyLlama/Llama-2 (the paper)
from testbed import figures as F
from testbed.report.data import Run
from testbed.results import format_bytes

DPI = 110
MAX_RASTER_DEVICES = 40
MAX_SCATTER = 20_000
MAX_DEVICE_BARS = 64
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
UPLOAD_COLOR, SKIP_COLOR = "#1f77b4", "#ff7f0e"


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


def _nan(v: float | None) -> float:
    """None (summary.json's undefined) as NaN, which matplotlib draws as nothing."""
    return math.nan if v is None else v


def _tier_colors(tiers: Sequence[str]) -> dict[str, str]:
    return {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(tiers)}


def plot_throughput(run: Run, path: Path) -> Path:
    colors = _tier_colors(run.tiers)
    per_dev, dev_tier = run.device_throughput, run.device_tier
    tier_thr = run.summary["throughput_tokens_per_s"]["tiers"]
    fig, ax = new_figure(11, 4.2, ncols=2, width_ratios=[1, 2.2])
    a0, a1 = ax[0]
    vals = [_nan(tier_thr.get(t)) for t in run.tiers]
    bars = a0.bar(range(len(run.tiers)), vals, color=[colors[t] for t in run.tiers])
    a0.bar_label(bars, fmt="%.1f", fontsize=9)
    a0.set_xticks(range(len(run.tiers)), [run.tier_labels[t] for t in run.tiers], rotation=15, ha="right")
    a0.set_ylabel("tokens / emulated s")
    a0.set_title("Throughput per tier")
    a0.margins(y=0.15)
    # per device, grouped by tier
    order = sorted(per_dev.index, key=lambda d: (run.tiers.index(dev_tier[d]), d))
    y = per_dev.loc[order].to_numpy()
    c = [colors[dev_tier[d]] for d in order]
    if len(order) <= MAX_DEVICE_BARS:
        a1.bar(range(len(order)), y, color=c)
        a1.set_xticks(
            range(len(order)),
            [str(d) for d in order],
            fontsize=7 if len(order) > 24 else 9,
            rotation=90 if len(order) > 24 else 0,
        )
        a1.set_xlabel("device")
    else:
        a1.scatter(range(len(order)), y, c=c, s=6)
        a1.set_xlabel(f"device (grouped by tier, {len(order)} devices)")
    a1.axhline(float(np.mean(y)), color="k", lw=1, ls="--", label=f"mean {np.mean(y):.1f}")
    a1.set_title(f"Throughput per device (own span)   Jain fairness = {_nan(run.summary['jain_fairness']):.3f}")
    a1.set_ylabel("tokens / emulated s")
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[t], label=run.tier_labels[t]) for t in run.tiers]
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
    dev_tier = run.device_tier
    step = max(1, math.ceil(len(devices) / 16))  # at most ~16 readable labels
    ticks = list(range(0, len(devices), step))
    a1.set_yticks(ticks, [f"{devices[i]} {dev_tier[devices[i]]}" for i in ticks], fontsize=8)
    a1.set_ylim(-0.7, len(devices) - 0.3)
    a1.invert_yaxis()
    a1.set_xlabel("emulated time (s)")
    a1.set_title(
        "Tokens per device (commit time)"
        + (f", {len(devices)} of {df['device'].nunique()} devices" if len(devices) < df["device"].nunique() else "")
    )
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
    fit = run.fit
    if fit is not None:
        fa, fb, n = fit.a, fit.b, fit.n
        a.plot(
            xs,
            np.clip(fa * xs + fb, -0.05, 1.05),
            color="#d62728",
            lw=2,
            label=f"fit: beta = {fa:.3f} u {'+' if fb >= 0 else '-'} {abs(fb):.3f}  (n={n})",
        )
        if fa > 0 and 0 < -fb / fa < 1:
            a.axvline(-fb / fa, color="#d62728", ls=":", lw=1.2, label=f"risk-averse u_th = -b/a = {-fb / fa:.3f}")
    a.plot(
        xs,
        np.clip(PAPER_A * xs + PAPER_B, -0.05, 1.05),
        color="gray",
        ls="--",
        lw=1.2,
        label=f"paper: {PAPER_A} u - {abs(PAPER_B)}",
    )
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
    for a, col, xlabel, title in (
        (ax[0][0], "k", "vocabulary entries k per upload", "Entries per upload (k)"),
        (ax[0][1], "payload_bytes", "payload bytes per upload", "Payload per upload"),
    ):
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
                labels.append(f"{run.tier_labels[t]}  median {med:,.0f}")
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
            a.step(*_cdf(lat), where="post", color=colors[t], lw=1.6, label=run.tier_labels[t])
    if len(lat_all):
        s = np.sort(lat_all)
        a.step(*_cdf(s), where="post", color="k", lw=1.2, ls="--", label="all")
        for q, ls in zip(F.LATENCY_QUANTILES, (":", "-.", (0, (6, 2))), strict=True):
            v = 1000 * run.summary["token_latency_s"][f"p{q}"]  # summary.json's percentiles, in ms
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
    proxy = [g if g is not None else a for g, a in zip(agr, acc, strict=True)]
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


PLOTS = [  # (file key, title, draw): every run's plots, in page order
    ("throughput", "Throughput and fairness", plot_throughput),
    ("timeline", "Skip / upload timeline", plot_timeline),
    ("uncertainty_beta", "Uncertainty vs beta", plot_uncertainty_beta),
    ("k_payload", "k and payload distributions", plot_k_payload),
    ("latency_cdf", "Token latency CDF", plot_latency_cdf),
]
