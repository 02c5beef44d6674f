"""`testbed reproduce paper`: the CU-HLM / U-HLM experiments as one resumable study with one report next
to the papers' headline numbers.

Papers: CU-HLM, arXiv 2505.11788 (Oh et al., "Communication-Efficient Hybrid Language Model via
Uncertainty-Aware Opportunistic and Compressed Transmission"); U-HLM, arXiv 2412.12687 (Oh et al.,
"Uncertainty-Aware Hybrid Inference with On-Device Small and Remote Large Language Models").

Setting: the papers' single device on a wireless Shannon-rate uplink, repeated for every HumanEval
problem of the --size: device i decodes problem i (testbed.study.scenarios PAPER_YAML), every device
isolated so that none distorts another's timing (isolate_devices). Throughput: testbed.study.analysis.

Points (one run directory each under OUT/points/, in this order; testbed.study.points):
- calibration (OUT/calibration, testbed.study.calibration): the fit beta ~ a*u + b per estimator and
  the offline k*. The temperature estimator's fit (a, b) parameterises every policy below unless
  --a/--b pin it (falls back to the paper's a, b if the fit is degenerate or a <= 0; testbed.study.fit).
- llm-only (the accuracy reference), hlm, slm-only (estimator on, to record u), u-hlm and cu-hlm
  (risk-averse u_th = -b/a), cu-hlm-offline (k = k*), cu-hlm-adaptive at each risk budget of the
  size, cu-hlm risk-prone (u_th = (0.5 - b)/a), cu-hlm at each fixed u_th of the size (the u_th
  sweep; with risk-averse and risk-prone it spans risk-averse to risk-prone and beyond; u_th = 0 and
  u_th = -1 are always in it: both sides of the risk-averse flip, testbed.study.bootstrap), cu-hlm
  risk-averse at each theta of the size (the theta sweep; cu-hlm itself is theta = 0.1), and
  rand-hlm skipping at u-hlm's measured skip rate (the papers' random-skip baseline).
- Every point is scored for HumanEval pass@1 (testbed.accuracy.score_run) relative to llm-only and
  compared with it paired (testbed.study.analysis). With Size.samples = n, devices = problems x n
  (device i decodes problem i mod problems, each with its own keyed randomness) and pass@1 is the
  unbiased estimator.

The report (figures and one HTML page, OUT/report/, testbed.study.report) includes the calibration's
bootstrap intervals (testbed.study.bootstrap) and the channel sweep, throughput over HLM's at any
uplink rate from the points' tokens (testbed.study.sweep; `testbed reproduce sweep OUT` on an existing
study).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.scenario import Scenario
from testbed.study.analysis import paper_row, paper_throughput
from testbed.study.bootstrap import FLIP_U_TH
from testbed.study.fit import choose_fit
from testbed.study.points import Point, Study, StudyResult
from testbed.study.report import write_paper_report
from testbed.study.scenarios import link_text, llm_ms, paper_base, paper_setting, policy_spec, sized_tokens, with_policy
from testbed.study.sizes import DEFAULT_THETA, ESTIMATOR, SIZES, Size


def paper_points(size: Size, base: Scenario) -> list[Point]:
    """Every point of the paper study after the calibration, in run order."""

    def pol(name: str, label: str, group: str = "policy", meta_fn=None, **params):
        def build(st: Study) -> Scenario:
            extra = {k: (v(st) if callable(v) else v) for k, v in params.items()}
            if meta_fn is not None:
                point.meta.update(meta_fn(st))
            return with_policy(base, policy_spec(name, st.fit, **extra), f"reproduce-{label}")

        point = Point(label, group, label, build, name)
        return point

    def thr(rule: str):
        return lambda st: {"u_th": st.fit.u_th_risk_averse if rule == "risk-averse" else st.fit.u_th_risk_prone}

    pts = [
        pol("llm-only", "llm-only"),
        pol("hlm", "hlm"),
        pol("slm-only", "slm-only"),
        pol("u-hlm", "u-hlm", meta_fn=thr("risk-averse")),
        pol("cu-hlm", "cu-hlm", meta_fn=lambda st: {**thr("risk-averse")(st), "theta": DEFAULT_THETA}),
        pol("cu-hlm-offline", "cu-hlm-offline", meta_fn=lambda st: {"k": st.fit.kstar}),
    ]
    for est in size.adaptive_estimators:
        for r in size.risks:
            label = f"cu-hlm-adaptive-risk{r:g}" if est == ESTIMATOR else f"cu-hlm-adaptive-{est}-risk{r:g}"
            params = {"risk": r} if est == ESTIMATOR else {"risk": r, "estimator": est}
            pts.append(
                pol("cu-hlm-adaptive", label, meta_fn=lambda st, r=r, est=est: {"risk": r, "estimator": est}, **params)
            )
    pts.append(pol("cu-hlm", "cu-hlm-risk-prone", "u_th", meta_fn=thr("risk-prone"), threshold="risk-prone"))
    # + both sides of the risk-averse flip, skip every u = 0 token / skip nothing (testbed.study.bootstrap)
    for v in size.u_th + tuple(v for v in FLIP_U_TH if v not in size.u_th):
        pts.append(
            pol("cu-hlm", f"cu-hlm-uth{v:g}", "u_th", meta_fn=lambda st, v=v: {"u_th": v}, threshold="fixed", u_th=v)
        )
    for v in size.theta:
        pts.append(
            pol(
                "cu-hlm",
                f"cu-hlm-theta{v:g}",
                "theta",
                meta_fn=lambda st, v=v: {"theta": v, "u_th": st.fit.u_th_risk_averse},
                theta=v,
            )
        )
    pts.append(
        pol("rand-hlm", "rand-hlm", meta_fn=lambda st: {"skip_rate_target": _rand_rate(st)}, skip_rate=_rand_rate)
    )
    return pts


def _rand_rate(st: Study) -> float:
    """rand-hlm skips at u-hlm's measured rate (rounded, so the scenario is stable)."""
    return round(float(st.summaries["u-hlm"].get("skip_rate") or 0.0), 4)


