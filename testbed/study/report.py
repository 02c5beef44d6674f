"""The reports of `testbed reproduce` (testbed.study.paper, testbed.study.fleet): one HTML page per
study with its figures (testbed.study.plots) and table.json, drawn from its table rows; the papers'
headline numbers beside ours."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from testbed.report import format_value, html_figure, html_page, html_table
from testbed.scenario import Scenario
from testbed.study import sweep as channel_sweep
from testbed.study.analysis import equal_fidelity
from testbed.study.bootstrap import add_intervals, flip_summary
from testbed.study.bootstrap import html_section as calibration_html
from testbed.study.fit import Fit
from testbed.study.plots import (
    plot_beta_fit,
    plot_fleet,
    plot_frontier,
    plot_policies,
    plot_reliability,
    plot_theta,
    plot_vs_u_th,
)
from testbed.study.points import Study
from testbed.study.scenarios import fleet_base
from testbed.study.sizes import ESTIMATOR, PAPER, QWEN_CALIBRATE_FIT, RISK_PRONE_BETA_TOL, Size


def fmt(v: Any, kind: str = "2", se: Any = None) -> str:
    """testbed.report.format_value, "n/a" where missing, with "± se" (one standard error) when given."""
    text = format_value(v, kind, missing="n/a")
    if se is None or text == "n/a":
        return text
    return f"{text} ± {format_value(se, kind).rstrip('%')}"


POLICY_COLUMNS = [
    "point",
    "u_th",
    "throughput (tok/s)",
    "ratio to HLM",
    "skip",
    "compression",
    "pass@1",
    "Δ pass@1 vs llm-only",
    "distinguishable (95%)",
    "|Δ| ≤ (TV bound)",
    "pass@1 / llm-only",
    "fidelity (TV/token)",
    "uplink / token",
    "acceptance",
]


def verdict(r: dict) -> str:
    """'yes' / 'no' (the paired exact test at 95%, with its p), 'reference' for llm-only, 'n/a' unscored."""
    if r.get("policy") == "llm-only" and r.get("pass_at_1") is not None:
        return "reference"
    d = r.get("distinguishable_95")
    if d is None:
        return "n/a"
    return f"{'yes' if d else 'no'} (p = {r['mcnemar_p']:.2g})"


def _policy_cells(r: dict) -> list[str]:
    return [
        r["label"],
        fmt(r.get("u_th"), "3"),
        fmt(r["throughput_tokens_per_s"]),
        fmt(r["throughput_ratio_hlm"], "x"),
        fmt(r["skip_rate"], "pct"),
        fmt(r["vocab_compression"], "pct"),
        fmt(r["pass_at_1"], "3", r["pass_at_1_stderr"]),
        _signed(r.get("pass_at_1_diff"), r.get("pass_at_1_diff_stderr")),
        verdict(r),
        fmt(r.get("pass_at_1_tv_bound"), "3"),
        fmt(r["pass_at_1_relative"], "3", r["pass_at_1_relative_stderr"]),
        fmt(r["fidelity_tv"], "e"),
        fmt(r["uplink_bytes_per_token"], "bytes"),
        fmt(r["acceptance_rate"], "pct"),
    ]


def _signed(v: Any, se: Any = None) -> str:
    """A difference with its sign (+0.062 ± 0.040), n/a where missing."""
    if v is None:
        return "n/a"
    return f"{v:+.3f}" + ("" if se is None else f" ± {se:.3f}")


ACCURACY_COLUMNS = [
    "point",
    "problems x samples",
    "pass@1 (unbiased)",
    "Δ vs llm-only (paired)",
    "95% CI (paired t)",
    "discordant (run only, llm-only only)",
    "exact test",
    "p",
    "distinguishable from llm-only at 95%",
    "|Δ| bound from fidelity",
    "fidelity (summed TV / sequence)",
]


def _accuracy_cells(r: dict) -> list[str]:
    sp = r.get("samples_per_problem")
    n = (
        "n/a"
        if r.get("n_problems") is None
        else (f"{r['n_problems']} x {sp[0] if sp and sp[0] == sp[1] else (f'{sp[0]}-{sp[1]}' if sp else '?')}")
    )
    ci = r.get("pass_at_1_diff_ci95")
    disc = r.get("discordant")
    d = r.get("distinguishable_95")
    return [
        r["label"],
        n,
        fmt(r.get("pass_at_1"), "3", r.get("pass_at_1_stderr")),
        _signed(r.get("pass_at_1_diff"), r.get("pass_at_1_diff_stderr")),
        "n/a" if not ci else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]",
        "n/a" if not disc else f"{disc[0]}, {disc[1]}",
        str(r.get("paired_test") or "n/a"),
        fmt(r.get("mcnemar_p"), "3"),
        "reference" if verdict(r) == "reference" else ("n/a" if d is None else ("yes" if d else "no")),
        fmt(r.get("pass_at_1_tv_bound"), "3"),
        fmt(r.get("fidelity_tv_sequence"), "3"),
    ]


def _paper_cells(name: str) -> list[str] | None:
    """The paper's headline numbers in the columns of POLICY_COLUMNS (blank where it gives none)."""
    p = PAPER.get(name)
    if not p:
        return None
    ratio = p["throughput_ratio_hlm"]
    return [
        f"paper: {name}",
        "",
        "",
        f"up to {ratio:g}x" if name == "cu-hlm" else f"{ratio:g}x",
        fmt(p.get("skip_rate"), "pct"),
        fmt(p.get("vocab_compression"), "pct") if "vocab_compression" in p else "",
        "",
        "",
        "",
        "",
        fmt(p.get("pass_at_1_relative"), "pct"),
        "",
        "",
        "",
    ]


