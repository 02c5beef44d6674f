"""Where a device's tokens come from: the models, or a content pass's record (docs/design.md section 2).

A device group composes a content source with a link model (agents.links) instead of switching on a
mode:

- `ModelContent`: the SLM drafts for every device ready to, its policy decides, the codec encodes
  (Device.draft, Device.apply); a stop detector per device ends a sequence (agents.stop); every verdict's
  betas feed the policy (Policy.observe). The one-pass emulation (and the wall clock) runs it over timed
  links;
- `RecordingContent`: the same, keeping every token's `Drafted` for a replay: the virtual clock's content
  pass, over no links (agents.links.NoLinks);
- `ReplayContent`: each token's `Drafted` from such a record, the stop from the record, and no model, no
  tokenizer and no feedback to the policy (the content pass fed it; a second time would count every
  verdict twice): the virtual clock's timing replay, over timed links.

The verifier is composed the same way (agents.verifier: LLMVerdicts, RecordingVerdicts, ReplayVerdicts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from agents.stop import CODE_REASONS, REASON_CODES, StopDetector
from agents.timing import Timings
from agents.wire import Upload
from policies.base import Decision

if TYPE_CHECKING:
    from agents.device import Device


@dataclass(frozen=True, slots=True)
class Drafted:
    """What the SLM and the policy produced for one token: all a replay needs of it (the virtual
    clock computes content first and timing after; see agents.engine)."""

    decision: Decision
    draft: int  # -1 without a draft (llm-only)
    draft_prob: float  # x_d as the wire carries it (NaN without a draft)
    payload: bytes | int  # the encoded top-k, or in a record only its size
    fidelity_tv: float = math.nan  # in a record: set when the token's verdict came (Device.on_verdict)
    fidelity_tv_branch: float = math.nan  # ... the approximation, for a policy without a decision law
    stop: int = 0  # in a record: agents.stop.REASON_CODES of the stop at this token (set at its commit)

    def recorded(self) -> Drafted:
        """As a content record keeps it: the payload's size, and no decision law (only the fidelity
        at the verdict reads it, from what the device holds; a record of many tokens should not)."""
        if isinstance(self.payload, int) and self.decision.law is None:
            return self
        size = self.payload if isinstance(self.payload, int) else len(self.payload)
        return replace(self, payload=size, decision=replace(self.decision, law=None))


def batch_invariant(lm) -> bool:
    """Whether `lm` computes a sequence to the same bits alone or in any batch (agents.lm.BatchedLM says
    so of its packed, tiled forward). A runner that does not say so is taken as not."""
    return bool(getattr(lm, "batch_invariant", False))


class ContentSource(Protocol):
    """What a device's state machine asks of where its content comes from (the hooks, in the order a
    token meets them)."""

    @property
    def slm(self) -> object:
        """The SLM runner (agents.lm.BatchedLM), None without one."""

    def start(self, d: Device) -> None:
        """A device joins (before its first token)."""

    def produce(self, ready: list[Device], timings: Timings) -> list[Upload]:
        """Commit the current token of every device in `ready` (Device.commit); the uploads to send."""
        ...

    def committed(self, d: Device, c: Drafted) -> None:
        """d committed (skipped) or sent the token `c`."""

    def stop(self, d: Device, index: int, token: int, recorded: int) -> str:
        """Why the committed token `token` at `index` ends d's sequence ("eos", "stop"; "" if it does not).
        `recorded`: the stop a record holds for it (Drafted.stop)."""
        ...

    def observe(self, d: Device, index: int, uncertainty: float, beta: float, skipped: bool) -> None:
        """The beta of d's token `index` came back (with the verdict that resolved it)."""

    def measured(self, d: Device, index: int, fidelity_tv: float, fidelity_tv_branch: float) -> None:
        """d measured the fidelity of its token `index` (at its verdict)."""