def run_paper(
    size: str | Size = "smoke",
    out: str | Path = "runs/reproduce-paper",
    *,
    engine: str = "local",
    sets: dict[str, Any] | None = None,
    a: float | None = None,
    b: float | None = None,
    log: Callable[[str], None] | None = None,
) -> StudyResult:
    """The paper study (module docstring); returns the table rows and the report path."""
    size = SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    base = paper_base(size, sets)
    points = paper_points(size, base)
    study = Study(out, engine, log, total=len(points) + 1)
    setting = paper_setting(size, sets)
    study.llm_ms = llm_ms(setting)
    study.setting_text = link_text(setting)
    study.log(
        f"reproduce paper --size {size.name}: {base.n_devices} devices ({size.samples} per problem, "
        f"humaneval[{size.offset}:{'' if size.count is None else size.offset + size.count}]), "
        f"{size.max_new_tokens} tokens each, {len(points) + 1} points -> {out}"
    )
    cal_s = with_policy(sized_tokens(base, size.calibration_tokens), "hlm", "reproduce-calibration")
    study.run_calibration(cal_s, size.kstar_tokens)
    study.fit = choose_fit(study.calibration, a, b)
    for p in points:
        study.run_point(p)
        if p.name == "llm-only":
            study.reference = study.point_dir("llm-only")
    rows = paper_rows(points, study)
    report = write_paper_report(study, size, base, rows)
    return StudyResult(out, report, rows, study.fit, study.statuses)


def _tokens_table(path: Path):
    """What the rows need of a point's tokens.parquet (fidelity_tv only where the run measured it)."""
    import pandas as pd

    cols = ["device", "t_draft_start", "t_commit", "fidelity_tv"]
    try:
        return pd.read_parquet(path, columns=cols)
    except (KeyError, ValueError):  # no fidelity_tv (older runs)
        return pd.read_parquet(path, columns=cols[:3])


def paper_rows(points: list[Point], study: Study) -> list[dict]:
    """One row per point, its throughput also over hlm's."""
    tables = {p.name: _tokens_table(study.point_dir(p.name) / "tokens.parquet") for p in points}
    hlm = paper_throughput(study.summaries["hlm"], tables["hlm"])
    return [paper_row(p, study.summaries[p.name], hlm, tables[p.name]) for p in points]