def _fresh(rep: Path) -> Path:
    """OUT/report emptied: a report is always drawn whole from the current rows."""
    if rep.exists():
        shutil.rmtree(rep)
    rep.mkdir(parents=True)
    return rep


# The u_th sweep's figures: (row column, y label, title, file, plot_vs_u_th options, caption).
UTH_FIGURES = [
    (
        "throughput_ratio_hlm",
        "token throughput / HLM's",
        "Throughput ratio to HLM vs u_th",
        "uth_throughput_ratio.png",
        {},
        "Token throughput (1 / mean per-token delay) of cu-hlm over HLM's, vs its skip threshold. Vertical lines: "
        "risk-averse and risk-prone thresholds of the fit.",
    ),
    (
        "skip_rate",
        "transmissions skipped",
        "Skip rate vs u_th",
        "uth_skip_rate.png",
        {"percent": True},
        "Fraction of tokens not uploaded.",
    ),
    (
        "vocab_compression",
        "vocabulary compression",
        "Vocabulary compression vs u_th",
        "uth_compression.png",
        {"percent": True},
        "1 - mean k / |V| over the uploads (online k*(t), theta = 0.1).",
    ),
    (
        "pass_at_1_relative",
        "pass@1 / llm-only's",
        "HumanEval pass@1 relative to llm-only",
        "uth_pass_at_1.png",
        {"err": "pass_at_1_relative_stderr"},
        "pass@1 from the problems' own unit tests over llm-only's on the same "
        "problems and seed; error bars: one standard error (delta method). n/a where llm-only passes nothing.",
    ),
    (
        "fidelity_tv",
        "mean TV distance to the LLM per token",
        "Fidelity vs u_th",
        "uth_fidelity.png",
        {},
        "Exact total-variation distance between the law each token was drawn from and the LLM's, averaged over "
        "tokens (0 = the LLM's own distribution). n/a where the run did not measure it.",
    ),
]


