"""The figures of `testbed reproduce` (PNG), drawn from a study's table rows: the cu-hlm u_th and theta
sweeps, the calibration's fit and reliability, skip rate against fidelity, every policy, the fleets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from testbed.report import new_figure
from testbed.study.analysis import cu_hlm_frontier
from testbed.study.fit import Fit
from testbed.study.sizes import ESTIMATOR


def _na(ax, text: str = "n/a") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="gray")


def _val(x):
    return np.nan if x is None else float(x)


def plot_vs_u_th(
    rows: list[dict],
    refs: dict[str, dict],
    key: str,
    ylabel: str,
    title: str,
    path: Path,
    err: str | None = None,
    percent: bool = False,
    fit: Fit | None = None,
) -> Path:
    """One figure vs u_th: the cu-hlm sweep (risk-averse, fixed values, risk-prone) with reference lines."""
    fig, ax = new_figure(7.2, 4.4)
    a = ax[0][0]
    pts = sorted((r for r in rows if r.get("u_th") is not None), key=lambda r: r["u_th"])
    x = np.array([r["u_th"] for r in pts], float)
    y = np.array([_val(r.get(key)) for r in pts], float)
    scale = 100.0 if percent else 1.0
    if len(x) and np.isfinite(y).any():
        e = np.array([_val(r.get(err)) for r in pts], float) * scale if err else None
        a.errorbar(
            x,
            y * scale,
            yerr=e if e is not None and np.isfinite(e).any() else None,
            marker="o",
            color="#d62728",
            capsize=3,
            label="cu-hlm (u <= u_th skipped)",
        )
        for r in pts:
            if r["label"] != "cu-hlm" and "risk" not in r["label"]:
                continue
            a.annotate(
                r["label"], (r["u_th"], _val(r.get(key)) * scale), textcoords="offset points", xytext=(4, 6), fontsize=8
            )
    else:
        _na(a)
    styles = {
        "hlm": ("#1f77b4", "--"),
        "u-hlm": ("#2ca02c", ":"),
        "slm-only": ("#7f7f7f", "-."),
        "llm-only": ("#9467bd", (0, (6, 2))),
        "rand-hlm": ("#8c564b", (0, (2, 2))),
    }
    for name, r in refs.items():
        v = _val(r.get(key))
        if np.isfinite(v) and name in styles:
            c, ls = styles[name]
            label = f"{name}" + (" (= u_th >= 1)" if name == "slm-only" else "")
            a.axhline(v * scale, color=c, ls=ls, lw=1.2, label=label)
    if fit is not None:
        for v, _label in ((fit.u_th_risk_averse, "risk-averse"), (fit.u_th_risk_prone, "risk-prone")):
            if math.isfinite(v):
                a.axvline(v, color="k", lw=0.8, alpha=0.4)
    a.set_xlabel("skip threshold u_th (temperature perturbation u)")
    a.set_ylabel(ylabel + (" (%)" if percent else ""))
    a.set_title(title)
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return path


def plot_beta_fit(calibration: dict, samples, path: Path) -> Path:
    from testbed.calibrate import plot_beta_fits

    return plot_beta_fits(samples, calibration["fits"], path, ESTIMATOR)


def plot_reliability(calibration: dict, path: Path) -> Path:
    names = list(calibration["reliability"])
    fig, ax = new_figure(4.0 * len(names), 3.8, ncols=len(names))
    for a, name in zip(ax[0], names):
        curve = [c for c in calibration["reliability"][name] if c.get("beta_predicted") is not None]
        a.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
        if not curve:
            _na(a, "no fit")
        else:
            px = [c["beta_predicted"] for c in curve]
            py = [c["beta_observed"] for c in curve]
            n = np.array([c["n"] for c in curve], float)
            a.plot(px, py, color="#d62728", lw=1)
            a.scatter(
                px,
                py,
                s=20 + 180 * n / n.max(),
                color="#d62728",
                edgecolor="k",
                zorder=3,
                label="u bins (size ~ tokens)",
            )
        a.set_xlim(-0.02, 1.02)
        a.set_ylim(-0.02, 1.02)
        a.set_title(f"{name}: observed vs predicted beta")
        a.set_xlabel("predicted beta = clip(a u + b) (bin mean)")
        a.set_ylabel("observed beta (bin mean)")
        a.legend(fontsize=7, loc="upper left")
    fig.savefig(path)
    return path


def _frontier_lines(a, front: list[dict], by: dict[str, list]) -> None:
    """cu-hlm's hull (red, labelled by u_th) and each estimator's adaptive risk budgets (dashed)."""
    colors = {"temperature": "#1f77b4", "max": "#2ca02c"}
    if front:
        a.plot(
            [r["fidelity_tv"] for r in front],
            [100 * r["skip_rate"] for r in front],
            marker="o",
            color="#d62728",
            label="cu-hlm, u_th sweep (upper concave hull)",
        )
        for r in front:
            if r.get("u_th") is not None:
                a.annotate(
                    f"u_th {r['u_th']:.2g}",
                    (r["fidelity_tv"], 100 * r["skip_rate"]),
                    textcoords="offset points",
                    xytext=(5, -10),
                    fontsize=7,
                    color="#d62728",
                )
    for est, rs in by.items():
        rs = sorted(rs, key=lambda r: r.get("risk") or 0.0)
        c = colors.get(est, "#9467bd")
        a.plot(
            [r["fidelity_tv"] for r in rs],
            [100 * r["skip_rate"] for r in rs],
            marker="s",
            ls="--",
            color=c,
            label=f"cu-hlm-adaptive ({est} u), risk budgets",
        )
        for r in rs:
            a.annotate(
                f"{r['risk']:g}",
                (r["fidelity_tv"], 100 * r["skip_rate"]),
                textcoords="offset points",
                xytext=(4, 5),
                fontsize=7,
                color=c,
            )


def _zoom_to_adaptive(a, front: list[dict], by: dict[str, list]) -> None:
    """Limits around the adaptive points and the nearest hull point beyond them."""
    xs = [r["fidelity_tv"] for rs in by.values() for r in rs]
    if not (xs and front):
        return
    beyond = [r["fidelity_tv"] for r in front if r["fidelity_tv"] > max(xs)]
    hi = min(beyond) if beyond else max(xs)
    lo = min(xs + [front[0]["fidelity_tv"]])
    pad = 0.08 * (hi - lo or hi)
    a.set_xlim(lo - pad, hi + pad)
    ys = [
        100 * r["skip_rate"]
        for r in [*front, *(r for rs in by.values() for r in rs)]
        if lo - pad <= r["fidelity_tv"] <= hi + pad
    ]
    a.set_ylim(min(ys) - 5, max(ys) + 5)


def plot_frontier(rows: list[dict], path: Path) -> Path:
    """Skip rate against fidelity: cu-hlm's threshold sweep (the upper concave hull of its points) and
    cu-hlm-adaptive's risk budgets per estimator; up and to the left is better. Left: every point (log
    fidelity); right: the adaptive points' neighbourhood (linear)."""
    fig, ax = new_figure(12, 4.6, ncols=2)
    front = cu_hlm_frontier(rows)
    by: dict[str, list] = {}
    for r in rows:
        if r["policy"] == "cu-hlm-adaptive" and r.get("fidelity_tv") is not None:
            by.setdefault(r.get("estimator") or ESTIMATOR, []).append(r)
    for a, zoom in zip(ax[0], (False, True)):
        _frontier_lines(a, front, by)
        if not zoom:
            for r in rows:
                if r["point"] in ("u-hlm", "rand-hlm") and r.get("fidelity_tv"):
                    a.scatter([r["fidelity_tv"]], [100 * r["skip_rate"]], marker="^", s=40, label=r["point"], zorder=3)
            a.set_xscale("log")
            a.set_xlabel("fidelity: mean TV distance to the LLM per token (log; lower is better)")
            a.set_title("Skip rate vs fidelity: cu-hlm-adaptive and cu-hlm's thresholds")
        else:
            _zoom_to_adaptive(a, front, by)
            a.set_xlabel("fidelity: mean TV distance to the LLM per token (lower is better)")
            a.set_title("Around the adaptive points")
        if not front and not by:
            _na(a)
        a.set_ylabel("transmissions skipped (%)")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7, loc="best")
    fig.savefig(path)
    return path


