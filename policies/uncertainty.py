"""Uncertainty estimators u(t) (docs/design.md section 1, step 2), vectorised over devices.

Every estimator maps a batch of B devices to u [B] (float64), larger = more uncertain:

- `temperature_perturbation` (the paper's default): K temperatures theta_k ~ U(0, theta_max],
  one sample from softmax(z / theta_k) each, u = fraction of samples that differ from the
  draft d. Random draws from keyed_rng(seed, device, token_index, "uncertainty").
- `entropy`: H(x) = -sum x log x in nats (0 .. log V).
- `one_minus_max`: 1 - max(x) (0 .. 1 - 1/V).
- `top2_margin`: 1 - (x_(1) - x_(2)) (0 when one token holds all mass, 1 when the top two tie).

x is the draft distribution softmax(z / T) at the sampling temperature; temperature
perturbation uses the raw logits z, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from policies.base import Array, Key, TokenBatch
from policies.rng import keyed_rng

# Temperature perturbation: exact top entries + a histogram bound on the rest. See
# `_log_p_draft_bounds`; these only trade work between the fast path and the exact fallback.
_TOP_M = 64
_N_BINS = 1024
_ROWS_PER_CHUNK = 8
_LOG_MARGIN = 1e-9  # slack on log-probabilities, far above float64 summation error
_SPAN = 200.0  # entries more than this below the top-M go to the underflow bin


def _as_tensor(a: Array, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = torch.as_tensor(a)
    if t.dim() == 1:
        t = t[None, :]
    return t.to(dtype)


# --------------------------------------------------------------------------- temperature perturbation


def tp_draws(keys: Sequence[Key], K: int, theta_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Per device: K temperatures in (0, theta_max] and K uniforms in [0, 1), in that order
    from keyed_rng(seed, device, token_index, "uncertainty")."""
    thetas = np.empty((len(keys), K))
    r = np.empty((len(keys), K))
    for i, (seed, device, token_index) in enumerate(keys):
        g = keyed_rng(seed, device, token_index, "uncertainty")
        thetas[i] = theta_max * (1.0 - g.random(K))  # (0, theta_max], never 0
        r[i] = g.random(K)
    return thetas, r


def log_p_draft_exact(e: torch.Tensor, draft: int, thetas: torch.Tensor) -> torch.Tensor:
    """log softmax(z / theta)_d for each theta, float64, from e = z - max(z) (float64 [V])."""
    scaled = e[None, :] / thetas[:, None]
    return scaled[:, draft] - torch.logsumexp(scaled, dim=1)


