"""U_TV and k* against a brute-force reference that builds xhat explicitly (O(V^2))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import policies.truncation as tr
from policies import calibrate_offline_k, online_k_star, top_p_k, u_tv


def l_ref(z: float, eta: float) -> float:
    return math.log1p(math.exp(eta * z)) / eta


def brute_u_tv(x: np.ndarray, d: int, beta: float, eta: float) -> np.ndarray:
    """U_TV(k), k = 1..V: keep the top-k of x, spread the rest uniformly, sum |x - xhat|."""
    x = np.asarray(x, dtype=np.float64)
    x = x / x.sum()
    V = len(x)
    order = np.argsort(-x, kind="stable")
    den = (1 - x[d]) * l_ref(-1.0, eta) + x[d] * l_ref(-beta, eta)
    out = []
    for k in range(1, V + 1):
        xhat = np.empty(V)
        kept = order[:k]
        xhat[:] = (1.0 - x[kept].sum()) / (V - k) if k < V else 0.0
        xhat[kept] = x[kept]
        out.append(np.abs(x - xhat).sum() / den)
    return np.array(out)


def first_within(u: np.ndarray, theta: float) -> int:
    return int(np.argmax(u <= theta)) + 1


prob_vectors = (
    st.integers(1, 48)
    .flatmap(
        lambda V: st.lists(
            st.one_of(st.floats(0, 1), st.just(0.0), st.sampled_from([0.25, 0.5, 1e-9])),
            min_size=V,
            max_size=V,
        )
    )
    .filter(lambda v: sum(v) > 1e-6)
    .map(lambda v: np.array(v) / sum(v))
)


@settings(max_examples=150, deadline=None)
@given(x=prob_vectors, beta=st.floats(0, 1), eta=st.sampled_from([0.5, 1.0, 4.0, 20.0]), data=st.data())
def test_u_tv_matches_brute_force(x, beta, eta, data):
    d = data.draw(st.integers(0, len(x) - 1))
    den = (1 - x[d]) * l_ref(-1.0, eta) + x[d] * l_ref(-beta, eta)
    # The reference's 1 - sum(top-k) cancels: compare numerators at float64 resolution of 1.
    np.testing.assert_allclose(
        u_tv(x, [d], [beta], eta)[0].numpy() * den, brute_u_tv(x, d, beta, eta) * den, rtol=1e-9, atol=1e-14
    )
    np.testing.assert_allclose(tr.tv_denominator(x[d], beta, eta).item(), den, rtol=1e-12)


@settings(max_examples=150, deadline=None)
@given(
    x=prob_vectors, beta=st.floats(0, 1), theta=st.floats(0.0, 3.0), head=st.sampled_from([256, 1, 3]), data=st.data()
)
def test_online_k_star_is_the_first_k_within_budget(x, beta, theta, head, data):
    d = data.draw(st.integers(0, len(x) - 1))
    ref = brute_u_tv(x, d, beta, 1.0)
    old = tr._HEAD_M
    tr._HEAD_M = head  # small heads force the binary search and the full-sort fallback
    try:
        k = int(online_k_star(x, [d], [beta], theta, 1.0)[0])
    finally:
        tr._HEAD_M = old
    assert 1 <= k <= len(x)
    tol = 1e-9
    assert ref[k - 1] <= theta + tol
    assert (ref[: k - 1] > theta - tol).all()


@settings(max_examples=100, deadline=None)
@given(x=prob_vectors)
def test_numerator_is_non_increasing_in_k(x):
    # The property the binary search and the monotonicity in theta rest on.
    ref = brute_u_tv(x, 0, 0.3, 1.0)
    assert (np.diff(ref) <= 1e-12).all()


@settings(max_examples=100, deadline=None)
@given(x=prob_vectors, t1=st.floats(0, 2), t2=st.floats(0, 2), beta=st.floats(0, 1))
def test_larger_theta_never_sends_more(x, t1, t2, beta):
    lo, hi = sorted((t1, t2))
    k_lo = online_k_star(x, [0], [beta], lo, 1.0)[0]
    k_hi = online_k_star(x, [0], [beta], hi, 1.0)[0]
    assert k_hi <= k_lo


def test_batch_rows_are_independent_and_head_paths_agree():
    g = np.random.default_rng(3)
    V = 5000
    logits = g.normal(0, 2.0, (12, V))
    logits[:6, :5] += 12  # peaked rows: decided from the head
    x = torch.softmax(torch.from_numpy(logits), 1).float()
    d = np.zeros(12, dtype=np.int64)
    beta = g.uniform(0, 1, 12)
    k = online_k_star(x, d, beta, 0.1, 1.0)
    full = [int(np.argmax(u_tv(x[i], [0], [beta[i]], 1.0)[0].numpy() <= 0.1)) + 1 for i in range(12)]
    np.testing.assert_array_equal(k, full)
    np.testing.assert_array_equal(k, [online_k_star(x[i], [0], [beta[i]], 0.1, 1.0)[0] for i in range(12)])


def test_closed_form_example():
    # x = (0.5, 0.3, 0.2): k=1 spreads 0.5 over two tokens -> |0.3-0.25| + |0.2-0.25| = 0.1.
    x = np.array([0.5, 0.3, 0.2])
    den = 0.5 * l_ref(-1, 1.0) + 0.5 * l_ref(-0.4, 1.0)  # d = 0, beta = 0.4
    np.testing.assert_allclose(u_tv(x, [0], [0.4], 1.0)[0].numpy(), [0.1 / den, 0.0, 0.0])
    assert online_k_star(x, [0], [0.4], 0.1001 / den, 1.0)[0] == 1
    assert online_k_star(x, [0], [0.4], 0.099 / den, 1.0)[0] == 2


def test_offline_k_matches_brute_force_and_accepts_lists():
    g = np.random.default_rng(7)
    probs = g.dirichlet(np.ones(40) * 0.2, size=25)
    drafts = g.integers(0, 40, 25)
    betas = g.uniform(0, 1, 25)
    mean = np.mean([brute_u_tv(p, d, b, 2.0) for p, d, b in zip(probs, drafts, betas)], axis=0)
    for theta in (0.0, 0.05, 0.2, 1.0, 5.0):
        k = calibrate_offline_k(probs, drafts, betas, theta, 2.0)
        assert k == first_within(mean, theta + 1e-12)
        assert k == calibrate_offline_k(list(probs), list(drafts), list(betas), theta, 2.0)
    with pytest.raises(ValueError):
        calibrate_offline_k(probs, drafts[:3], betas, 0.1, 1.0)


def test_top_p():
    x = np.array([[0.2, 0.5, 0.3]])
    assert top_p_k(x, 0.5)[0] == 1
    assert top_p_k(x, 0.8)[0] == 2
    assert top_p_k(x, 0.81)[0] == 3
    assert top_p_k(x, 1.0)[0] == 3
    big = np.random.default_rng(0).dirichlet(np.ones(3000) * 0.5, size=3)
    old = tr._HEAD_M
    try:
        tr._HEAD_M = 2  # force the full-sort path
        slow = top_p_k(big, 0.9)
    finally:
        tr._HEAD_M = old
    np.testing.assert_array_equal(top_p_k(big, 0.9), slow)
    ref = [int(np.argmax(np.cumsum(np.sort(r)[::-1]) >= 0.9)) + 1 for r in big]
    np.testing.assert_array_equal(slow, ref)


def test_bad_parameters():
    with pytest.raises(ValueError, match="theta"):
        online_k_star(np.ones(4) / 4, [0], [0.1], -0.1, 1.0)
    with pytest.raises(ValueError, match="eta"):
        online_k_star(np.ones(4) / 4, [0], [0.1], 0.1, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        online_k_star(np.ones(4) / 4, [0], [float("nan")], 0.1, 1.0)
    with pytest.raises(ValueError, match="top_p"):
        top_p_k(np.ones(4) / 4, 0.0)


def test_head_bracket_and_binary_search_agree_with_full_sort(monkeypatch):
    # Peaked rows with a light uniform tail: with an 8-entry head the bracket [a, b] is
    # wide, so k* comes from the binary search on the exact numerator (or the fallback).
    g = np.random.default_rng(0)
    x = torch.from_numpy(0.98 * g.dirichlet(np.ones(100) * 0.05, size=40) + 0.02 / 100)
    d = g.integers(0, 100, 40)
    beta = g.uniform(0, 1, 40)
    expected = online_k_star(x, d, beta, 0.4, 1.0)  # head 256 > V: exact in one pass
    monkeypatch.setattr(tr, "_HEAD_M", 8)
    np.testing.assert_array_equal(online_k_star(x, d, beta, 0.4, 1.0), expected)
    budget = 0.4 * tr.tv_denominator(tr._draft_probs(x, d), beta, 1.0)
    head = tr._head_k_star(x, budget)
    assert ((head > 0) & (head <= 8)).sum() >= 5 and (head == 0).sum() >= 5  # both outcomes occur