class ModelContent:
    """Content from the models. batch: one SLM forward for every device ready to draft (RunParams.batch_slm),
    taken only where the forward is batch invariant (else a draft would depend on which devices shared
    its forward, and the virtual clock's content pass, which forwards every device at once, would differ
    from a one-pass run); otherwise one forward per device."""

    def __init__(self, slm=None, batch: bool = True):
        self.slm = slm  # agents.lm.BatchedLM (None when no device drafts)
        self.batch = batch and batch_invariant(slm)
        self.detectors: dict[int, StopDetector | None] = {}

    def start(self, d: Device) -> None:
        self.detectors[d.spec.device] = d.run.stop.detector()

    def produce(self, ready: list[Device], timings: Timings) -> list[Upload]:
        """Draft, decide and encode: one SLM step for the drafting devices, each policy's decide_batch
        over its devices, then the devices that do not draft (llm-only)."""
        uploads: list[Upload] = []
        drafting = [d for d in ready if d.policy.drafts]
        if drafting:
            phase = "slm.prefill" if any(len(d.feed) > 1 for d in drafting) else "slm.decode"
            items = [(d.spec.device, d.feed) for d in drafting]
            with timings(phase, sum(len(d.feed) for d in drafting)):
                logits = self.slm.extend(items) if self.batch else [self.slm.extend([it])[0] for it in items]
            by_policy: dict[int, list] = {}  # (device, DecisionContext, logits) by policy instance
            with timings("draft", len(drafting)):
                for d, z in zip(drafting, logits):
                    by_policy.setdefault(id(d.policy), []).append((d, d.draft(z), z))
            for members in by_policy.values():
                policy = members[0][0].policy
                with timings("policy", len(members)):
                    decisions = policy.decide_batch(np.stack([m[2] for m in members]), [m[1] for m in members])
                with timings("codec", len(members)):
                    for (d, ctx, _), decision in zip(members, decisions):
                        if (u := d.apply(decision, ctx)) is not None:
                            uploads.append(u)
        for d in ready:
            if not d.policy.drafts:
                uploads.append(d.apply(d.policy.decide(None, None), None))
        return uploads

    def committed(self, d: Device, c: Drafted) -> None:
        pass

    def stop(self, d: Device, index: int, token: int, recorded: int) -> str:
        detector = self.detectors[d.spec.device]
        return detector.push(token) if detector is not None else ""

    def observe(self, d: Device, index: int, uncertainty: float, beta: float, skipped: bool) -> None:
        d.policy.observe(d.spec.device, index, uncertainty, beta, skipped)

    def measured(self, d: Device, index: int, fidelity_tv: float, fidelity_tv_branch: float) -> None:
        pass


class RecordingContent(ModelContent):
    """The content pass: the models' content, every token's Drafted kept in `record` (per device, in
    token order, as Drafted.recorded keeps it), its stop and fidelity added when known."""

    def __init__(self, slm=None, batch: bool = True):
        super().__init__(slm, batch)
        self.record: dict[int, list[Drafted]] = {}

    def start(self, d: Device) -> None:
        super().start(d)
        self.record[d.spec.device] = []

    def committed(self, d: Device, c: Drafted) -> None:
        self.record[d.spec.device].append(c.recorded())

    def stop(self, d: Device, index: int, token: int, recorded: int) -> str:
        reason = super().stop(d, index, token, recorded)
        if reason:
            self._amend(d, index, stop=REASON_CODES[reason])
        return reason

    def measured(self, d: Device, index: int, fidelity_tv: float, fidelity_tv_branch: float) -> None:
        self._amend(d, index, fidelity_tv=fidelity_tv, fidelity_tv_branch=fidelity_tv_branch)

    def _amend(self, d: Device, index: int, **values) -> None:
        tokens = self.record[d.spec.device]
        tokens[index] = replace(tokens[index], **values)


class ReplayContent:
    """The timing replay: each token's Drafted from a content pass's record (per device, in token
    order; agents.record.PackedDrafted or a list), its stop from the record. No model runs and no
    verdict reaches the policy again."""

    slm = None

    def __init__(self, record: Mapping[int, Sequence[Drafted]]):
        self.record = record

    def start(self, d: Device) -> None:
        pass

    def produce(self, ready: list[Device], timings: Timings) -> list[Upload]:
        uploads = []
        for d in ready:
            if (u := d.commit(self.record[d.spec.device][d.index])) is not None:
                uploads.append(u)
        return uploads

    def committed(self, d: Device, c: Drafted) -> None:
        pass

    def stop(self, d: Device, index: int, token: int, recorded: int) -> str:
        return CODE_REASONS[recorded]

    def observe(self, d: Device, index: int, uncertainty: float, beta: float, skipped: bool) -> None:
        pass  # the content pass fed the policy these betas already

    def measured(self, d: Device, index: int, fidelity_tv: float, fidelity_tv_branch: float) -> None:
        pass
