"""Speculative verification maths (docs/design.md section 1, steps 1, 3, 6, 7).

Device: x = softmax(z / T), draft d ~ x. Server: x_hat = reconstruct(top-k of x), then accept
d with probability min(1, y_d / x_hat_d), else resample from r = norm(max(0, y - x_hat)).
With x_hat = x this is exact speculative sampling: the output is distributed as y. Under
truncation the output distribution is, in closed form (hybrid_distribution),

    P(v) = sum_d x_d [ a_d 1{v = d} + (1 - a_d) r_v ],   a_d = min(1, y_d / x_hat_d).

Fidelity (docs/design.md section 7): the exact TV distance to y of the law a committed token was
drawn from, over every draft the policy could have been asked about: agents.fidelity.

Random draws: every function takes its randomness from an rng argument (a numpy Generator
that the call site keys with policies.rng.keyed_rng(seed, device, token_index, purpose)),
and consumes a fixed number of uniforms whatever the outcome: one per draft, two per
verification (accept, resample). The *_uniforms functions are the deterministic cores,
driven by given uniforms, one row per token: a token does not depend on what else was in its
batch.

All maths is float64; per token the cost is a few O(V) numpy passes (no Python loops over V).
"""

from __future__ import annotations

import math

import numpy as np

_SMALL_VOCAB = 256  # up to here one vectorised compare beats a binary search per row


def softmax_t(logits, temperature: float) -> np.ndarray:
    """x = softmax(z / T) over the last axis, float64. T = 0 is greedy: one-hot on the
    first argmax (the T -> 0 limit up to ties), computed explicitly rather than dividing by 0."""
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0.0:
        x = np.zeros_like(z)
        np.put_along_axis(x, np.argmax(z, axis=-1)[..., None], 1.0, axis=-1)
        return x
    # Shift before scaling: (z - max) / T <= 0, so a tiny T underflows to 0 instead of inf - inf.
    # In place after the first pass: at V = 151936 each pass over the row counts.
    e = z - z.max(axis=-1, keepdims=True)
    if temperature != 1.0:
        with np.errstate(over="ignore"):
            e /= temperature
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def sample_from_uniforms(probs, u) -> np.ndarray:
    """Inverse-CDF sampling, one uniform per row: row i gives the first v with
    cumsum(probs_i)[v] > u_i * sum(probs_i). Exact (P(v) = p_v / sum p), never a zero-mass
    token. probs: (B, V) nonnegative, u: (B,) in [0, 1). Returns (B,) int64."""
    cdf = np.cumsum(np.asarray(probs, dtype=np.float64), axis=-1)
    total = cdf[:, -1]
    if not np.all(total > 0) or not np.all(np.isfinite(total)):
        raise ValueError("cannot sample: a row of probabilities has no positive, finite mass")
    target = np.asarray(u, dtype=np.float64) * total
    if cdf.shape[1] <= _SMALL_VOCAB:
        # searchsorted(side="right") for all rows at once: the number of entries <= target.
        tokens = np.count_nonzero(cdf <= target[:, None], axis=-1)
    else:
        tokens = np.array([np.searchsorted(c, t, side="right") for c, t in zip(cdf, target)], dtype=np.int64)
    for row in np.flatnonzero(tokens == cdf.shape[1]):
        # u * total rounded up to total (u within an ulp of 1): take the last token with mass.
        tokens[row] = np.flatnonzero(np.diff(cdf[row], prepend=0.0) > 0)[-1]
    return tokens.astype(np.int64, copy=False)


def sample_draft(probs, rng: np.random.Generator) -> int:
    """d ~ probs with one uniform from rng (inverse CDF)."""
    return int(sample_from_uniforms(np.asarray(probs)[None], np.array([rng.random()]))[0])