def plot_theta(rows: list[dict], path: Path) -> Path:
    fig, ax = new_figure(7.2, 4.4)
    a = ax[0][0]
    pts = sorted((r for r in rows if r.get("theta") is not None), key=lambda r: r["theta"])
    x = np.array([r["theta"] for r in pts], float)
    y = np.array([_val(r.get("vocab_compression")) for r in pts], float) * 100
    if len(x) and np.isfinite(y).any():
        a.plot(x, y, marker="o", color="#d62728", label="vocabulary compression")
        a.set_xscale("log")
        b = a.twinx()
        f = np.array([_val(r.get("fidelity_tv")) for r in pts], float)
        if np.isfinite(f).any():
            b.plot(x, f, marker="s", color="#1f77b4", ls="--", label="fidelity (mean TV / token)")
            b.set_ylabel("mean TV distance to the LLM per token")
            b.legend(fontsize=8, loc="lower right")
    else:
        _na(a)
    a.set_xlabel("distortion budget theta (online k*, risk-averse u_th)")
    a.set_ylabel("vocabulary compression (%)")
    a.set_title("Compression vs theta (cu-hlm)")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=8, loc="upper left")
    fig.savefig(path)
    return path


def plot_policies(rows: list[dict], path: Path) -> Path:
    fig, ax = new_figure(11, 4.2, ncols=2)
    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    a = ax[0][0]
    y = [_val(r.get("throughput_ratio_hlm")) for r in rows]
    bars = a.bar(x, y, color="#1f77b4")
    a.bar_label(bars, labels=["n/a" if not np.isfinite(v) else f"{v:.2f}" for v in y], fontsize=7)
    a.set_yscale("log")
    a.set_title("Token throughput / HLM's")
    a.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    a = ax[0][1]
    w = 0.4
    s = [_val(r.get("skip_rate")) * 100 for r in rows]
    c = [_val(r.get("vocab_compression")) * 100 for r in rows]
    a.bar(x - w / 2, s, w, color="#ff7f0e", label="skip rate")
    a.bar(x + w / 2, c, w, color="#2ca02c", label="vocabulary compression")
    a.set_ylim(0, 105)
    a.set_ylabel("%")
    a.set_title("Transmissions skipped and vocabulary compression")
    a.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    a.legend(fontsize=8)
    fig.savefig(path)
    return path