def paper_figures(study: Study, rows: list[dict], rep: Path) -> list[tuple[Path, str]]:
    """Every figure of the paper report, drawn into rep, with its caption."""
    import pandas as pd

    fit, cal = study.fit, study.calibration
    by = {r["point"]: r for r in rows}
    refs = {n: by[n] for n in ("hlm", "u-hlm", "slm-only", "llm-only", "rand-hlm") if n in by}
    sweep = [r for r in rows if r["policy"] == "cu-hlm" and r["group"] in ("policy", "u_th")]
    samples = pd.read_parquet(study.point_dir("calibration") / "samples.parquet")
    uth = [
        (plot_vs_u_th(sweep, refs, column, label, title, rep / file, fit=fit, **options), caption)
        for column, label, title, file, options, caption in UTH_FIGURES
    ]
    return uth + [
        (
            plot_beta_fit(cal, samples, rep / "beta_u_fit.png"),
            "Observed beta = max(0, 1 - y_d / x_d) of every token of the calibration run against each estimator's u, "
            "with its least-squares line (and the paper's line for temperature perturbation).",
        ),
        (
            plot_reliability(cal, rep / "reliability.png"),
            "Binned reliability per estimator: mean observed beta against mean predicted beta of each u bin.",
        ),
        (
            plot_theta(
                [r for r in rows if r["policy"] == "cu-hlm" and r["group"] in ("policy", "theta")],
                rep / "theta_compression.png",
            ),
            "Vocabulary compression (and fidelity) of cu-hlm at the risk-averse threshold vs the distortion budget "
            "theta.",
        ),
        (
            plot_policies([r for r in rows if r["group"] == "policy"], rep / "policies.png"),
            "Every policy: throughput over HLM's (log scale), skip rate and compression.",
        ),
        (
            plot_frontier(rows, rep / "skip_vs_fidelity.png"),
            "Skip rate against fidelity. Red: cu-hlm at each threshold of the sweep (the offline fit's risk-averse one "
            "included); dashed: cu-hlm-adaptive at each risk budget (labels), per uncertainty estimator. A point above "
            "the red line skips more than any cu-hlm threshold at the same fidelity.",
        ),
    ]


def _title(study: Study, size: Size, base: Scenario) -> list[str]:
    cal = study.calibration
    return [
        f"<h1>Reproducing CU-HLM / U-HLM: --size {html.escape(size.name)}</h1>",
        f"<p class='muted'>{html.escape(size.why)}. {base.n_devices} devices ({size.samples} per HumanEval "
        f"problem of {html.escape(cal['prompts'])}), up to {base.generation.max_new_tokens} tokens each, models "
        f"{html.escape(str(base.models.slm))} / {html.escape(str(base.models.llm))}, seed {base.seed}. "
        f"Results: {html.escape(str(study.out))}.</p>",
    ]


def _headline_rows(rows: list[dict], fit: Fit, cal: dict) -> list[list[str]]:
    """The papers' headline numbers and ours, one row per claim."""
    by = {r["point"]: r for r in rows}
    cu, u = by.get("cu-hlm", {}), by.get("u-hlm", {})
    # "up to": the best cu-hlm point that still verifies something (u_th >= 1 skips every token: slm-only)
    best = max(
        (
            r
            for r in rows
            if r["policy"] == "cu-hlm" and r.get("throughput_ratio_hlm") and (r.get("skip_rate") or 0.0) < 1.0
        ),
        key=lambda r: r["throughput_ratio_hlm"],
        default=None,
    )
    return [
        [
            "CU-HLM token throughput vs HLM",
            "up to 206x",
            f"{fmt(cu.get('throughput_ratio_hlm'), 'x')} (risk-averse); "
            f"up to {fmt(best and best['throughput_ratio_hlm'], 'x')} ({best['label'] if best else 'n/a'})",
        ],
        ["CU-HLM transmissions skipped", "74.8%", fmt(cu.get("skip_rate"), "pct")],
        ["CU-HLM vocabulary compression", "97.4%", fmt(cu.get("vocab_compression"), "pct")],
        [
            "CU-HLM accuracy (relative)",
            "97.4%",
            fmt(cu.get("pass_at_1_relative"), "pct", cu.get("pass_at_1_relative_stderr")),
        ],
        [
            "CU-HLM pass@1 minus llm-only's (paired)",
            "-",
            f"{_signed(cu.get('pass_at_1_diff'), cu.get('pass_at_1_diff_stderr'))}; distinguishable at 95%: "
            f"{verdict(cu) if cu else 'n/a'}",
        ],
        ["U-HLM uploads skipped", "45.93%", fmt(u.get("skip_rate"), "pct")],
        [
            "U-HLM accuracy / LLM's",
            "97.54%",
            fmt(u.get("pass_at_1_relative"), "pct", u.get("pass_at_1_relative_stderr")),
        ],
        ["U-HLM throughput vs HLM", "2.54x", fmt(u.get("throughput_ratio_hlm"), "x")],
        [
            "rejection fit beta ~ a u + b",
            "a = 0.815, b = -0.066 (TinyLlama / Llama-2)",
            f"a = {fit.a:.3f}, b = {fit.b:+.3f} ({fit.source}); `testbed calibrate` on the Qwen pair: "
            f"a = {QWEN_CALIBRATE_FIT['a']}, b = {QWEN_CALIBRATE_FIT['b']}",
        ],
        [
            "risk-averse / risk-prone u_th",
            "0.081 / 0.81",
            f"{fit.u_th_risk_averse:.3f} / {fit.u_th_risk_prone:.3f} (-b/a and ({RISK_PRONE_BETA_TOL} - b)/a; on the "
            f"paper's fit this rule gives 0.081 / {(RISK_PRONE_BETA_TOL - PAPER['fit']['b']) / PAPER['fit']['a']:.3f})",
        ],
        [
            "offline k*",
            "-",
            f"{fit.kstar} (theta {cal['kstar']['theta']}, {cal['kstar']['tokens']} calibration tokens)",
        ],
        [
            "fidelity (mean TV / token) cu-hlm vs hlm",
            "-",
            f"{fmt(cu.get('fidelity_tv'), 'e')} vs {fmt(by.get('hlm', {}).get('fidelity_tv'), 'e')}",
        ],
    ]