def _log_p_draft_bounds(
    z: torch.Tensor, drafts: torch.Tensor, thetas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower/upper bounds on log softmax(z / theta)_d for a chunk of rows, in O(V) per row.

    With e = z - max(z) <= 0, the normaliser S(theta) = sum_i exp(e_i / theta) is split into
    the top-M entries and the draft (exact, float64) and the rest, all <= tau (the M-th
    largest e). The rest is binned by distance below tau, bin i holding n_i entries in
    [tau - (i+1) w, tau - i w], so with q = exp(-w / theta) and Q = sum_i n_i q^i:
        exp((tau - w) / theta) Q  <=  rest  <=  exp(tau / theta) Q  (+ the underflow bin).
    Binning runs in float32 (the O(V) part); `slack` widens every edge far beyond float32
    rounding. Entries more than N_BINS bins below tau (incl. -inf) share an underflow bin
    bounded by [0, exp(lo / theta)] each.
    """
    R, V = z.shape
    M = min(_TOP_M, V)
    n_bins = min(_N_BINS, max(1, V - M))  # no more bins than entries to put in them
    rows = torch.arange(R)
    m = z.max(dim=1, keepdim=True).values
    m64 = m.double()
    e = z - m  # float32, <= 0, rounded (monotone, so order is kept up to ties)
    # The top-M by z itself (rounding e could merge ties); the rest has z <= z_(M) exactly.
    top_z, top_i = z.topk(M, dim=1)
    top_e = e.gather(1, top_i)
    top64 = top_z.double() - m64  # exact: z is float32, so z - max is exact in float64
    tau = top64[:, -1]
    finite_tau = torch.isfinite(tau)  # else the whole rest is -inf
    lo = torch.maximum(e.amin(dim=1).double(), tau - _SPAN)
    lo = torch.where(torch.isfinite(lo) & (tau > lo), lo, tau)  # tau == lo: a single bin
    lo = torch.where(finite_tau, lo, torch.zeros_like(lo))
    width = torch.where(tau > lo, (tau - lo) / n_bins, torch.ones_like(tau))
    inv_w = (1.0 / width).float()[:, None]
    tau32 = torch.where(finite_tau[:, None], top_e[:, -1:], torch.zeros_like(top_e[:, -1:]))
    nb = n_bins + 1  # bins 0..n_bins-1 below tau, then the underflow bin

    def bin_of(v: torch.Tensor) -> torch.Tensor:
        return ((tau32[: v.shape[0]] - v) * inv_w[: v.shape[0]]).clamp_(0, n_bins).to(torch.int32)

    offsets = (rows * nb).to(torch.int32)[:, None]
    counts = torch.bincount((bin_of(e) + offsets).flatten(), minlength=R * nb)
    counts -= torch.bincount((bin_of(top_e) + offsets).flatten(), minlength=R * nb)
    e_d = e[rows, drafts]
    d_in_top = (top_i == drafts[:, None]).any(dim=1)
    d_bin = (bin_of(e_d[:, None])[:, 0] + offsets[:, 0]).long()
    counts[d_bin[~d_in_top]] -= 1  # the draft is counted exactly below, not in the rest
    counts = counts.view(R, nb).double()
    binned, n_under = counts[:, :n_bins], counts[:, n_bins]

    e_d64 = z[rows, drafts].double() - m64[:, 0]
    slack = 1e-5 * (1.0 + lo.abs()) + 1e-3 * width  # >> float32 rounding of e and of bin indices
    inv = 1.0 / thetas  # [R, K]
    neg_inf = torch.tensor(-math.inf, dtype=torch.float64)
    known = torch.cat(
        [
            top64[:, None, :] * inv[:, :, None],
            torch.where(d_in_top[:, None], neg_inf, e_d64[:, None] * inv)[:, :, None],
        ],
        dim=2,
    )
    log_known = torch.logsumexp(known, dim=2)
    q = torch.exp(-width[:, None] * inv)  # [R, K], in (0, 1]
    powers = torch.cat(
        [torch.ones(R, thetas.shape[1], 1, dtype=torch.float64), q[:, :, None].expand(-1, -1, n_bins - 1)], dim=2
    ).cumprod(dim=2)
    log_q = torch.bmm(powers, binned[:, :, None])[:, :, 0].log()  # -inf when the rest is empty
    log_rest_hi = (tau + slack)[:, None] * inv + log_q
    log_rest_lo = (tau - width - slack)[:, None] * inv + log_q
    under_edge = torch.minimum(tau - n_bins * width + slack, tau)
    log_under = torch.where(n_under > 0, n_under.clamp(min=1).log(), neg_inf)[:, None] + under_edge[:, None] * inv
    log_s_lo = torch.logaddexp(log_known, log_rest_lo)
    log_s_hi = torch.logaddexp(torch.logaddexp(log_known, log_rest_hi), log_under)
    num = e_d64[:, None] * inv
    return num - log_s_hi, num - log_s_lo


def temperature_perturbation(
    logits: Array, drafts: Array | Sequence[int], keys: Sequence[Key], K: int = 20, theta_max: float = 2.0
) -> np.ndarray:
    """u = (1/K) #{k : s_k != d}, s_k ~ softmax(z / theta_k), theta_k ~ U(0, theta_max].

    Exact sampling, only of what u needs: order the vocabulary with d first and sample by
    inversion with a uniform r_k, so s_k == d exactly when r_k < softmax(z / theta_k)_d.
    That probability is bracketed in O(V) per device (exact top entries + histogram of the
    rest); only when r_k falls inside the bracket is it computed over the full vocabulary.
    The result equals full-vocabulary float64 sampling with the same r_k.
    """
    z = _as_tensor(logits)
    d = torch.as_tensor(drafts, dtype=torch.long).reshape(-1)
    if z.shape[0] != d.shape[0] or len(keys) != d.shape[0]:
        raise ValueError(f"batch mismatch: logits {tuple(z.shape)}, {d.shape[0]} drafts, {len(keys)} keys")
    thetas_np, r_np = tp_draws(keys, K, theta_max)
    with np.errstate(divide="ignore"):
        log_r = torch.from_numpy(np.log(r_np))  # log 0 = -inf: always "same"
    thetas = torch.from_numpy(thetas_np)
    differs = torch.empty(thetas.shape, dtype=torch.bool)
    for start in range(0, z.shape[0], _ROWS_PER_CHUNK):
        sl = slice(start, start + _ROWS_PER_CHUNK)
        zc = z[sl]
        top = zc.max(dim=1).values
        if not torch.isfinite(top).all():  # max is NaN if any entry is NaN
            raise ValueError("logits contain NaN or +inf, or a row is all -inf")
        lp_lo, lp_hi = _log_p_draft_bounds(zc, d[sl], thetas[sl])
        lr = log_r[sl]
        same = lr < lp_lo - _LOG_MARGIN
        diff = lr >= lp_hi + _LOG_MARGIN
        for row, col in (~(same | diff)).nonzero().tolist():
            z64 = zc[row].double()
            lp = log_p_draft_exact(z64 - z64.max(), int(d[start + row]), thetas[start + row, col : col + 1])
            diff[row, col] = bool(lr[row, col] >= lp[0])
        differs[sl] = diff
    return differs.double().mean(dim=1).numpy()


# --------------------------------------------------------------------------- closed-form estimators


def _probs(probs: Array) -> torch.Tensor:
    x = torch.as_tensor(probs)
    x = x[None, :] if x.dim() == 1 else x
    return x if x.is_floating_point() else x.double()


def entropy(probs: Array) -> np.ndarray:
    """H(x) = -sum_i x_i log x_i in nats (0 log 0 = 0), in x's precision (torch's cascade
    summation keeps float32 within ~1e-6 relative)."""
    x = _probs(probs)
    return (-(x * x.clamp(min=torch.finfo(x.dtype).tiny).log()).sum(dim=1)).double().numpy()


def one_minus_max(probs: Array) -> np.ndarray:
    """1 - max_i x_i."""
    return (1.0 - _probs(probs).max(dim=1).values.double()).numpy()


def top2_margin(probs: Array) -> np.ndarray:
    """1 - (x_(1) - x_(2)): the complement of the gap between the two most likely tokens, so
    larger = more uncertain like every other estimator. With V == 1 it is 0."""
    x = _probs(probs)
    if x.shape[1] < 2:
        return np.zeros(x.shape[0])
    top2 = x.topk(2, dim=1).values.double()
    return (1.0 - (top2[:, 0] - top2[:, 1])).numpy()


# --------------------------------------------------------------------------- swappable parts


@dataclass(frozen=True)
class TemperaturePerturbation:
    K: int = 20
    theta_max: float = 2.0
    name = "temperature"

    def __call__(self, batch: TokenBatch) -> np.ndarray:
        if batch.logits is None:
            raise ValueError("temperature perturbation needs the SLM logits (got logits=None)")
        return temperature_perturbation(batch.logits, batch.drafts, batch.keys, self.K, self.theta_max)


@dataclass(frozen=True)
class ProbsEstimator:
    """An estimator that is a pure function of x (entropy, 1 - max, top-2 margin)."""

    name: str

    def __call__(self, batch: TokenBatch) -> np.ndarray:
        return CLOSED_FORM[self.name](batch.probs)


CLOSED_FORM = {"entropy": entropy, "max": one_minus_max, "margin": top2_margin}
ESTIMATORS = ("temperature", *CLOSED_FORM)


def make_estimator(name: str, K: int = 20, theta_max: float = 2.0) -> TemperaturePerturbation | ProbsEstimator:
    """The estimator called `name` (one of ESTIMATORS)."""
    if name == "temperature":
        return TemperaturePerturbation(K, theta_max)
    if name in CLOSED_FORM:
        return ProbsEstimator(name)
    raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}")


# --------------------------------------------------------------------------- its law over the draft


def _perturbation_nodes(theta_max: float, panels: int = 4, order: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Nodes theta_i and weights w_i with sum_i w_i f(theta_i) ~ E[f(theta)], theta ~ U(0, theta_max]:
    composite Gauss-Legendre in t with theta = theta_max t^2, which clusters nodes where softmax(z / theta)
    changes fastest (small theta) and makes the integrand vanish smoothly at 0."""
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(0.0, 1.0, panels + 1)
    t = np.concatenate([(a + b) / 2 + (b - a) / 2 * x for a, b in zip(edges[:-1], edges[1:])])
    wt = np.concatenate([(b - a) / 2 * w for a, b in zip(edges[:-1], edges[1:])])
    return theta_max * t * t, 2.0 * t * wt  # d theta / theta_max = 2 t dt


