"""Speculative verification: exactness by statistics (with negative controls), edge cases,
and agreement between the single, batched and uniform-driven forms."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import codec, speculative
from agents.speculative import (
    hybrid_distribution,
    reconstruct,
    rejection_prob,
    sample_draft,
    sample_from_uniforms,
    softmax_t,
    verify,
    verify_from_uniforms,
)
from policies.rng import keyed_rng

# A small vocabulary with a clear gap between x and y, so wrong rules are visibly wrong.
X = np.array([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02])
Y = np.array([0.10, 0.30, 0.05, 0.20, 0.05, 0.15, 0.10, 0.05])
N = 400_000
DELTA = 1e-6  # allowed probability of a false failure per comparison


def tolerance(p: np.ndarray, n: int, delta: float = DELTA) -> np.ndarray:
    """Per-token bound on |empirical - p| that holds for all tokens at once with probability
    >= 1 - delta (Bernstein's inequality for a Bernoulli mean plus a union bound; rigorous)."""
    log_term = np.log(2 * len(p) / delta)
    return np.sqrt(2 * p * (1 - p) * log_term / n) + 2 * log_term / (3 * n)


def deviation(tokens: np.ndarray, p: np.ndarray) -> float:
    """max_v |empirical_v - p_v| / tolerance_v: <= 1 means consistent with p."""
    freq = np.bincount(tokens, minlength=len(p)) / len(tokens)
    return float(np.max(np.abs(freq - p) / tolerance(p, len(tokens))))


def guaranteed_rejection(q: np.ndarray, p: np.ndarray, n: int) -> float:
    """How far a rule with true output q lands from p, in p's tolerances, even after its own
    sampling noise: > 1 means `deviation` rejects it with probability >= 1 - delta."""
    return float(np.max((np.abs(q - p) - tolerance(q, n)) / tolerance(p, n)))


def simulate(x, x_hat, y, n=N, seed=0):
    """n independent rounds of "draft d ~ x, then verify against x_hat" through the module."""
    u = np.random.default_rng(seed).random((3, n))
    drafts = sample_from_uniforms(np.broadcast_to(x, (n, len(x))), u[0])
    tokens, accepted = verify_from_uniforms(
        drafts, np.broadcast_to(x_hat, (n, len(x))), np.broadcast_to(y, (n, len(x))), u[1], u[2]
    )
    return drafts, tokens, accepted


def closed_form(x, x_hat, y) -> np.ndarray:
    """P(out = v) = sum_d x_d [a_d 1{v=d} + (1 - a_d) r_v], written out token by token."""
    V = len(x)
    residual = np.maximum(y - x_hat, 0.0)
    r = residual / residual.sum()
    p = np.zeros(V)
    for d in range(V):
        a = min(1.0, y[d] / x_hat[d])
        for v in range(V):
            p[v] += x[d] * (a * (v == d) + (1 - a) * r[v])
    return p


def truncated_x_hat(k=3, bits=8):
    """x_hat as the server sees it: top-k of X through the real codec, then reconstructed."""
    top = np.argsort(-X, kind="stable")[:k]
    indices, probs, vocab = codec.decode_payload(codec.encode_payload(top, X[top], len(X), bits))
    return reconstruct(indices, probs, vocab)


# --- the statistical tests -----------------------------------------------------------------


def test_untruncated_output_is_exactly_y():
    drafts, tokens, accepted = simulate(X, X, Y)
    assert deviation(drafts, X) <= 1.0
    assert deviation(tokens, Y) <= 1.0
    # Acceptance rate is sum_d min(x_d, y_d) = 1 - TV(x, y).
    assert abs(accepted.mean() - np.minimum(X, Y).sum()) <= tolerance(np.array([np.minimum(X, Y).sum()]), N)[0]
    assert np.allclose(hybrid_distribution(X, X, Y), Y, atol=1e-15)


def test_negative_control_resampling_from_y_is_caught():
    """A classic bug (on reject, sample from y instead of norm(max(0, y - x))) must fail the test."""
    u = np.random.default_rng(1).random((3, N))
    drafts = sample_from_uniforms(np.broadcast_to(X, (N, 8)), u[0])
    accepted = u[1] * X[drafts] < Y[drafts]
    wrong = np.where(accepted, drafts, sample_from_uniforms(np.broadcast_to(Y, (N, 8)), u[2]))
    q = np.minimum(X, Y) + (1 - np.minimum(X, Y).sum()) * Y  # its exact output distribution
    assert guaranteed_rejection(q, Y, N) > 1.0
    assert deviation(wrong, Y) > 1.0


def test_truncated_output_matches_closed_form_hybrid_distribution():
    x_hat = truncated_x_hat()
    assert not np.allclose(x_hat, X)  # truncation really changed the distribution
    expected = closed_form(X, x_hat, Y)
    assert np.allclose(hybrid_distribution(X, x_hat, Y), expected, atol=1e-15)
    assert abs(expected.sum() - 1) < 1e-12
    _, tokens, _ = simulate(X, x_hat, Y, seed=2)
    assert deviation(tokens, expected) <= 1.0
    # The hybrid distribution is measurably not y: a test against y would have to fail.
    assert guaranteed_rejection(expected, Y, N) > 1.0
    assert deviation(tokens, Y) > 1.0


def test_negative_control_using_x_instead_of_x_hat_under_truncation_is_caught():
    """Verifying against the device's x (which the server never has) gives y, not the hybrid
    distribution; the statistic must tell them apart."""
    expected = closed_form(X, truncated_x_hat(), Y)
    _, wrong, _ = simulate(X, X, Y, seed=3)
    assert guaranteed_rejection(Y, expected, N) > 1.0
    assert deviation(wrong, expected) > 1.0


def test_negative_control_accepting_with_x_but_resampling_with_x_hat_is_caught():
    x_hat = truncated_x_hat()
    expected = closed_form(X, x_hat, Y)
    u = np.random.default_rng(4).random((3, N))
    drafts = sample_from_uniforms(np.broadcast_to(X, (N, 8)), u[0])
    accepted = u[1] * X[drafts] < Y[drafts]
    residual = np.maximum(Y - x_hat, 0)
    wrong = np.where(accepted, drafts, sample_from_uniforms(np.broadcast_to(residual, (N, 8)), u[2]))
    a = np.minimum(1, Y / X)
    q = X * a + (X * (1 - a)).sum() * residual / residual.sum()
    assert guaranteed_rejection(q, expected, N) > 1.0
    assert deviation(wrong, expected) > 1.0


def test_public_rng_api_is_exact_too():
    """The same statistics through verify / sample_draft with a real Generator."""
    n = 20_000
    rng = np.random.default_rng(5)
    x_hat = truncated_x_hat(k=4, bits=16)
    expected = closed_form(X, x_hat, Y)
    drafts = np.array([sample_draft(X, rng) for _ in range(n)])
    tokens = np.array([verify(int(d), x_hat, Y, rng)[0] for d in drafts])
    assert deviation(drafts, X) <= 1.0
    assert deviation(tokens, expected) <= 1.0


# --- forms agree, keyed randomness ------------------------------------------------------------


def test_single_and_uniform_forms_agree_with_keyed_rngs():
    V, B = 1000, 16
    rng = np.random.default_rng(6)
    xs = softmax_t(rng.normal(size=(B, V)) * 3, 1.0)
    ys = softmax_t(rng.normal(size=(B, V)) * 3, 0.7)
    x_hats = np.stack([reconstruct(np.argsort(-x)[:20], x[np.argsort(-x)[:20]], V) for x in xs])
    keys = [(7, device, 3, "verify") for device in range(B)]
    drafts = np.array([sample_draft(xs[i], keyed_rng(7, i, 3, "draft")) for i in range(B)])
    assert (
        drafts.tolist()
        == sample_from_uniforms(xs, np.array([keyed_rng(7, i, 3, "draft").random() for i in range(B)])).tolist()
    )
    u = np.array([keyed_rng(*k).random(2) for k in keys])  # verify's two uniforms per row
    tokens, accepted = verify_from_uniforms(drafts, x_hats, ys, u[:, 0], u[:, 1])
    singles = [verify(int(drafts[i]), x_hats[i], ys[i], keyed_rng(*keys[i])) for i in range(B)]
    assert tokens.tolist() == [t for t, _ in singles]
    assert accepted.tolist() == [a for _, a in singles]
    # A row's verdict does not depend on the rest of its batch.
    half, _ = verify_from_uniforms(drafts[::2], x_hats[::2], ys[::2], u[::2, 0], u[::2, 1])
    assert half.tolist() == tokens[::2].tolist()
    assert 0 < accepted.sum() < B  # both branches exercised


def test_vectorised_and_binary_search_sampling_agree(monkeypatch):
    rng = np.random.default_rng(8)
    probs = rng.dirichlet(np.full(300, 0.3), size=64)
    probs[:, ::7] = 0.0
    u = rng.random(64)
    fast = sample_from_uniforms(probs, u)
    monkeypatch.setattr(speculative, "_SMALL_VOCAB", 10_000)
    assert sample_from_uniforms(probs, u).tolist() == fast.tolist()


# --- edge cases --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.0, 1e-300, 0.1, 0.5, 3.0]), min_size=1, max_size=12).filter(any),
    st.one_of(st.floats(0, 1, exclude_max=True), st.just(np.nextafter(1.0, 0.0)), st.just(0.0)),
)
def test_sampling_never_picks_a_zero_mass_token(weights, u):
    p = np.array(weights)
    token = int(sample_from_uniforms(p[None], np.array([u]))[0])
    assert p[token] > 0


