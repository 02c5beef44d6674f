"""Exact fidelity of a committed token (docs/design.md section 7): TV(P, y), where P is the law the token
was drawn from over the draft d and over all of the policy's randomness at that step, and y is the LLM's
distribution at that position.

P is the mixture of policies.law: a skipped draft commits d; a transmitted one is verified against
the xhat the server reconstructs from the top-k the device would send for that d,

    P(t) = x_t s_t + sum_k [ x_t w_{t,k} a_{t,k} + R_k r_k(t) ],
    a_{d,k} = min(1, y_d / xhat^k_d),  R_k = sum_d x_d w_{d,k} (1 - a_{d,k}),  r_k = norm(max(0, y - xhat^k)),

so each distinct k costs a few O(V) passes, whatever the number of drafts. This is the same for a
skipped token and a verified one: both were drawn from P; the branch that happened says nothing more.
"""

from __future__ import annotations

import numpy as np

from agents import codec
from agents.speculative import accept_prob, reconstruct, residual_law, tv_distance, verified_fidelity
from policies.law import DraftLaw


def truncate_for_upload(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k entries of x (indices, probabilities), largest first; k = |V|: all of x as is."""
    v = probs.shape[0]
    k = min(max(k, 0), v)
    if k == v:
        return np.arange(v), probs
    top = np.argpartition(probs, v - k)[v - k :] if k else np.empty(0, dtype=np.int64)
    top = top[np.argsort(-probs[top], kind="stable")]
    return top, probs[top]


def server_x_hat(x: np.ndarray, k: int, prob_bits: int) -> np.ndarray:
    """The xhat the verifier reconstructs from a top-k upload of x at prob_bits: the payload's round
    trip (agents.codec quantises each entry on its own) then DESIGN step 6, without encoding bytes."""
    indices, probs = truncate_for_upload(x, k)
    return reconstruct(indices, codec.quantise_probs(probs, prob_bits), x.shape[0])


def committed_law(x: np.ndarray, law: DraftLaw, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, y) in the law's order (DraftLaw.order; TV does not depend on it): P(t) of the module
    docstring, float64 [V]."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if law.order is None:  # one k: the server's xhat directly
        ((k, _, w),) = law.groups
        w = x * w
        x_hat = server_x_hat(x, k, law.prob_bits)
        a = accept_prob(x_hat, y)
        return x * law.skip + w * a + float((w * (1.0 - a)).sum()) * residual_law(x_hat, y), y
    ys = y[law.order]
    return _committed_sorted(x[law.order], law, ys, x), ys


def _committed_sorted(xs: np.ndarray, law: DraftLaw, ys: np.ndarray, x: np.ndarray) -> np.ndarray:
    """committed_law with many k (online k*), in the order of x descending: the top-k of every k is a
    prefix, so xhat^k is the quantised prefix and one value c_k after it; each k costs a few O(V) passes.
    Where x ties across a k's boundary the server's own top-k (argpartition) may differ from the prefix:
    that k's xhat is rebuilt exactly (server_x_hat)."""
    V = xs.shape[0]
    qs = codec.quantise_probs(xs, law.prob_bits)
    q_prefix = np.concatenate([[0.0], np.cumsum(qs)])
    inside = np.maximum(ys - qs, 0.0)  # y - xhat where a token is among the sent entries
    inside_prefix = np.concatenate([[0.0], np.cumsum(inside)])
    p = xs * law.skip

    def rest(k: int) -> float:  # xhat^k after the prefix: the unsent mass spread evenly (reconstruct)
        return max(0.0, 1.0 - q_prefix[k]) / (V - k) if k < V else 0.0

    resampled: dict[int, float] = {}  # k -> mass that goes to r_k
    exact: dict[int, np.ndarray] = {}
    for k, pos, w in law.groups:
        x_hat = exact.get(k)
        if x_hat is None and k < V and xs[k - 1] == xs[k]:
            x_hat = exact[k] = server_x_hat(x, k, law.prob_bits)[law.order]
        if x_hat is not None:
            xh = x_hat if pos is None else x_hat[pos]
        else:
            at = np.arange(V) if pos is None else pos
            xh = np.where(at < k, qs[at], rest(k))
        at_y = ys if pos is None else ys[pos]
        at_x = xs if pos is None else xs[pos]
        a = accept_prob(xh, at_y)
        m = at_x * w
        if pos is None:
            p += m * a
        else:
            np.add.at(p, pos, m * a)
        resampled[k] = resampled.get(k, 0.0) + float((m * (1.0 - a)).sum())
    for k, mass in resampled.items():
        if mass <= 0.0:
            continue
        if k in exact:
            p += mass * residual_law(exact[k], ys)
            continue
        after = np.maximum(ys[k:] - rest(k), 0.0)
        total = inside_prefix[k] + float(after.sum())
        if total > 0:
            p[:k] += (mass / total) * inside[:k]
            p[k:] += (mass / total) * after
        else:
            p += mass * ys / ys.sum()
    return p


def exact_fidelity(logits: np.ndarray, x: np.ndarray, law, y: np.ndarray) -> float:
    """TV(P, y) for a token whose policy decided with `law` (policies.law.DecisionLaw); logits: the SLM
    logits the policy saw (temperature perturbation's u is a function of them and of d)."""
    return tv_distance(*committed_law(x, law.draft_law(logits, x), y))


def branch_fidelity(x: np.ndarray, y: np.ndarray, payload: bytes | None) -> float:
    """fidelity_tv_branch, the measure before the decision law (kept for every token, and all that a
    plug-in policy without a law gets): the TV of the branch that happened, TV(x, y) for a skipped token
    and TV(hybrid(x, xhat, y), y) for a verified one (xhat from its payload). It equals the exact value
    only when neither the skip nor the truncation depends on the draft."""
    if payload is None:
        return tv_distance(x, y)
    p = codec.decode_payload_ex(payload)
    return verified_fidelity(x, reconstruct(p.indices, p.probs, p.vocab_size), y)
