"""The report's page: one self-contained HTML file (report.html) with the figures' table, the
per-tier table and the plots embedded as base64 PNGs; and the helpers the other reports share
(format_value, html_figure, html_table, html_page: testbed.study.report, testbed.study.sweep,
testbed.study.bootstrap).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from testbed.report.data import Run, expand_run_dirs, label_runs, load_run, run_figures
from testbed.report.plots import PLOTS, plot_policies
from testbed.results import format_bytes


def format_value(v: Any, kind: str = "2", missing: str = "-") -> str:
    """One figure as the reports print it (this report and testbed.study.report's): kind pct, bytes,
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


ROWS = [  # (row name, key of data.run_figures, format_value kind)
    ("emulated time", "emulated_seconds", "s"),
    ("wall time", "wall_seconds", "s"),
    ("devices", "devices", "int"),
    ("tokens", "tokens", "int"),
    ("throughput (tokens / emulated s)", "throughput", "2"),
    ("skip rate", "skip_rate", "pct"),
    ("acceptance rate", "acceptance_rate", "pct"),
    ("LLM agreement (1 - mean beta)", "llm_agreement", "3"),
    ("fidelity: TV to the LLM per token (mean)", "fidelity_tv_mean", "e"),
    ("fidelity: TV summed over a sequence (mean over devices)", "fidelity_tv_sequence_mean", "e"),
    ("fidelity of the branch taken (the approximation; per token, mean)", "fidelity_tv_branch_mean", "e"),
    ("tokens with only that approximation (a policy without a decision law)", "fidelity_approximate_tokens", "int"),
    ("vocabulary compression", "vocab_compression", "pct"),
    ("uplink bytes", "uplink_bytes", "bytes"),
    ("uplink bytes / token", "uplink_bytes_per_token", "bytes"),
    ("latency p50", "latency_p50", "ms"),
    ("latency p95", "latency_p95", "ms"),
    ("latency p99", "latency_p99", "ms"),
    ("Jain fairness", "jain_fairness", "3"),
    ("verifier batch size (mean)", "verifier_batch_size_mean", "2"),
]

TIER_COLUMNS = [  # (column, key of summary.json's tier block, kind); "str": the value as is
    ("devices", "devices", "int"),
    ("policy", "policy", "str"),
    ("tokens", "tokens", "int"),
    ("throughput", "throughput_tokens_per_s", "2"),
    ("skip", "skip_rate", "pct"),
    ("acceptance", "acceptance_rate", "pct"),
    ("compression", "vocab_compression", "pct"),
    ("uplink / token", "uplink_bytes_per_token", "bytes"),
    ("Jain", "jain_fairness", "3"),
    ("fidelity TV / token", "fidelity_tv_mean", "e"),
    ("fidelity TV / sequence", "fidelity_tv_sequence_mean", "e"),
]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1240px;color:#222;\
padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:36px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{margin:22px 0 6px}table{border-collapse:collapse;margin:8px 0 16px;font-size:0.92em}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}th{background:#f4f4f4}\
td:first-child,th:first-child{text-align:left}
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
    head = f"<b>{escape(title)}.</b> " if title else ""
    return (
        f'<figure><img alt="{escape(title or path.stem)}" data-plot="{escape(path.name)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{head}{escape(caption)}</figcaption></figure>'
    )


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] | None = None) -> str:
    """A table of text cells (escaped); `classes`: a CSS class per row ("" for none)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        cls = f" class='{classes[i]}'" if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def html_page(title: str, parts: Sequence[str]) -> str:
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n"
    )


def tier_table(run: Run) -> str:
    """summary.json's per-tier figures ("" for a summary without tiers)."""
    tiers = run.summary.get("tiers") or {}
    if not tiers:
        return ""
    rows = []
    for t, b in tiers.items():
        row = [t]
        for _, key, kind in TIER_COLUMNS:
            v = b.get(key)
            row.append(str(v) if kind == "str" and v is not None else format_value(v, kind))
        row.append(format_value((b.get("token_latency_s") or {}).get("p95"), "ms"))
        rows.append(row)
    return html_table(["tier"] + [c[0] for c in TIER_COLUMNS] + ["latency p95"], rows)


def _slug(s: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in s).strip("-")
    return out or "run"


def run_section(run: Run, figures: dict[str, Any], out: Path, prefix: str) -> list[str]:
    """One run's part of the page: its figures, its tiers, its plots (drawn to OUT/PREFIX_KEY.png, or
    OUT/KEY.png without a prefix) and its scenario."""
    name = run.summary.get("scenario") or run.summary.get("name") or run.path.name
    parts = [
        f"<h2>{escape(run.label)}</h2><p class='muted'>{escape(str(run.path))} · scenario "
        f"{escape(str(name))} · policies {escape(', '.join(run.policies))}</p>",
        html_table(["figure", "value"], [[n, format_value(figures.get(k), kind)] for n, k, kind in ROWS]),
        tier_table(run),
    ]
    for key, title, draw in PLOTS:
        png = draw(run, out / (f"{prefix}_{key}.png" if prefix else f"{key}.png"))
        parts.append(f"<h3>{escape(title)}</h3>" + html_figure(png, CAPTIONS.get(key, ""), title))
    if run.scenario_text:
        parts.append(f"<details><summary>scenario.yaml</summary><pre>{escape(run.scenario_text)}</pre></details>")
    return parts


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Plots (PNG) and report.html for one or several run directories; returns the HTML path."""
    dirs = expand_run_dirs(run_dirs)
    if not dirs:
        raise ValueError("write_report: no run directories")
    runs = [load_run(d) for d in dirs]
    label_runs(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = [run_figures(r) for r in runs]
    parts = [
        f"<h1>HLM testbed report</h1><p class='muted'>{len(runs)} run(s): "
        + ", ".join(escape(str(r.path)) for r in runs)
        + "</p>"
    ]
    if len(runs) > 1:
        p = plot_policies(runs, figs, out / "policies.png")
        parts.append("<h2>Policies side by side</h2>")
        parts.append(
            html_table(
                ["", *[r.label for r in runs]],
                [[name, *(format_value(f.get(key), kind) for f in figs)] for name, key, kind in ROWS],
            )
        )
        parts.append(html_figure(p, CAPTIONS["policies"], "Throughput vs accuracy proxy vs uplink bytes"))
    used: set[str] = set()
    for run, f in zip(runs, figs, strict=True):
        prefix = _slug(run.label) if len(runs) > 1 else ""
        while prefix in used:
            prefix += "_"
        used.add(prefix)
        parts += run_section(run, f, out, prefix)
    path = out / "report.html"
    path.write_text(html_page("HLM testbed report", parts), encoding="utf-8")
    return path
