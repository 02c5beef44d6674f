"""Truncators: how many of the top entries of x to upload (docs/design.md section 1, steps 5-6).

The server reconstructs xhat: the k sent entries kept, the remaining mass 1 - sum(top-k)
spread uniformly over the other V - k tokens. The distortion bound of the paper is

    U_TV(k) = sum_{i>k} |x_(i) - xhat_(i)|  /  ((1 - x_d) l(-1) + x_d l(-beta_d)),
    l(z) = log(1 + exp(eta z)) / eta,   beta_d = clip(a*u + b, 0, 1),

with x_(1) >= x_(2) >= ... the sorted probabilities (entries i <= k are kept exactly, so
only the tail contributes). Strategies: full (k = V), top-k, top-p, offline k* (one k for
all tokens: the smallest k whose mean U_TV over a calibration set is <= theta) and online
k*(t) (per token: the smallest k with U_TV(k) <= theta). k is always in 1..V.

Computing U_TV for every k in O(V log V): the tail after k has mean c_k = R_k / (V - k),
R_k = sum_{i>k} x_(i), and its entries sum to (V - k) c_k, so
sum_{i>k} |x_(i) - c_k| = 2 sum_{i>k, x_(i) > c_k} (x_(i) - c_k). The entries above c_k form
a prefix of the sorted order, found by binary search. The numerator is non-increasing in
k (removing the largest tail entry never increases it), so k*(t) shrinks as theta grows.
Probabilities are renormalised to sum 1 in float64 first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from policies.base import Array, TokenBatch
from policies.rejection import RejectionModel

TRUNCATIONS = ("full", "top-k", "top-p", "online", "offline")
_ELEMENTS_PER_CHUNK = 1 << 21  # rows x V per chunk: bounds memory at ~16 MB per float64 array
_HEAD_M = 256  # online k* / top-p: entries looked at before falling back to a full sort


def _rows(probs: Array) -> torch.Tensor:
    x = torch.as_tensor(probs)
    return x[None, :] if x.dim() == 1 else x


def _chunks(n_rows: int, vocab: int) -> Iterator[slice]:
    step = max(1, _ELEMENTS_PER_CHUNK // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield slice(start, start + step)


def sorted_probs(probs: Array) -> torch.Tensor:
    """x sorted descending, float64, renormalised to sum 1 per row."""
    s = torch.sort(_rows(probs), dim=1, descending=True).values.double()
    return s / s.sum(dim=1, keepdim=True)


def tv_numerator(s: torch.Tensor) -> torch.Tensor:
    """N(k) = sum_{i>k} |x_(i) - xhat_(i)| for k = 1..V (column k-1), from sorted rows s."""
    R, V = s.shape
    suffix = s.flip(1).cumsum(1).flip(1)  # suffix[:, i] = sum_{j >= i} s_j (0-based)
    suffix = torch.cat([suffix, torch.zeros(R, 1, dtype=s.dtype)], dim=1)  # suffix[:, V] = 0
    k = torch.arange(1, V + 1)
    tail = suffix[:, 1:]  # R_k for k = 1..V
    c = tail / (V - k).clamp(min=1)  # tail mean; R_V = 0 gives c = 0
    # j(k) = #{i : x_(i) > c_k}, a prefix of the sorted order; at least k (x_(i) >= c_k, i <= k).
    j = torch.searchsorted(-s, -c, side="left")
    j = torch.maximum(j, k.expand_as(j))
    above = tail - suffix.gather(1, j)  # sum_{k < i <= j} x_(i)
    return (2.0 * (above - (j - k) * c)).clamp(min=0.0)


def softplus_l(z: float | Array, eta: float) -> torch.Tensor:
    """l(z) = log(1 + exp(eta z)) / eta."""
    ez = torch.as_tensor(z, dtype=torch.float64) * eta
    return torch.logaddexp(torch.zeros_like(ez), ez) / eta  # log1p-accurate for very negative eta*z


def tv_denominator(x_d: float | Array, beta_d: float | Array, eta: float) -> torch.Tensor:
    """(1 - x_d) l(-1) + x_d l(-beta_d); > 0 for every eta > 0."""
    x = torch.as_tensor(x_d, dtype=torch.float64)
    beta = torch.as_tensor(beta_d, dtype=torch.float64)
    return (1.0 - x) * softplus_l(-1.0, eta) + x * softplus_l(-beta, eta)


def _draft_probs(probs: torch.Tensor, drafts: Array) -> torch.Tensor:
    x = probs.double()
    d = torch.as_tensor(drafts, dtype=torch.long).reshape(-1, 1)
    return (x.gather(1, d)[:, 0]) / x.sum(dim=1)


def u_tv(probs: Array, drafts: Array, beta_d: float | Array, eta: float) -> torch.Tensor:
    """U_TV(k) for k = 1..V (column k-1), float64 [B, V]. Materialises B x V; for whole
    batches prefer online_k_star, which works in chunks."""
    x = _rows(probs)
    return tv_numerator(sorted_probs(x)) / tv_denominator(_draft_probs(x, drafts), beta_d, eta)[:, None]


def _check(theta: float, eta: float) -> None:
    if not theta >= 0:
        raise ValueError(f"theta must be >= 0, got {theta}")
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")


def _head_k_star(x: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """k* from the top-M entries plus O(V) passes, or 0 where k* > M (then: full sort).

    With S the top-M entries and m_out = 1 - sum(S) the mass outside, the part of the
    numerator over S, N_S(k) = 2 sum_{i in S, i > k} (x_(i) - c_k)^+, brackets the whole for
    k <= M: N_S(k) <= N(k) <= N_S(k) + 2 m_out (an entry outside S adds at most its mass).
    So k* lies in [a, b]: a = first k with N_S(k) <= budget, b = first k with
    N_S(k) + 2 m_out <= budget. Where a < b, binary search on the exact N(k) (non-increasing
    in k), each evaluation one pass over the row: N(k) = 2 (G(c_k) - (P_k - k c_k)) with
    G(c) = sum_i (x_i - c)^+.
    """
    R, V = x.shape
    M = min(_HEAD_M, V)
    total = x.sum(dim=1, dtype=torch.float64, keepdim=True)
    s = x.topk(M, dim=1).values.double() / total
    P = s.cumsum(dim=1)
    k = torch.arange(1, M + 1)
    c = (1.0 - P).clamp(min=0.0) / (V - k).clamp(min=1)
    j = torch.maximum(torch.searchsorted(-s, -c, side="left"), k.expand(R, M))
    P0 = torch.cat([torch.zeros(R, 1, dtype=P.dtype), P], dim=1)  # P0[:, i] = sum of top i
    n_s = (2.0 * ((P0.gather(1, j) - P) - (j - k) * c)).clamp(min=0.0)
    m_out = (1.0 - P[:, -1:]).clamp(min=0.0) if M < V else torch.zeros(R, 1, dtype=P.dtype)
    maybe = n_s <= budget[:, None]
    sure = n_s + 2.0 * m_out <= budget[:, None]
    a = torch.where(maybe.any(dim=1), maybe.int().argmax(dim=1), M)  # 0-based; M = none
    b = torch.where(sure.any(dim=1), sure.int().argmax(dim=1), M)
    out = torch.where(a == b, a + 1, 0)
    out[a == M] = 0  # every k <= M surely above the budget: k* > M
    for r in ((a < b) & (a < M)).nonzero()[:, 0].tolist():
        row = x[r].double() / total[r]
        lo, hi = int(a[r]), int(b[r])
        if hi == M:  # no k <= M surely within: is the last one?
            if not _within(row, c[r], P[r], budget[r], M - 1):
                continue  # k* > M
            hi = M - 1
        while lo < hi:  # first i in [lo, hi] within; i = hi is
            mid = (lo + hi) // 2
            if _within(row, c[r], P[r], budget[r], mid):
                hi = mid
            else:
                lo = mid + 1
        out[r] = lo + 1
    return out


def _within(row: torch.Tensor, c: torch.Tensor, P: torch.Tensor, budget: torch.Tensor, i: int) -> bool:
    """Exact N(k = i + 1) <= budget for one row: one pass, N(k) = 2 (G(c_k) - (P_k - k c_k))."""
    g = (row - c[i]).clamp_(min=0.0).sum()
    return bool(2.0 * (g - (P[i] - (i + 1) * c[i])) <= budget)


def online_k_star(probs: Array, drafts: Array, beta_d: npt.ArrayLike, theta: float, eta: float) -> np.ndarray:
    """k*(t) = smallest k in 1..V with U_TV(k) <= theta, per row. [B] int64.

    Decided from the top entries where they suffice (see _head_k_star), else by the full
    sort; both give the same k up to float64 rounding at the budget's edge.
    """
    _check(theta, eta)
    x = _rows(probs)
    beta = torch.as_tensor(np.asarray(beta_d, dtype=np.float64)).reshape(-1)
    if torch.isnan(beta).any():
        raise ValueError("beta_d is NaN: online truncation needs an uncertainty estimate")
    d = np.asarray(drafts).reshape(-1)
    out = np.empty(x.shape[0], dtype=np.int64)
    for sl in _chunks(x.shape[0], x.shape[1]):
        budget = theta * tv_denominator(_draft_probs(x[sl], d[sl]), beta[sl], eta)
        k = _head_k_star(x[sl], budget)
        rest = (k == 0).nonzero()[:, 0]
        if len(rest):
            ok = tv_numerator(sorted_probs(x[sl][rest])) <= budget[rest, None]
            k[rest] = ok.int().argmax(dim=1) + 1  # first True; the last column (N = 0) always is
        out[sl] = k.numpy()
    return out


def calibrate_offline_k(
    probs: Array | Sequence[np.ndarray], drafts: npt.ArrayLike, betas: npt.ArrayLike, theta: float, eta: float
) -> int:
    """Offline k*: the smallest k whose mean U_TV(k) over the calibration tokens is <= theta.

    probs: [N, V] matrix or a list of N [V] vectors (same V); drafts: [N] draft ids; betas:
    [N] rejection probabilities beta_d for the denominator (observed in a calibration run,
    or predicted as clip(a*u + b, 0, 1)).
    """
    _check(theta, eta)
    x = _rows(probs if isinstance(probs, (np.ndarray, torch.Tensor)) else np.stack([np.asarray(p) for p in probs]))
    d = np.asarray(drafts).reshape(-1)
    beta = np.asarray(betas, dtype=np.float64).reshape(-1)
    if not (x.shape[0] == d.size == beta.size) or x.shape[0] == 0:
        raise ValueError(f"need matching non-empty probs/drafts/betas, got {x.shape[0]}/{d.size}/{beta.size}")
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for sl in _chunks(x.shape[0], x.shape[1]):
        total += u_tv(x[sl], d[sl], beta[sl], eta).sum(dim=0)
    ok = total / x.shape[0] <= theta
    return int(ok.int().argmax()) + 1 if bool(ok.any()) else int(x.shape[1])


def top_p_k(probs: Array, p: float) -> np.ndarray:
    """Smallest k whose top-k mass reaches p (nucleus), per row; from the top entries when
    they reach p, else by a full sort."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    x = _rows(probs)
    V = x.shape[1]
    out = np.empty(x.shape[0], dtype=np.int64)
    for sl in _chunks(x.shape[0], V):
        xs = x[sl]
        head = xs.topk(min(_HEAD_M, V), dim=1).values.double() / xs.sum(dim=1, dtype=torch.float64, keepdim=True)
        k = (head.cumsum(dim=1) < p).sum(dim=1) + 1
        rest = (k > head.shape[1]).nonzero()[:, 0]
        if len(rest):
            k[rest] = (sorted_probs(xs[rest]).cumsum(dim=1) < p).sum(dim=1) + 1
        out[sl] = np.minimum(k.numpy(), V)
    return out


