"""testbed.study.analysis: the throughput of a point, the accuracy bound and cu-hlm's frontier."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from testbed.study import analysis
from testbed.study.analysis import paper_throughput


def _row(point, fid, skip, policy="cu-hlm", group="u_th", **kw):
    return {
        "point": point,
        "policy": policy,
        "group": group,
        "fidelity_tv": fid,
        "skip_rate": skip,
        "pass_at_1": kw.pop("pass_at_1", 0.5),
        **kw,
    }


def test_equal_fidelity_interpolates_along_cu_hlms_pareto_front():
    rows = [
        _row("cu-hlm", 0.02, 0.2, group="policy"),
        _row("cu-hlm-uth0.25", 0.04, 0.6, pass_at_1=0.25),
        _row("dominated", 0.03, 0.1),
        _row("cu-hlm-uth0.5", 0.08, 0.8),
        _row("cu-hlm-theta0.5", 0.021, 0.9, group="theta"),  # another theta: not a threshold of the sweep
        _row("a1", 0.03, 0.5, policy="cu-hlm-adaptive", risk=0.01, estimator="max"),
        _row("a2", 0.01, 0.3, policy="cu-hlm-adaptive", risk=0.001, estimator="max"),
        _row("a3", 0.09, 0.95, policy="cu-hlm-adaptive", risk=0.1, estimator="max"),
    ]
    assert [r["point"] for r in analysis.cu_hlm_frontier(rows)] == ["cu-hlm", "cu-hlm-uth0.25", "cu-hlm-uth0.5"]
    v = {x["point"]: x for x in analysis.equal_fidelity(rows)}
    assert set(v) == {"a1", "a2"}  # a3 lies beyond the sweep's fidelity: nothing to compare with
    assert v["a1"]["cu_hlm_skip_rate"] == pytest.approx(0.4) and v["a1"]["skip_gain"] == pytest.approx(0.1)
    assert v["a1"]["cu_hlm_bracket"] == ["cu-hlm", "cu-hlm-uth0.25"] and v["a1"]["cu_hlm_pass_at_1"] == [0.5, 0.25]
    assert not v["a1"]["bound"]
    assert v["a2"]["bound"] and v["a2"]["cu_hlm_skip_rate"] == pytest.approx(0.2)  # more faithful than any u_th


def test_equal_fidelity_uses_the_upper_concave_hull_not_the_staircase():
    """A threshold under the chord of its neighbours is beaten by mixing them: the hull skips it, and the
    comparison is against the chord (here 0.5 at fidelity 0.03, where the staircase would say 0.3)."""
    rows = [
        _row("cu-hlm", 0.02, 0.2, group="policy"),
        _row("cu-hlm-uth0.1", 0.03, 0.3),
        _row("cu-hlm-uth0.5", 0.04, 0.8),
        _row("a", 0.03, 0.45, policy="cu-hlm-adaptive", risk=0.01),
    ]
    assert [r["point"] for r in analysis.cu_hlm_frontier(rows)] == ["cu-hlm", "cu-hlm-uth0.5"]
    (v,) = analysis.equal_fidelity(rows)
    assert v["cu_hlm_skip_rate"] == pytest.approx(0.5) and v["skip_gain"] == pytest.approx(-0.05)
    # every measured point lies on or under the hull
    f = [r["fidelity_tv"] for r in analysis.cu_hlm_frontier(rows)]
    s = [r["skip_rate"] for r in analysis.cu_hlm_frontier(rows)]
    assert all(r["skip_rate"] <= np.interp(r["fidelity_tv"], f, s) + 1e-12 for r in rows[:3])


def test_throughput_with_unequal_lengths():
    # devices that generate different numbers of tokens: total tokens / sum of spans, not the harmonic mean
    tok = pd.DataFrame(
        {"device": [0] * 4 + [1], "t_draft_start": [0.0, 1.0, 2.0, 3.0, 0.0], "t_commit": [1.0, 2.0, 3.0, 4.0, 10.0]}
    )
    summary = {"throughput_tokens_per_s": {"devices": {"0": 1.0, "1": 0.1}}}
    assert paper_throughput(summary, tok) == pytest.approx(5 / 14)  # 5 tokens over 4 + 10 s: 1 / mean delay
    assert paper_throughput(summary) == pytest.approx(2 / (1 + 10))  # the summary alone: the harmonic mean
    tok["fidelity_tv"] = [0.1, 0.2, 0.3, 0.4, 0.05]
    assert analysis.tv_accuracy_bound(tok) == pytest.approx((1.0 + 0.05) / 2)  # min(1, 1.0) and 0.05
