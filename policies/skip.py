"""Skip rules (docs/design.md section 1, step 4): given u [B] and the batch, which tokens skip
the upload (the draft is accepted on the device). A rule is any callable
(u, batch) -> bool [B]. A rule that can say P(skip | u) for the values u may take (`p_skip`) gives
its policy a decision law (policies.law), hence exact fidelity; the built-in rules all can."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Key, TokenBatch
from policies.rng import keyed_rng

SKIP_RULES = ("never", "always", "random", "uncertainty")


@dataclass(frozen=True)
class ConstantSkip:
    """Skip every token (skip=True: slm-only) or none (skip=False: hlm), whatever u."""

    skip: bool

    def __call__(self, u: np.ndarray, batch: TokenBatch) -> np.ndarray:
        return np.full(len(batch), self.skip, dtype=bool)

    def p_skip(self, u: np.ndarray, key: Key) -> np.ndarray:
        return np.full(len(u), float(self.skip))


def NeverSkip() -> ConstantSkip:
    return ConstantSkip(False)


def AlwaysSkip() -> ConstantSkip:
    return ConstantSkip(True)


@dataclass(frozen=True)
class RandomSkip:
    """Skip with probability `rate`, independently of u: one uniform per token from
    keyed_rng(seed, device, token_index, "skip"); skip when it is < rate."""

    rate: float

    def __call__(self, u: np.ndarray, batch: TokenBatch) -> np.ndarray:
        return np.array([keyed_rng(s, d, t, "skip").random() < self.rate for s, d, t in batch.keys], dtype=bool)

    def p_skip(self, u: np.ndarray, key: Key) -> np.ndarray:
        return np.full(len(u), self.rate)  # a uniform < rate, whatever u


@dataclass(frozen=True)
class ThresholdSkip:
    """Skip when u <= u_th (a NaN u never skips)."""

    u_th: float

    def __call__(self, u: np.ndarray, batch: TokenBatch) -> np.ndarray:
        return np.asarray(u) <= self.u_th

    def p_skip(self, u: np.ndarray, key: Key) -> np.ndarray:
        return (np.asarray(u) <= self.u_th).astype(np.float64)
