"""Rejection model fit and thresholds against synthetic data and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies import (
    DegenerateFitError,
    RejectionModel,
    fit_rejection_model,
    risk_averse_threshold,
    risk_prone_threshold,
    threshold,
)


def test_fit_recovers_a_b_within_standard_errors():
    g = np.random.default_rng(0)
    n, a, b, sigma = 4000, 0.815, -0.066, 0.05
    u = g.uniform(0, 1, n)
    beta = a * u + b + g.normal(0, sigma, n)
    f = fit_rejection_model(u, beta)
    se_a = sigma / math.sqrt(n * u.var())
    se_b = sigma * math.sqrt(1 / n + u.mean() ** 2 / (n * u.var()))
    assert abs(f.a - a) < 5 * se_a and abs(f.b - b) < 5 * se_b
    r_true = a * u.std() / math.sqrt(a**2 * u.var() + sigma**2)
    assert abs(f.pearson_r - r_true) < 0.01
    assert f.n == n
    assert f.model == RejectionModel(f.a, f.b)


def test_noise_free_line_is_exact():
    u = np.linspace(0, 1, 11)
    f = fit_rejection_model(u, 0.5 * u + 0.1)
    assert f.a == pytest.approx(0.5, abs=1e-12) and f.b == pytest.approx(0.1, abs=1e-12)
    assert f.pearson_r == pytest.approx(1.0)
    assert fit_rejection_model(u, 1 - u).pearson_r == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "u, beta, match",
    [
        ([0.3, 0.3, 0.3], [0.1, 0.2, 0.3], "constant"),
        ([0.3], [0.1], "at least 2"),
        ([0.1, float("nan")], [0.1, 0.2], "NaN"),
        ([0.1, 0.2], [0.1], "differ"),
    ],
)
def test_degenerate_fits_raise(u, beta, match):
    with pytest.raises(DegenerateFitError, match=match):
        fit_rejection_model(u, beta)


def test_constant_beta_gives_zero_slope_and_no_threshold():
    f = fit_rejection_model([0.1, 0.5, 0.9], [0.0, 0.0, 0.0])
    assert f.a == 0 and math.isnan(f.pearson_r)
    with pytest.raises(DegenerateFitError, match="a = 0"):
        risk_averse_threshold(f.a, f.b)
    with pytest.raises(DegenerateFitError, match="<= 0"):
        risk_prone_threshold(-0.2, 0.1)


def test_thresholds_closed_form():
    a, b = 0.815, -0.066
    assert risk_averse_threshold() == pytest.approx(0.066 / 0.815)
    assert risk_prone_threshold() == pytest.approx((0.5 + 0.066) / 0.815)
    m = RejectionModel(a, b)
    # the predicted rejection at each threshold is exactly the tolerated level
    assert m.beta(risk_averse_threshold(a, b)) == pytest.approx(0.0, abs=1e-12)
    assert m.beta(risk_prone_threshold(a, b, 0.2)) == pytest.approx(0.2)
    assert threshold("fixed", u_th=0.3) == 0.3
    assert threshold("risk-prone", a, b, beta_tol=0.0) == threshold("risk-averse", a, b)
    with pytest.raises(ValueError):
        threshold("fixed")
    with pytest.raises(ValueError, match="unknown"):
        threshold("optimistic", a, b)
    with pytest.raises(ValueError):
        risk_prone_threshold(a, b, beta_tol=1.0)


def test_model_beta_is_clipped():
    np.testing.assert_allclose(RejectionModel(2.0, -0.5).beta([0.0, 0.5, 1.0]), [0.0, 0.5, 1.0])