# --------------------------------------------------------------------------- swappable parts
# A truncator is called with the transmitted rows and their uncertainties and returns k [B]. Its
# `law(batch, i, u)` (for the decision law, policies.law) gives row i's k for every value u may take:
# ("k", k) when one k serves every draft, ("beta", beta [J]) for online k* at each u.
TruncationLaw = tuple[str, int | np.ndarray]


@dataclass(frozen=True)
class Full:
    def __call__(self, batch: TokenBatch, u: np.ndarray) -> np.ndarray:
        return np.full(len(batch), batch.vocab_size, dtype=np.int64)

    def law(self, batch: TokenBatch, i: int, u: np.ndarray) -> TruncationLaw:
        return "k", batch.vocab_size


@dataclass(frozen=True)
class TopK:
    """A fixed k (clipped to V); also the offline k* once calibrated."""

    k: int

    def __call__(self, batch: TokenBatch, u: np.ndarray) -> np.ndarray:
        return np.full(len(batch), min(self.k, batch.vocab_size), dtype=np.int64)

    def law(self, batch: TokenBatch, i: int, u: np.ndarray) -> TruncationLaw:
        return "k", min(self.k, batch.vocab_size)


@dataclass(frozen=True)
class TopP:
    p: float

    def __call__(self, batch: TokenBatch, u: np.ndarray) -> np.ndarray:
        return top_p_k(batch.probs, self.p)

    def law(self, batch: TokenBatch, i: int, u: np.ndarray) -> TruncationLaw:
        return "k", int(top_p_k(batch.rows[i], self.p)[0])  # a function of x alone


