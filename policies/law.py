"""The decision law of a policy: what it would have decided for every draft d the SLM could have drawn
(docs/design.md section 1, "the decision law").

A policy's decision for one token may depend on the draft d: temperature-perturbation u counts the
perturbed samples that differ from d, and online k*(t) uses x_d and beta_d. The law of the committed
token is then a mixture over d (agents.fidelity.committed_law),

    P(t) = sum_d x_d [ s_d 1{t = d} + sum_k w_{d,k} (a_{d,k} 1{t = d} + (1 - a_{d,k}) r_k(t)) ],

with s_d = P(skip | d) and w_{d,k} = P(transmit with k entries | d) over the policy's own randomness
at this step (perturbation draws, random skip and probe coins), a_{d,k} = min(1, y_d / xhat^k_d) and
r_k = norm(max(0, y - xhat^k)). The exact fidelity (section 7) is TV(P, y).

A `DecisionLaw` is the small record a policy returns with its Decision (Decision.law): the policy's
state as it decided, as a function of u. `draft_law(z, x)` expands it into per-draft arrays when the
verdict brings y. How u depends on d:
- estimators of x alone (entropy, max, margin) give every d the same u: one value (J = 1);
- temperature perturbation: u = j / K with j ~ Binomial(K, q_d), q_d = 1 - E_theta[softmax(z / theta)_d]
  (policies.uncertainty.perturbation_keep_prob), so the law holds one entry per j (J = K + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from policies.base import Array
from policies.truncation import KStarTable
from policies.uncertainty import perturbation_keep_prob

# Temperature perturbation: drafts whose samples almost surely all differ from them (u = 1) are not
# expanded over j. Treating d's u as 1 moves P by at most x_d P(j < K | d) <= x_d K p_d (p_d = 1 - q_d);
# the drafts left out are those with the smallest such bounds, as many as keep their sum <= TAIL_TV
# (DraftLaw.tail_tv: the sum). On Qwen logits this leaves a few hundred to a few thousand to expand.
TAIL_TV = 1e-8


@dataclass(frozen=True)
class DraftLaw:
    """For every candidate draft d: P(skip | d) and the transmissions, as groups (k, positions, weights):
    P(transmit with k entries | d) at those positions (None: at every position, weights [V]).

    Positions index `order` (token ids by x descending: the order online k* sorts in), or the
    vocabulary itself when `order` is None (one k for every draft: nothing needs sorting). `tail_tv`
    bounds the TV error of drafts not expanded over u (TAIL_TV)."""

    order: np.ndarray | None
    skip: np.ndarray
    groups: tuple[tuple[int, np.ndarray | None, np.ndarray], ...]
    prob_bits: int
    tail_tv: float = 0.0

    def transmit(self, k: int) -> np.ndarray:
        """P(transmit with k entries | d) for every d, in vocabulary order [V] (for tests and reports)."""
        V = self.skip.shape[0]
        out = np.zeros(V)
        for kk, pos, w in self.groups:
            if kk != k:
                continue
            if pos is None:
                out += w
            else:
                np.add.at(out, pos, w)

        return out if self.order is None else out[_inverse(self.order)]

    def skip_by_token(self) -> np.ndarray:
        return self.skip if self.order is None else self.skip[_inverse(self.order)]


def _inverse(order: np.ndarray) -> np.ndarray:
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank


@dataclass(frozen=True, eq=False)
class DecisionLaw:
    """The decision as a function of u: P(skip | u_j) and, when transmitting, the k (one for every
    draft) or online k*'s beta_d at u_j. `K` > 0: u = j / K, j ~ Binomial(K, q_d); else u is the same
    for every draft (J = 1)."""

    p_skip: np.ndarray  # [J]
    prob_bits: int
    k: int | None = None  # full, top-k, top-p, offline: the k of every transmission
    beta: np.ndarray | None = None  # online k*: [J] beta_d in U_TV's denominator at u_j
    theta: float = 0.0
    eta: float = 1.0
    K: int = 0
    theta_max: float = 2.0

    def __post_init__(self) -> None:
        if (self.k is None) == (self.beta is None):
            raise ValueError("a DecisionLaw needs exactly one of k (fixed) and beta (online k*)")

    def draft_law(self, logits: Array, x: np.ndarray) -> DraftLaw:
        """Per-draft skip and transmission probabilities for this token (z: the SLM logits the policy
        saw, x = softmax(z / T) the draft was sampled from)."""
        x = np.asarray(x, dtype=np.float64)
        V = x.shape[0]
        varies = np.ptp(self.p_skip) > 0 or (self.beta is not None and np.ptp(self.beta) > 0)
        if not (self.K and varies):  # one u for every draft: J = 1 in effect
            skip = np.full(V, float(self.p_skip[0]))
            if self.k is not None:
                return DraftLaw(None, skip, ((int(min(self.k, V)), None, 1.0 - skip),), self.prob_bits)
            assert self.beta is not None  # __post_init__: exactly one of k and beta
            table = KStarTable(x, self.theta, self.eta)
            return _online(table, skip, [(None, np.full(V, 1.0 - self.p_skip[0]), float(self.beta[0]))], self.prob_bits)
        # temperature perturbation: expand the head over j = 0..K; the tail has u = 1 (j = K)
        keep = perturbation_keep_prob(logits, self.theta_max)
        reach = self.K * x * keep
        by_reach = np.argsort(reach, kind="stable")
        n_tail = int(np.searchsorted(np.cumsum(reach[by_reach]), TAIL_TV, side="right"))
        head, tail = np.sort(by_reach[n_tail:]), np.sort(by_reach[:n_tail])
        u_law = binomial_pmf(self.K, 1.0 - keep[head])  # [H, J]
        skip = np.full(V, float(self.p_skip[-1]))
        skip[head] = u_law @ self.p_skip
        tail_tv = float(reach[tail].sum())
        if self.k is not None:
            return DraftLaw(None, skip, ((int(min(self.k, V)), None, 1.0 - skip),), self.prob_bits, tail_tv)
        assert self.beta is not None  # __post_init__: exactly one of k and beta
        table = KStarTable(x, self.theta, self.eta)
        parts: list[OnlinePart] = [
            (head, u_law[:, j] * (1.0 - self.p_skip[j]), float(self.beta[j])) for j in range(self.K + 1)
        ]
        parts.append((tail, np.full(tail.size, 1.0 - self.p_skip[-1]), float(self.beta[-1])))
        return _online(table, skip, parts, self.prob_bits, tail_tv)


OnlinePart = tuple[np.ndarray | None, np.ndarray, float]  # (drafts, or None for all; weights; beta_d)


def _online(
    table: KStarTable, skip: np.ndarray, parts: list[OnlinePart], prob_bits: int, tail_tv: float = 0.0
) -> DraftLaw:
    """Group online k*'s transmissions by k: parts = (drafts or None for all, weights, beta); in the
    table's order. Each part's drafts mostly share one k (KStarTable.k_for): that bulk stays a dense
    group, the few drafts with another k become sparse ones."""
    V = table.order.size
    dense: dict[int, np.ndarray] = {}
    keys: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for drafts, w, beta in parts:
        if drafts is not None and not drafts.size:
            continue
        k = table.k_for(beta, drafts)
        pos = table.rank if drafts is None else table.rank[drafts]
        bulk = int(np.bincount(k).argmax()) if k.size else 0
        at = k == bulk
        acc = dense.setdefault(bulk, np.zeros(V))
        acc[pos[at]] += w[at]
        keys.append(k[~at] * V + pos[~at])
        weights.append(w[~at])
    groups: list[tuple[int, np.ndarray | None, np.ndarray]] = [(k, None, w) for k, w in dense.items()]
    if keys:
        key, inverse = np.unique(np.concatenate(keys), return_inverse=True)
        total = np.bincount(inverse, np.concatenate(weights))
        ks, pos = key // V, key % V
        for k in np.unique(ks):
            sel = ks == k
            groups.append((int(k), pos[sel], total[sel]))
    groups.sort(key=lambda g: g[0])
    return DraftLaw(table.order, skip[table.order], tuple(groups), prob_bits, tail_tv)


def binomial_pmf(K: int, q: np.ndarray) -> np.ndarray:
    """P(j | q) for j = 0..K, per row of q [V]: [V, K + 1], float64, in log space (0 log 0 = 0, so exact
    at q = 0 and q = 1)."""
    qt = torch.as_tensor(np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0))[:, None]
    j = torch.arange(K + 1, dtype=torch.float64)
    log_comb = torch.lgamma(torch.tensor(K + 1.0, dtype=torch.float64)) - torch.lgamma(j + 1) - torch.lgamma(K - j + 1)
    return torch.exp(log_comb + torch.xlogy(j, qt) + torch.xlogy(K - j, 1.0 - qt)).numpy()


def u_grid(K: int) -> np.ndarray:
    """The values temperature perturbation's u takes, j / K, bit for bit as it computes them (a mean
    of K booleans in float64)."""
    return np.arange(K + 1, dtype=np.float64) / K
