"""Uncertainty estimators against closed forms and an independent brute-force sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import policies.uncertainty as unc
from policies import entropy, one_minus_max, temperature_perturbation, top2_margin


def softmax64(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def expected_u(z: np.ndarray, d: int, theta_max: float, n: int = 200_000) -> float:
    """E[u] = (1/theta_max) * integral_0^theta_max (1 - softmax(z/theta)_d) dtheta, midpoint rule."""
    thetas = (np.arange(n) + 0.5) * theta_max / n
    s = np.asarray(z, dtype=np.float64)[None, :] / thetas[:, None]
    s -= s.max(axis=1, keepdims=True)
    p = np.exp(s)
    p_d = p[:, d] / p.sum(axis=1)
    return float(np.mean(1.0 - p_d))


@pytest.mark.parametrize("d, theta_max", [(0, 2.0), (2, 2.0), (4, 0.7)])
def test_temperature_perturbation_mean_matches_integral(d, theta_max):
    z = np.array([3.0, 2.2, 1.9, 0.5, -1.0, -4.0], dtype=np.float32)
    n_keys, K = 1500, 20
    keys = [(11, 3, t) for t in range(n_keys)]
    u = temperature_perturbation(np.tile(z, (n_keys, 1)), np.full(n_keys, d), keys, K=K, theta_max=theta_max)
    mu = expected_u(z, d, theta_max)
    # All n_keys*K indicators are iid Bernoulli(mu): theta_k and r_k are independent draws.
    sigma = math.sqrt(mu * (1 - mu) / (n_keys * K))
    assert abs(u.mean() - mu) < 5 * sigma + 1e-3, (u.mean(), mu, sigma)
    assert set(np.unique(u * K)) <= set(range(K + 1))  # u is a fraction of K


def test_temperature_perturbation_wrong_theta_range_would_be_detected():
    # The same bound separates theta ~ U(0, 2] from U(0, 1]: the test above can fail.
    z = np.array([3.0, 2.2, 1.9, 0.5, -1.0, -4.0])
    gap = abs(expected_u(z, 0, 2.0) - expected_u(z, 0, 1.0))
    assert gap > 10 * math.sqrt(0.25 / (1500 * 20))


def brute_u(z: np.ndarray, d: np.ndarray, keys, K: int, theta_max: float) -> np.ndarray:
    """Independent reference: float64 softmax over the whole vocabulary, vocabulary ordered
    with the draft first, inverse-CDF sampling with the keyed uniforms."""
    thetas, r = unc.tp_draws(keys, K, theta_max)
    out = []
    for b in range(z.shape[0]):
        zz = np.asarray(z[b], dtype=np.float64)
        differs = []
        for t, rr in zip(thetas[b], r[b]):
            p = softmax64(zz / t)
            order = np.r_[d[b], np.delete(np.arange(len(zz)), d[b])]
            sample = order[np.searchsorted(np.cumsum(p[order]), rr, side="right")] if rr < p[order].sum() else order[-1]
            differs.append(sample != d[b])
        out.append(np.mean(differs))
    return np.array(out)


logit_rows = st.integers(1, 40).flatmap(
    lambda V: st.lists(
        st.one_of(st.floats(-60, 60, width=32), st.just(-math.inf), st.integers(-3, 3).map(float)),
        min_size=V,
        max_size=V,
    ).filter(lambda row: any(math.isfinite(v) for v in row))
)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(logit_rows, min_size=1, max_size=3).filter(lambda rs: len({len(r) for r in rs}) == 1),
    seed=st.integers(0, 2**31 - 1),
    theta_max=st.sampled_from([2.0, 0.3, 5.0]),
    parts=st.sampled_from([(1024, 64), (1, 1), (2, 3), (16, 2)]),
)
def test_fast_sampler_equals_brute_force(rows, seed, theta_max, parts):
    z = np.array(rows, dtype=np.float32)
    rng = np.random.default_rng(seed)
    d = np.array([rng.choice(len(r), p=softmax64(r)) for r in z])  # a draft with positive mass
    keys = [(seed, b, 7) for b in range(len(z))]
    old = unc._N_BINS, unc._TOP_M
    unc._N_BINS, unc._TOP_M = parts  # tiny histograms force the exact fallback
    try:
        fast = temperature_perturbation(z, d, keys, K=12, theta_max=theta_max)
    finally:
        unc._N_BINS, unc._TOP_M = old
    np.testing.assert_array_equal(fast, brute_u(z, d, keys, 12, theta_max))


def test_fallback_path_is_exercised(monkeypatch):
    calls = []
    real = unc.log_p_draft_exact
    monkeypatch.setattr(unc, "log_p_draft_exact", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(unc, "_N_BINS", 1)
    monkeypatch.setattr(unc, "_TOP_M", 1)
    z = torch.randn(4, 50)
    temperature_perturbation(z, torch.zeros(4, dtype=torch.long), [(0, i, 0) for i in range(4)])
    assert calls


def test_large_vocab_matches_brute_force():
    V = 151936
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, V, generator=g) * 2.5
    z[:, :20] += torch.linspace(14, 2, 20)
    d = np.array([0, 3, 1000])
    keys = [(1, b, 9) for b in range(3)]
    thetas, r = unc.tp_draws(keys, 20, 2.0)
    ref = []
    for b in range(3):
        lp = torch.log_softmax(z[b].double()[None, :] / torch.from_numpy(thetas[b])[:, None], dim=1)[:, d[b]]
        ref.append(np.mean(np.log(r[b]) >= lp.numpy()))
    np.testing.assert_array_equal(temperature_perturbation(z, d, keys), ref)


def test_deterministic_and_independent_of_batch_composition():
    z = torch.randn(5, 300) * 3
    d = torch.softmax(z, 1).argmax(1)
    keys = [(42, dev, 17) for dev in range(5)]
    u = temperature_perturbation(z, d, keys)
    np.testing.assert_array_equal(u, temperature_perturbation(z, d, keys))
    alone = [temperature_perturbation(z[i : i + 1], d[i : i + 1], keys[i : i + 1])[0] for i in range(5)]
    np.testing.assert_array_equal(u, alone)
    # another token index (or device, or seed) draws other temperatures
    base = unc.tp_draws(keys, 20, 2.0)[0]
    for other in (
        [(42, dev, 18) for dev in range(5)],
        [(42, dev + 1, 17) for dev in range(5)],
        [(43, dev, 17) for dev in range(5)],
    ):
        assert not np.array_equal(base, unc.tp_draws(other, 20, 2.0)[0])


def test_temperatures_lie_in_half_open_interval():
    thetas, r = unc.tp_draws([(0, 0, t) for t in range(500)], 20, 2.0)
    assert thetas.min() > 0 and thetas.max() <= 2.0
    assert abs(thetas.mean() - 1.0) < 0.02  # uniform: mean theta_max / 2, sd 0.577/sqrt(10000)
    assert 0 <= r.min() and r.max() < 1


def test_bad_logits_raise():
    with pytest.raises(ValueError, match="NaN"):
        temperature_perturbation(np.array([[0.0, np.nan]]), [0], [(0, 0, 0)])
    with pytest.raises(ValueError, match="batch"):
        temperature_perturbation(np.zeros((2, 3)), [0], [(0, 0, 0)])


def test_closed_form_estimators():
    V = 8
    uniform = np.full((1, V), 1 / V)
    onehot = np.eye(V)[[2]]
    x = np.array([[0.5, 0.25, 0.125, 0.125]])
    np.testing.assert_allclose(entropy(uniform), [math.log(V)])
    np.testing.assert_allclose(entropy(onehot), [0.0])
    np.testing.assert_allclose(entropy(x), [1.75 * math.log(2)])  # 1.75 bits
    np.testing.assert_allclose(one_minus_max(x), [0.5])
    np.testing.assert_allclose(one_minus_max(uniform), [1 - 1 / V])
    np.testing.assert_allclose(top2_margin(x), [0.75])  # 1 - (0.5 - 0.25)
    np.testing.assert_allclose(top2_margin(onehot), [0.0])
    np.testing.assert_allclose(top2_margin(np.array([[0.45, 0.45, 0.1]])), [1.0])
    np.testing.assert_allclose(top2_margin(np.ones((1, 1))), [0.0])


def test_estimators_are_vectorised_over_rows():
    g = np.random.default_rng(0)
    x = g.dirichlet(np.ones(30) * 0.3, size=6)
    for f in (entropy, one_minus_max, top2_margin):
        np.testing.assert_allclose(f(x), [f(row)[0] for row in x])


def test_float32_estimators_at_full_vocabulary_are_accurate():
    g = torch.Generator().manual_seed(2)
    x = torch.softmax(torch.randn(3, 151936, generator=g) * 3, dim=1)
    x64 = x.double()
    ref = -(torch.special.xlogy(x64, x64)).sum(dim=1).numpy()
    np.testing.assert_allclose(entropy(x), ref, rtol=1e-5)
    np.testing.assert_allclose(one_minus_max(x), 1 - x64.max(dim=1).values.numpy(), rtol=1e-7)
