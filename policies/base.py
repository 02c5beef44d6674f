"""The Policy interface: per token, skip or transmit, and when transmitting how much.

A policy composes four swappable parts (DESIGN.md section 1, steps 2-5):
uncertainty estimator -> threshold rule (skip?) -> truncator (k) -> quantiser (bits).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """What a policy may look at for one token of one device.

    `probs` is x = softmax(logits / temperature) and `draft` the token drawn from it; the
    device computes both once so estimators and truncators never recompute them.
    """

    seed: int
    device: int
    token_index: int
    temperature: float
    draft: int
    probs: np.ndarray  # float32/64 [V]


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict of a policy for one token.

    transmit=False: the draft is accepted on the device (no uplink, no LLM cost now).
    transmit=True: upload the top-`k` entries of x quantised at `prob_bits` bits per
    probability (32 = float32, i.e. no quantisation); k == vocab size means the full vector.
    `llm_samples`: the LLM samples the token itself from y (llm-only); k is then 0.
    """

    transmit: bool
    uncertainty: float
    k: int = 0
    prob_bits: int = 8
    llm_samples: bool = False


class Policy(abc.ABC):
    """decide(logits, ctx) -> Decision. `drafts` is False when the SLM is not used at all
    (llm-only); `uses_llm` is False when nothing is ever sent (slm-only)."""

    name: str = "policy"
    drafts: bool = True
    uses_llm: bool = True

    @abc.abstractmethod
    def decide(self, logits: np.ndarray, ctx: DecisionContext) -> Decision: ...

    def decide_batch(self, logits: np.ndarray, ctxs: list[DecisionContext]) -> list[Decision]:
        """Batched form over devices; policies override it when they can vectorise."""
        return [self.decide(logits[i], c) for i, c in enumerate(ctxs)]

    def params(self) -> dict:
        """The parameters that define this policy (shown by `testbed policies --json`,
        written into resolved scenarios)."""
        return {}
