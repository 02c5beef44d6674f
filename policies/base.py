"""The Policy interface: per token, skip or transmit, and when transmitting how much.

A policy composes four swappable parts (docs/design.md section 1, steps 2-5):
uncertainty estimator -> threshold rule (skip?) -> truncator (k) -> quantiser (bits).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

Key = tuple[int, int, int]  # (seed, device, token_index): what every random draw is keyed by
Array = np.ndarray | torch.Tensor  # what the parts take: numpy or torch, [B, V] rows or one [V] row

# The bit widths a policy may choose for the uploaded probabilities (docs/design.md section 1, step 5;
# b_prob = 8 by default). A policy only chooses; the payload codec (agents.codec) quantises and
# speaks exactly these widths.
PROB_BITS = (8, 16, 32)  # 32 = float32, no quantisation


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
    `law`: what the policy would have decided for every other draft (policies.law.DecisionLaw), from
    which the device computes the exact fidelity; None when the policy cannot state it (a plug-in),
    and then the device records only an approximation (agents.fidelity). Not content: a replay and
    equality ignore it.
    """

    transmit: bool
    uncertainty: float
    k: int = 0
    prob_bits: int = 8
    llm_samples: bool = False
    law: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TokenBatch:
    """What the parts of a policy (estimator, skip rule, truncator) see: B devices, one
    token each. `probs` is stacked from the rows on first use, so parts that never look at
    x (e.g. full upload, random skip) cost nothing."""

    logits: torch.Tensor | None  # [B, V] float32 raw SLM logits z (None when not given)
    drafts: torch.Tensor  # [B] int64
    keys: list[Key]
    rows: Sequence[np.ndarray]  # x = softmax(z / T) per device, [V] each

    @staticmethod
    def from_contexts(logits: Array | None, ctxs: Sequence[DecisionContext]) -> TokenBatch:
        z = None
        if logits is not None:
            z = torch.as_tensor(logits)
            z = (z[None, :] if z.dim() == 1 else z).to(torch.float32)
            if z.shape[0] != len(ctxs):
                raise ValueError(f"{z.shape[0]} logit rows for {len(ctxs)} contexts")
        drafts = torch.tensor([c.draft for c in ctxs], dtype=torch.long)
        return TokenBatch(z, drafts, [(c.seed, c.device, c.token_index) for c in ctxs], [c.probs for c in ctxs])

    @cached_property
    def probs(self) -> torch.Tensor:
        """[B, V] x, float32 or float64 as given."""
        return torch.from_numpy(np.stack([np.asarray(r) for r in self.rows]))

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def vocab_size(self) -> int:
        return int(self.logits.shape[1]) if self.logits is not None else int(np.asarray(self.rows[0]).shape[-1])

    def select(self, rows: npt.ArrayLike) -> TokenBatch:
        """The sub-batch of the given row indices (or boolean mask)."""
        which = np.asarray(rows)
        idx = np.flatnonzero(which) if which.dtype == bool else which.astype(np.int64)
        t = torch.from_numpy(idx)
        ids = idx.tolist()
        return TokenBatch(
            None if self.logits is None else self.logits[t],
            self.drafts[t],
            [self.keys[i] for i in ids],
            [self.rows[i] for i in ids],
        )


# The swappable parts of a policy (policies.uncertainty, policies.skip, policies.truncation), as
# HybridPolicy calls them. A part may also state its decision law (skip rules: p_skip; truncators: law).
Estimator = Callable[[TokenBatch], np.ndarray]  # the batch -> u [B]
SkipRule = Callable[[np.ndarray, TokenBatch], np.ndarray]  # (u, batch) -> skip [B], bool
Truncator = Callable[[TokenBatch, np.ndarray], np.ndarray]  # (the transmitted rows, their u) -> k [B]


class Policy(abc.ABC):
    """decide(logits, ctx) -> Decision. `drafts` is False when the SLM is not used at all
    (llm-only); `uses_llm` is False when nothing is ever sent (slm-only)."""

    name: str = "policy"
    drafts: bool = True
    uses_llm: bool = True

    @abc.abstractmethod
    def decide(self, logits: Array | None, ctx: DecisionContext) -> Decision: ...

    def decide_batch(self, logits: Array | None, ctxs: list[DecisionContext]) -> list[Decision]:
        """Batched form over devices; policies override it when they can vectorise."""
        return [self.decide(None if logits is None else logits[i], c) for i, c in enumerate(ctxs)]

    def params(self) -> dict[str, Any]:
        """The parameters that define this policy (shown by `testbed policies --json`,
        written into resolved scenarios)."""
        return {}

    def observe(self, device: int, token_index: int, uncertainty: float, beta: float, skipped: bool) -> None:
        """Feedback for one token of one device; the default ignores it (stateless policies).

        The device calls it when a verdict comes back: once for each skipped token that the
        upload piggybacked (skipped=True, `beta` its shadow rejection probability, in token
        order) and then once for the verified draft (skipped=False, `beta` = max(0, 1 - y_d /
        x_d) of the draft; NaN when there was no draft, e.g. llm-only). `uncertainty` is the u
        this policy's Decision reported for that token. Calls for one device arrive in that
        device's order only, so a policy that keys its state by `device` stays a function of
        the device's own history (the same in every engine and actor layout). A policy
        instance serves many devices: never let one device's feedback change another's
        decisions."""
        return None