def _adaptive_section(versus: list[dict]) -> list[str]:
    """cu-hlm-adaptive against cu-hlm at equal fidelity (testbed.study.analysis.equal_fidelity)."""
    return [
        "<h2>cu-hlm-adaptive against cu-hlm at equal fidelity</h2>",
        "<p class='muted'>No offline calibration: each device learns which u it can skip from its own "
        "verdicts within a risk budget (expected missed rejections per token). cu-hlm's skip rate at the same "
        "fidelity is interpolated along its threshold sweep (mixing two thresholds attains the segment); "
        "'≤' where the adaptive point is more faithful than any cu-hlm threshold.</p>",
        html_table(
            [
                "point",
                "u estimator",
                "risk budget",
                "fidelity (TV/token)",
                "skip",
                "cu-hlm skip at equal fidelity",
                "gain (points)",
                "pass@1",
                "cu-hlm pass@1 (bracketing u_th)",
                "compression",
            ],
            [
                [
                    v["point"],
                    str(v["estimator"]),
                    fmt(v["risk"], "3"),
                    fmt(v["fidelity_tv"], "e"),
                    fmt(v["skip_rate"], "pct"),
                    ("≤ " if v["bound"] else "") + fmt(v["cu_hlm_skip_rate"], "pct"),
                    f"{100 * v['skip_gain']:+.1f}",
                    fmt(v["pass_at_1"], "3", v["pass_at_1_stderr"]),
                    " / ".join(fmt(x, "3") for x in v["cu_hlm_pass_at_1"]),
                    fmt(v["vocab_compression"], "pct"),
                ]
                for v in versus
            ],
        ),
    ]


def _accuracy_section(rows: list[dict]) -> list[str]:
    """Each scored point against llm-only, paired."""
    return [
        "<h2>Accuracy: each policy against llm-only, paired</h2>",
        "<p class='muted'>Every point decodes the same problems with the same seeds as llm-only (device i "
        "of each, the same prompt). pass@1: the unbiased estimator (c / n of each problem's samples) averaged "
        "over problems ± its standard error over problems. Δ: the mean over problems of the point's minus "
        "llm-only's per-problem pass rate ± sd / sqrt(problems), with its paired-t 95% interval. Exact test: "
        "McNemar's (two-sided binomial on the discordant problems) with one sample per problem, the sign test "
        "on the per-problem differences with several; 'distinguishable' = its p < 0.05. The bound: |Δ pass@1| "
        "≤ the mean over sequences of min(1, summed per-token TV) (docs/design.md section 7), what fidelity alone "
        "guarantees; it bounds the expected difference, the measured Δ adds sampling noise.</p>",
        html_table(ACCURACY_COLUMNS, [_accuracy_cells(r) for r in rows if r.get("pass_at_1") is not None]),
    ]