class BetaModel(Protocol):
    """What online k* needs of a rejection model: beta_d for each u (RejectionModel: clip(a*u + b, 0, 1))."""

    def beta(self, u: npt.ArrayLike) -> np.ndarray: ...


@dataclass(frozen=True)
class OnlineKStar:
    theta: float
    eta: float
    model: BetaModel = field(default_factory=RejectionModel)

    def __call__(self, batch: TokenBatch, u: np.ndarray) -> np.ndarray:
        return online_k_star(batch.probs, batch.drafts, self.model.beta(u), self.theta, self.eta)

    def law(self, batch: TokenBatch, i: int, u: np.ndarray) -> TruncationLaw:
        return "beta", self.model.beta(u)


class KStarTable:
    """Online k* for every candidate draft of one token (the decision law, policies.law): x is sorted
    once (`order`: token ids by x descending, ties by id; `rank`: its inverse); a draft d with budget
    theta ((1 - x_d) l(-1) + x_d l(-beta)) gets the smallest k with N(k) <= budget. The budget grows with
    x_d (l(-beta) >= l(-1)), so only the drafts above the step that the smallest budget falls on can get a
    smaller k. N(k) is computed only as far as the smallest budget asked needs (doubling from 256), each
    value in O(log V) from prefix sums: N(k) = 2 (sum_{k < i <= j} x_(i) - (j - k) c_k), j = #{x_(i) > c_k}."""

    def __init__(self, probs: Array, theta: float, eta: float):
        _check(theta, eta)
        x = torch.as_tensor(np.asarray(probs)).double().reshape(-1)
        values, order = torch.sort(x, descending=True, stable=True)
        total = float(values.sum())
        self.theta, self.eta = theta, eta
        self.order = order.numpy()
        self.rank = np.empty_like(self.order)
        self.rank[self.order] = np.arange(self.order.size)
        self.s = values.numpy() / total  # sorted, renormalised
        self.prefix = np.concatenate([[0.0], np.cumsum(self.s)])  # prefix[k] = sum of the top k
        self.n = np.zeros(0)  # N(k) at index k - 1, for k = 1..len(n)
        self.x_d = x.numpy() / total  # x_d as _draft_probs sees it

    def _extend(self, floor: float) -> None:
        """Compute N(k) for k = 1, 2, ... until N(k) <= floor (or k = V, where N = 0)."""
        V = self.s.size
        while not (self.n.size and (self.n[-1] <= floor or self.n.size == V)):
            k = np.arange(self.n.size + 1, min(V, max(256, 2 * self.n.size)) + 1)
            rest = np.clip(1.0 - self.prefix[k], 0.0, None)
            c = np.where(k < V, rest / np.maximum(V - k, 1), 0.0)
            j = np.maximum(np.searchsorted(-self.s, -c, side="left"), k)  # entries above the tail mean
            self.n = np.concatenate(
                [self.n, np.clip(2.0 * ((self.prefix[j] - self.prefix[k]) - (j - k) * c), 0.0, None)]
            )

    def _k(self, budget: np.ndarray) -> np.ndarray:
        return np.searchsorted(-self.n, -budget, side="left") + 1  # first k with N(k) <= budget

    def k_for(self, beta: float, drafts: np.ndarray | None = None) -> np.ndarray:
        """k*(d) for each draft d of `drafts` (default: every token) at rejection probability beta."""
        x_d = self.x_d if drafts is None else self.x_d[drafts]
        l_1, l_beta = float(softplus_l(-1.0, self.eta)), float(softplus_l(-float(beta), self.eta))
        budget = self.theta * ((1.0 - x_d) * l_1 + x_d * l_beta)  # tv_denominator with its two l values
        if not budget.size:
            return np.zeros(0, dtype=np.int64)
        self._extend(float(budget.min()))
        k_hi = int(self._k(np.array([budget.min()]))[0])
        k = np.full(budget.shape, k_hi, dtype=np.int64)
        if k_hi > 1:
            near = np.flatnonzero(budget >= self.n[k_hi - 2])  # could reach a smaller k
            k[near] = self._k(budget[near])
        return k