def test_sampling_ends_of_the_unit_interval():
    p = np.array([0.0, 0.2, 0.0, 0.8, 0.0])
    assert sample_from_uniforms(p[None], np.array([0.0]))[0] == 1
    assert sample_from_uniforms(p[None], np.array([np.nextafter(1.0, 0.0)]))[0] == 3
    with pytest.raises(ValueError, match="no positive"):
        sample_from_uniforms(np.zeros((1, 4)), np.array([0.5]))


def test_softmax_t():
    z = np.array([[1.0, 2.0, 3.0, 3.0], [0.0, -1.0, 5.0, 2.0]])
    for T in (0.3, 1.0, 2.0):
        e = np.exp(z / T)
        assert np.allclose(softmax_t(z, T), e / e.sum(-1, keepdims=True), rtol=1e-14)
    assert softmax_t(z, 0.0).tolist() == [[0, 0, 1, 0], [0, 0, 1, 0]]  # first argmax on ties
    tiny = softmax_t(z, 1e-300)
    assert np.all(np.isfinite(tiny)) and tiny[1].tolist() == [0, 0, 1, 0]
    assert np.allclose(softmax_t(np.array([0.0, -np.inf, 1.0]), 1.0).sum(), 1)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            softmax_t(z, bad)


def test_reconstruct():
    x_hat = reconstruct([3, 0], [0.5, 0.2], 6)
    assert np.allclose(x_hat, [0.2, 0.075, 0.075, 0.5, 0.075, 0.075])
    full = np.array([0.1, 0.2, 0.3, 0.4])
    assert reconstruct([3, 2, 1, 0], full[::-1], 4).tolist() == full.tolist()  # k = V: exactly as sent
    over = reconstruct([0, 1], [0.6, 0.5], 4)  # rounding pushed the sent mass above 1
    assert over.tolist() == [0.6, 0.5, 0.0, 0.0]
    assert reconstruct([], [], 4).tolist() == [0.25] * 4
    with pytest.raises(ValueError):
        reconstruct([4], [0.5], 4)
    with pytest.raises(ValueError):
        reconstruct([-1], [0.5], 4)