def _points_section(rows: list[dict]) -> list[str]:
    """Every point's row, the papers' numbers under u-hlm's and cu-hlm's."""
    table, classes = [], []
    for r in rows:
        table.append(_policy_cells(r))
        classes.append("")
        if r["point"] in ("u-hlm", "cu-hlm") and _paper_cells(r["point"]):
            table.append(_paper_cells(r["point"]))
            classes.append("paper")
    return [
        "<h2>Every point</h2>",
        html_table(POLICY_COLUMNS, table, classes),
        "<p class='muted'>throughput: 1 / mean per-token delay over all tokens of all devices = total tokens "
        "/ sum of the devices' spans in emulated time (devices stop at eos / stop sequences, so they generate "
        "different numbers of tokens); pass@1 (unbiased) ± one standard error over problems; Δ pass@1: paired "
        "difference to llm-only ± its standard error, distinguishable by the exact test at 95% (table above); "
        "|Δ| ≤: the accuracy bound implied by fidelity; relative pass@1 ± its delta-method standard error "
        "(llm-only is the reference, 1 by definition); fidelity: mean exact TV distance to the LLM's "
        "distribution per token, n/a where the run does not measure it.</p>",
    ]


def _setting_section(study: Study, base: Scenario) -> list[str]:
    """The devices' setting as the study ran it, every estimator's fit, and the points' statuses."""
    cal = study.calibration
    return [
        "<h2>Setting</h2>",
        f"<p>Each device: SLM step {base.tiers[0].slm_ms_per_token} ms/token; link "
        f"{html.escape(study.setting_text)} (a channel's rate is W log2(1 + SNR)); "
        f"LLM step {study.llm_ms:.1f} ms per verification (batch 1), charged on the downlink so that "
        f"devices never queue behind each other (each device's trace is what it would be alone). "
        f"Token throughput = 1 / (SLM + uplink + LLM + downlink) per transmitted token, 1 / SLM per skipped "
        f"token, averaged as 1 / mean delay. HLM uploads the full distribution in float32 "
        f"(|V| = {cal['vocab_size']:,}); CU-HLM its top-k*(t) at 8 bits. The papers' 206x is their best "
        f"case (their channel and vocabulary); here one channel is measured.</p>",
        html_table(
            ["estimator", "a", "b", "pearson r", "-b/a", "tokens"],
            [
                [
                    n,
                    fmt(f.get("a"), "3"),
                    fmt(f.get("b"), "3"),
                    fmt(f.get("pearson_r"), "3"),
                    fmt(f.get("u_th_risk_averse"), "3"),
                    str(f.get("n")),
                ]
                for n, f in cal["fits"].items()
            ],
        ),
        "<details><summary>points and their status</summary>"
        + html_table(
            ["point", "status", "directory"], [[n, s, str(study.point_dir(n))] for n, s in study.statuses.items()]
        )
        + "</details>",
    ]