def plot_fleet(rows: list[dict], key: str, ylabel: str, title: str, path: Path, log: bool = False) -> Path:
    fig, ax = new_figure(7.2, 4.4)
    a = ax[0][0]
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    markers = "osD^vP*Xh"
    any_data = False
    for i, (label, rs) in enumerate(by.items()):
        rs = sorted(rs, key=lambda r: r["fleet_size"])
        xs = [r["fleet_size"] for r in rs]
        ys = [_val(r.get(key)) for r in rs]
        if np.isfinite(ys).any():
            any_data = True
            a.plot(xs, ys, marker=markers[i % len(markers)], label=label)
    if not any_data:
        _na(a)
    a.set_xscale("log")
    if log:
        a.set_yscale("log")
    a.set_xlabel("fleet size (devices)")
    a.set_ylabel(ylabel)
    a.set_title(title)
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7, loc="best", ncols=2)
    fig.savefig(path)
    return path


POLICY_COLOURS = {
    "llm-only": "#9467bd",
    "slm-only": "#7f7f7f",
    "hlm": "#1f77b4",
    "rand-hlm": "#8c564b",
    "u-hlm": "#2ca02c",
    "cu-hlm": "#d62728",
    "cu-hlm-adaptive": "#ff7f0e",
    "cu-hlm-offline": "#e377c2",
}
CONTENT_STYLES = {"recorded": "-", "tiny": "--"}
CONTENT_MARKERS = {"recorded": "o", "tiny": "x"}  # where both lines coincide, both markers still show


def plot_panels(
    rows: list[dict], x: str, xlabel: str, panels: list[tuple[str, str]], path: Path, style: str = "content"
) -> Path:
    """A 2x2 figure of rows[key] against rows[x] (log x), one colour per policy, one line style per
    rows[style] (CONTENT_STYLES: solid = recorded content, dashed = tiny random models)."""
    fig, ax = new_figure(10.0, 7.0, ncols=2, nrows=2)
    lines: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        lines.setdefault((r["policy"], r[style]), []).append(r)
    for a, (key, ylabel) in zip(ax.flat, panels):
        drawn = False
        for (policy, kind), rs in lines.items():
            rs = sorted(rs, key=lambda r: r[x])
            ys = [_val(r.get(key)) for r in rs]
            if not np.isfinite(ys).any():
                continue
            drawn = True
            colour = POLICY_COLOURS.get(policy)
            style = {"marker": CONTENT_MARKERS.get(kind, "."), "ls": CONTENT_STYLES.get(kind, ":")}
            a.plot([r[x] for r in rs], ys, ms=5, color=colour, **style)
        if not drawn:
            _na(a)
        a.set_xscale("log")
        xs = sorted({r[x] for r in rows})
        a.set_xticks(xs, [f"{v:,}" for v in xs], fontsize=8)  # the grid's values, not powers of ten
        a.minorticks_off()
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)
    # one legend: colours are policies, line styles are content sources
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=POLICY_COLOURS.get(p), label=p) for p in dict.fromkeys(p for p, _ in lines)]
    handles += [
        Line2D([], [], color="k", ls=CONTENT_STYLES.get(k, ":"), marker=CONTENT_MARKERS.get(k, "."), label=k)
        for k in dict.fromkeys(k for _, k in lines)
    ]
    if handles:
        ax[0][0].legend(handles=handles, fontsize=7, loc="best", ncols=2)
    fig.savefig(path)
    return path
