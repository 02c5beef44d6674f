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

import math
from dataclasses import dataclass

import numpy as np

from policies.truncation import KStarTable
from policies.uncertainty import perturbation_keep_prob


@dataclass(frozen=True)
class DraftLaw:
    """For every candidate draft d [V]: P(skip | d) and P(transmit with ks[g] entries | d) [V, G]."""

    skip: np.ndarray
    ks: tuple[int, ...]
    transmit: np.ndarray
    prob_bits: int


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

    def _u_law(self, logits) -> np.ndarray | None:
        """P(u = u_j | d) [V, J], or None when the decision does not depend on which u comes."""
        varies = np.ptp(self.p_skip) > 0 or (self.beta is not None and np.ptp(self.beta) > 0)
        if not (self.K and varies):
            return None
        return binomial_pmf(self.K, 1.0 - perturbation_keep_prob(logits, self.theta_max))

    def draft_law(self, logits, x: np.ndarray) -> DraftLaw:
        """Per-draft skip and transmission probabilities for this token (z: the SLM logits the policy
        saw, x = softmax(z / T) the draft was sampled from)."""
        x = np.asarray(x, dtype=np.float64)
        V = x.shape[0]
        u_law = self._u_law(logits)
        p_skip = self.p_skip if u_law is not None else self.p_skip[:1]
        skip = u_law @ p_skip if u_law is not None else np.full(V, float(p_skip[0]))
        if self.k is not None:
            return DraftLaw(skip, (int(min(self.k, V)),), (1.0 - skip)[:, None], self.prob_bits)
        table = KStarTable(x, self.theta, self.eta)
        weights: dict[int, np.ndarray] = {}
        for j in range(p_skip.shape[0]):
            send = 1.0 - p_skip[j]
            if send <= 0:
                continue
            w = u_law[:, j] * send if u_law is not None else np.full(V, send)
            k = table.k_for(float(self.beta[j]))
            for kk in np.unique(k):
                acc = weights.setdefault(int(kk), np.zeros(V))
                acc += np.where(k == kk, w, 0.0)
        ks = tuple(sorted(weights))
        transmit = np.stack([weights[k] for k in ks], axis=1) if ks else np.zeros((V, 0))
        return DraftLaw(skip, ks, transmit, self.prob_bits)


def binomial_pmf(K: int, q: np.ndarray) -> np.ndarray:
    """P(j | q) for j = 0..K, per row of q [V]: [V, K + 1], float64 (exact at q = 0 and q = 1)."""
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
    j = np.arange(K + 1)
    comb = np.array([math.comb(K, i) for i in j], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return comb * np.power(q[:, None], j) * np.power(1.0 - q[:, None], K - j)


def u_grid(K: int) -> np.ndarray:
    """The values temperature perturbation's u takes, j / K, bit for bit as it computes them (a mean
    of K booleans in float64)."""
    return np.arange(K + 1, dtype=np.float64) / K