def reconstruct(indices, probs, vocab_size: int) -> np.ndarray:
    """x_hat: the k sent entries as sent, the remaining mass 1 - sum spread uniformly over the
    other V - k tokens (docs/design.md step 6). k = V gives exactly the sent vector. Quantisation
    rounds to nearest, so the sent mass can exceed 1 slightly; then the rest get 0 and x_hat
    sums a little above 1 (verify does not assume normalisation)."""
    idx = np.asarray(indices, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    k = idx.shape[0]
    if idx.ndim != 1 or p.shape != idx.shape or k > vocab_size:
        raise ValueError(
            f"reconstruct: need 1-D indices and probs of equal length <= vocab_size {vocab_size}, "
            f"got shapes {idx.shape} and {p.shape}"
        )
    if k and (idx.min() < 0 or idx.max() >= vocab_size):
        raise ValueError(f"reconstruct: indices must lie in [0, {vocab_size})")
    rest = max(0.0, 1.0 - float(p.sum())) / (vocab_size - k) if k < vocab_size else 0.0
    x_hat = np.full(vocab_size, rest)
    x_hat[idx] = p
    return x_hat


def rejection_prob(x_d, y_d) -> np.ndarray:
    """beta = max(0, 1 - y_d / x_d): the probability the LLM rejects a draft d with x_d = x[d] under the
    SLM and y_d = y[d] under the LLM (docs/design.md section 1, step 3). x_d = 0 (a draft that could not
    have been drawn, or whose x_d underflowed to 0 in float32 on the wire) counts as never rejected.
    Elementwise over numbers or arrays, in float64 (the verifier rounds it as the wire carries it)."""
    x_d, y_d = np.asarray(x_d, dtype=np.float64), np.asarray(y_d, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x_d > 0, np.maximum(0.0, 1.0 - y_d / x_d), 0.0)


def verify_from_uniforms(drafts, x_hats, ys, u_accept, u_resample) -> tuple[np.ndarray, np.ndarray]:
    """The verification rule for a batch, driven by given uniforms in [0, 1).

    Accept d when u_accept * x_hat_d < y_d (probability min(1, y_d / x_hat_d), and always
    when x_hat_d = 0 < y_d). On reject, sample from r = norm(max(0, y - x_hat)) with
    u_resample; when r is all zero (y <= x_hat everywhere: a rejection only rounding or an
    x_hat summing above 1 allows) sample from y instead. Returns (tokens, accepted).
    """
    drafts = np.asarray(drafts, dtype=np.int64)
    x_hats, ys = np.asarray(x_hats), np.asarray(ys)
    if x_hats.shape != ys.shape or x_hats.shape[:1] != drafts.shape:
        raise ValueError(f"verify: shapes of drafts {drafts.shape}, x_hats {x_hats.shape} and ys {ys.shape} disagree")
    if drafts.size and not (drafts.min() >= 0 and drafts.max() < ys.shape[1]):
        raise ValueError(f"verify: draft tokens must lie in [0, {ys.shape[1]})")
    rows = np.arange(drafts.shape[0])
    accepted = np.asarray(u_accept) * x_hats[rows, drafts].astype(np.float64) < ys[rows, drafts]
    tokens = drafts.copy()
    rejected = np.flatnonzero(~accepted)
    if rejected.size:
        y = ys[rejected].astype(np.float64)
        residual = np.maximum(y - x_hats[rejected], 0.0)
        empty = ~(residual.sum(axis=-1) > 0)
        residual[empty] = y[empty]
        tokens[rejected] = sample_from_uniforms(residual, np.asarray(u_resample)[rejected])
    return tokens, accepted


def verify(draft: int, x_hat, y, rng: np.random.Generator) -> tuple[int, bool]:
    """Verify one draft against the LLM distribution y; two uniforms from rng."""
    u = rng.random(2)
    tokens, accepted = verify_from_uniforms(
        np.array([draft]), np.asarray(x_hat)[None], np.asarray(y)[None], u[:1], u[1:]
    )
    return int(tokens[0]), bool(accepted[0])


def accept_prob(x_hat, y) -> np.ndarray:
    """a_d = P(accept d) = min(1, y_d / x_hat_d) for every d, as verify_from_uniforms draws it
    (x_hat_d = 0: accepted exactly when y_d > 0)."""
    x_hat, y = np.asarray(x_hat, dtype=np.float64), np.asarray(y, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x_hat > 0, np.minimum(1.0, y / x_hat), (y > 0).astype(np.float64))


def residual_law(x_hat, y) -> np.ndarray:
    """r = norm(max(0, y - x_hat)), or y where that is all zero (as verify_from_uniforms resamples)."""
    x_hat, y = np.asarray(x_hat, dtype=np.float64), np.asarray(y, dtype=np.float64)
    residual = np.maximum(y - x_hat, 0.0)
    total = residual.sum()
    return residual / total if total > 0 else y / y.sum()


def hybrid_distribution(x, x_hat, y) -> np.ndarray:
    """The exact output distribution of "d ~ x, then verify against x_hat": the closed form in
    the module docstring. Equals y when x_hat = x."""
    x = np.asarray(x, dtype=np.float64)
    accept = accept_prob(x_hat, y)
    return x * accept + (x * (1.0 - accept)).sum() * residual_law(x_hat, y)


def tv_distance(p, q):
    """Total-variation distance 0.5 * sum |p - q| over the last axis, in float64 (a float for one
    pair of distributions, an array for rows)."""
    d = 0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum(axis=-1)
    return float(d) if d.ndim == 0 else d


def verified_fidelity(x, x_hat, y) -> float:
    """TV(hybrid(x, x_hat, y), y): how far the law of a verified token (draft d ~ x, verified
    against the server's x_hat) is from the LLM's y. 0 when x_hat = x, up to rounding."""
    return tv_distance(hybrid_distribution(x, x_hat, y), y)