def write_paper_report(study: Study, size: Size, base: Scenario, rows: list[dict]) -> Path:
    """OUT/report: the figures, table.json and report.html of the paper study."""
    rep = _fresh(study.out / "report")
    fit, cal = study.fit, study.calibration
    figs = paper_figures(study, rows, rep)
    versus = equal_fidelity(rows)
    flip, sweep_doc, sweep_parts = _calibration_and_sweep(study, cal, fit, rows, rep)
    (rep / "table.json").write_text(
        json.dumps(
            {
                "size": size.name,
                "fit": fit.__dict__,
                "calibration": {"fits": cal["fits"], "kstar": cal["kstar"]},
                "llm_ms": study.llm_ms,
                "rows": rows,
                "adaptive_vs_cu_hlm": versus,
                "calibration_flip": flip,
                "channel_sweep": sweep_doc,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    parts = [
        *_title(study, size, base),
        "<h2>Headline numbers next to the papers'</h2>",
        html_table(["figure", "paper", "this run"], _headline_rows(rows, fit, cal)),
        *_adaptive_section(versus),
        *calibration_html(flip, cal["fits"]),
        *sweep_parts,
        *_accuracy_section(rows),
        *_points_section(rows),
        "<h2>Figures</h2>" + "".join(html_figure(p, c) for p, c in figs),
        *_setting_section(study, base),
    ]
    path = rep / "report.html"
    path.write_text(html_page(f"reproduce paper ({size.name})", parts), encoding="utf-8")
    return path


def _calibration_and_sweep(study: Study, cal: dict, fit: Fit, rows: list[dict], rep: Path):
    """Issue 15 items 5 and 6: the calibration's intervals and the flip (testbed.study.bootstrap), the
    channel sweep (testbed.study.sweep) with its figure; (flip, sweep table, report parts)."""
    import pandas as pd

    if any("ci" not in f for f in cal["fits"].values() if f.get("a") is not None):  # a calibration from before
        add_intervals(cal["fits"], pd.read_parquet(study.point_dir("calibration") / "samples.parquet"))
    flip = flip_summary(cal, rows, ESTIMATOR, used=(fit.u_th_risk_averse, fit.source))
    try:
        doc = channel_sweep.sweep(study.out, paper=PAPER["cu-hlm"], only=[r["point"] for r in rows])
        png, _ = channel_sweep.write(study.out, doc, rep)
        return flip, doc, channel_sweep.html_section(doc, png)
    except channel_sweep.SweepError as e:
        return flip, {"error": str(e)}, ["<h2>Channel sweep</h2>", f"<p>Not computed: {html.escape(str(e))}</p>"]


def fleet_figures(rows: list[dict], rep: Path) -> list[tuple[Path, str]]:
    """Every figure of the fleet report, drawn into rep, with its caption."""
    return [
        (
            plot_fleet(
                rows,
                "system_throughput_tokens_per_s",
                "tokens / emulated s (all devices)",
                "System throughput vs fleet size",
                rep / "fleet_throughput.png",
                log=True,
            ),
            "Tokens of the whole fleet per emulated second.",
        ),
        (
            plot_fleet(
                rows,
                "jain_fairness",
                "Jain fairness of per-device throughput",
                "Fairness vs fleet size",
                rep / "fleet_fairness.png",
            ),
            "Jain's index over devices' own throughput (1 = all served equally).",
        ),
        (
            plot_fleet(
                rows,
                "verifier_batch_size_mean",
                "mean verifier batch (sequences)",
                "Verifier batch size vs fleet size",
                rep / "fleet_batch.png",
            ),
            "Mean sequences per verifier batch (max_batch of the server profile caps it).",
        ),
    ]


def _fleet_title(study: Study, size: Size) -> list[str]:
    base = fleet_base(size, size.fleet_sizes[0])
    tiers = ", ".join(
        f"{t.name} ({t.slm_ms_per_token} ms/token, {t.link if isinstance(t.link, str) else 'custom link'})"
        for t in base.tiers
    )
    return [
        f"<h1>CU-HLM on a fleet: --size {html.escape(size.name)}</h1>",
        f"<p class='muted'>Heterogeneous devices ({html.escape(tiers)}; proportions 2 : 1 : 1) share one "
        f"verifier (verify {base.server.verify_ms.base} + {base.server.verify_ms.per_token}/token + "
        f"{base.server.verify_ms.per_sequence}/sequence ms, max batch {base.server.max_batch}). "
        f"{size.fleet_tokens} tokens per device. Fit a = {study.fit.a:.3f}, b = {study.fit.b:+.3f} "
        f"({html.escape(study.fit.source)}), offline k* = {study.fit.kstar}.</p>",
    ]


def _fleet_table(rows: list[dict]) -> str:
    cells = [
        [
            r["label"],
            str(r["fleet_size"]),
            fmt(r["system_throughput_tokens_per_s"]),
            fmt(r["jain_fairness"], "3"),
            fmt(r["verifier_batch_size_mean"]),
            fmt(r["skip_rate"], "pct"),
            fmt(r["vocab_compression"], "pct"),
            fmt(r["uplink_bytes_per_token"], "bytes"),
            "n/a" if r["latency_p95_s"] is None else f"{1000 * r['latency_p95_s']:.1f} ms",
            fmt(r["fidelity_tv"], "e"),
        ]
        for r in rows
    ]
    return html_table(
        [
            "policy",
            "devices",
            "system throughput (tok/s)",
            "Jain",
            "verifier batch",
            "skip",
            "compression",
            "uplink / token",
            "latency p95",
            "fidelity (TV/token)",
        ],
        cells,
    )


def write_fleet_report(study: Study, size: Size, rows: list[dict]) -> Path:
    """OUT/report: the figures, table.json and report.html of the fleet study."""
    rep = _fresh(study.out / "report")
    figs = fleet_figures(rows, rep)
    (rep / "table.json").write_text(
        json.dumps({"size": size.name, "fit": study.fit.__dict__, "rows": rows}, indent=2), encoding="utf-8"
    )
    parts = [
        *_fleet_title(study, size),
        _fleet_table(rows),
        "<h2>Figures</h2>" + "".join(html_figure(p, c) for p, c in figs),
    ]
    path = rep / "report.html"
    path.write_text(html_page(f"reproduce fleet ({size.name})", parts), encoding="utf-8")
    return path
