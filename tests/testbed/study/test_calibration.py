"""testbed.study.calibration: the study's calibration point fits with the one calibration run's least
squares (testbed.calibrate.fit_estimators) and writes its own entry format; the reliability bins."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from policies.rejection import fit_rejection_model
from policies.uncertainty import ESTIMATORS
from testbed.calibrate import fit_estimators
from testbed.study.calibration import fit_entry, reliability


def _samples(constant: str) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    u = rng.uniform(0, 1, 64)
    beta = np.clip(0.5 * u + rng.normal(0, 0.1, 64), 0, 1)
    cols = {f"u_{name}": (np.full(64, 0.25) if name == constant else u + 0.01 * i) for i, name in enumerate(ESTIMATORS)}
    return pd.DataFrame({"device": np.arange(64) // 16, "beta": beta, **cols})


def test_entries_are_the_least_squares_fit_or_say_why_not():
    constant = ESTIMATORS[-1]
    samples = _samples(constant)
    fits = fit_estimators(samples)
    for name in ESTIMATORS:
        e = fit_entry(fits[name], len(samples))
        if name == constant:  # u constant: no slope, the error says why
            assert e["a"] is None and e["u_th_risk_averse"] is None and "constant" in e["error"] and e["n"] == 64
            continue
        f = fit_rejection_model(samples[f"u_{name}"], samples["beta"])
        assert (e["a"], e["b"], e["n"]) == (f.a, f.b, 64)
        assert e["pearson_r"] == f.pearson_r and e["u_th_risk_averse"] == -f.b / f.a


def test_no_pearson_r_is_none_and_no_threshold_without_a_positive_slope():
    u = np.linspace(0, 1, 10)
    e = fit_entry(fit_rejection_model(u, np.zeros(10)), 10)  # beta constant: r undefined
    assert e["pearson_r"] is None and e["a"] == pytest.approx(0.0, abs=1e-12) and e["u_th_risk_averse"] is None
    e = fit_entry(fit_rejection_model(u, 1 - u), 10)  # a < 0: uncertainty does not predict rejection
    assert e["a"] < 0 and e["u_th_risk_averse"] is None and math.isclose(e["pearson_r"], -1.0)


def test_reliability_bins_each_distinct_u():
    u = np.repeat([0.0, 0.05, 0.1], [4, 2, 2])
    beta = np.array([0, 0, 0, 0.4, 0.5, 0.5, 1.0, 0.8])
    bins = reliability(u, beta, 2.0, 0.0)
    assert [b["n"] for b in bins] == [4, 2, 2]
    assert bins[0]["beta_observed"] == pytest.approx(0.1) and bins[2]["beta_predicted"] == pytest.approx(0.2)