def perturbation_keep_prob(logits: Array, theta_max: float = 2.0, *, panels: int = 4, order: int = 8) -> np.ndarray:
    """p_d = E_theta[softmax(z / theta)_d], theta ~ U(0, theta_max], for every token d: the probability
    that one perturbed sample of temperature perturbation equals d. Given the draft d, the K samples
    differ from it independently with probability q_d = 1 - p_d, so u = j / K with j ~ Binomial(K, q_d)
    (the decision law, policies.law).

    Quadrature (_perturbation_nodes, 32 nodes): against a 1,024-node rule, |error| <= 5e-9 on every
    entry for real Qwen2.5-Coder logits, and <= 2e-5 for adversarial logits whose top two differ by
    1e-3 to 1e-2 (the integrand then steps at theta ~ the gap); tests/policies/test_law.py checks both
    (lm-like logits at 1e-8).
    O(nodes x V) work in float64: one exp per node and token serves the normaliser and p alike."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64).reshape(-1)
    if not torch.isfinite(z.max()):
        raise ValueError("logits contain NaN or +inf, or are all -inf")
    e = z - z.max()
    thetas, weights = _perturbation_nodes(theta_max, panels, order)
    acc = torch.zeros_like(e)
    for th, w in zip(np.array_split(thetas, 4), np.array_split(weights, 4)):  # 8 x V at a time
        E = torch.exp(e[None, :] / torch.from_numpy(th)[:, None])  # e <= 0 with max 0: no overflow, Z >= 1
        acc += (torch.from_numpy(w) / E.sum(dim=1)) @ E
    return acc.numpy()