def test_rejection_prob():
    x, y = np.array([0.5, 0.3, 0.2, 0.0]), np.array([0.25, 0.6, 0.15, 0.0])
    assert rejection_prob(x[0], y[0]) == pytest.approx(0.5)
    assert rejection_prob(x[1], y[1]) == 0.0
    assert rejection_prob(x[2], y[2]) == pytest.approx(0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warning either
        assert rejection_prob(x[3], y[3]) == 0.0  # x_d = 0: never drawn, never rejected
        assert rejection_prob(0.0, 0.1) == 0.0
    assert np.allclose(rejection_prob(x, y), [0.5, 0.0, 0.25, 0.0])


def test_the_verifier_measures_beta_with_rejection_prob():
    """The verifier's betas (verdict and shadows) are rejection_prob of the wire's x_d, rounded to
    float32 as the wire carries them, bit for bit; an x_d that underflowed to 0 gives 0, not NaN."""
    from agents.verdicts import _wire_beta

    rng = np.random.default_rng(3)
    x_d, y_d = np.float32(rng.random(64)).astype(np.float64), rng.random(64)
    want = np.maximum(0.0, 1.0 - y_d / x_d).astype(np.float32)  # the formula, written out
    assert _wire_beta(x_d, y_d).tobytes() == want.tobytes()
    assert float(_wire_beta(float(x_d[0]), y_d[0])) == float(want[0])
    assert _wire_beta(np.array([0.0]), np.array([0.0])).tolist() == [0.0]


def test_verify_degenerate_residual_falls_back_to_y():
    """x_hat = y and a draft neither gives mass: rejected, and r = 0 everywhere."""
    y = np.array([0.0, 0.5, 0.5, 0.0])
    tokens, accepted = verify_from_uniforms([0, 0], np.stack([y, y]), np.stack([y, y]), [0.0, 0.9], [0.1, 0.9])
    assert not accepted.any() and tokens.tolist() == [1, 2]
    token, ok = verify(3, y, y, np.random.default_rng(0))
    assert not ok and y[token] > 0


def test_verify_accepts_when_x_hat_gives_the_draft_no_mass():
    token, accepted = verify(2, np.array([0.5, 0.5, 0.0]), np.array([0.2, 0.2, 0.6]), np.random.default_rng(0))
    assert (token, accepted) == (2, True)


def test_verify_consumes_two_uniforms_whatever_the_outcome():
    x_hat, y = np.array([0.9, 0.1]), np.array([0.1, 0.9])
    for draft in (0, 1):
        rng = np.random.default_rng(9)
        verify(draft, x_hat, y, rng)
        assert rng.random() == np.random.default_rng(9).random(3)[2]


def test_verify_rejects_inconsistent_input_with_value_error():
    y = np.array([0.5, 0.5])
    with pytest.raises(ValueError, match="draft tokens"):
        verify(2, y, y, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shapes"):
        verify(0, np.array([0.5, 0.25, 0.25]), y, np.random.default_rng(0))
