"""testbed.figures: each figure against a hand-computed value (summary-level checks are in
test_results.py, the collector's in test_metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from testbed import figures as F


def test_jain_exact():
    assert F.jain([3.0, 3.0, 3.0, 3.0]) == 1.0
    assert F.jain([1.0, 0.0, 0.0, 0.0]) == 0.25
    assert F.jain([8.0, 4.0, 5.0]) == pytest.approx(289 / 315, rel=1e-15)
    assert F.jain([2, 2], n=4) == pytest.approx(0.5)  # two active devices without tokens
    assert F.jain([2.0, math.nan, math.inf]) == 1.0  # only finite entries count
    assert math.isnan(F.jain([])) and math.isnan(F.jain([0.0, 0.0]))


def test_rates_and_undefined():
    assert F.skip_rate(1, 4) == 0.25 and F.acceptance_rate(2, 3) == pytest.approx(2 / 3)
    assert F.vocab_compression(130, 3, 100) == pytest.approx(1 - 130 / 300)
    assert math.isnan(F.skip_rate(0, 0)) and math.isnan(F.vocab_compression(0, 0, 100))
    assert F.num(math.nan) is None and F.num(None) is None and F.num(np.float32(0.5)) == 0.5


def tokens() -> pd.DataFrame:
    # device 0: two tokens over 0 .. 0.25 s; device 1: one token with an unknown start
    return pd.DataFrame(
        {
            "device": [0, 0, 1],
            "t_draft_start": [0.0, 0.1, math.nan],
            "t_commit": [0.1, 0.25, 0.3],
            "uncertainty": [0.1, 0.5, 0.9],
            "beta": [0.0, 0.3, 0.7],
            "draft_id": [1, 2, -1],
        }
    )


def test_throughput_latency_and_fit():
    df = tokens()
    assert F.device_throughput(df, 2.0).tolist() == pytest.approx([2 / 0.25, 1 / 2.0])  # own span, else emulated
    assert F.span_throughput(df, 2.0) == pytest.approx(3 / 0.3)
    assert F.token_latency(df).tolist() == pytest.approx([0.1, 0.15])
    lat = F.latency_percentiles(F.token_latency(df))
    assert lat["p50"] == pytest.approx(0.125) and lat["mean"] == pytest.approx(0.125)
    assert F.latency_percentiles(np.array([])) == {"p50": None, "p95": None, "p99": None, "mean": None}
    assert F.llm_agreement(df) == pytest.approx(1 - 0.15)  # drafted tokens only
    fit = F.beta_fit(df)
    assert (fit.a, fit.b, fit.n) == (pytest.approx(0.75), pytest.approx(-0.075), 2)
    assert F.beta_fit(df.iloc[:1]) is None  # one token cannot determine a line
