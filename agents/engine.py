"""The single-process engine: device groups and the verifier in one loop, no Ray, no sockets.

It drives the very same `DeviceGroupCore` and `VerifierCore` as the distributed runtime, so
its trace (tokens, decisions, emulated timestamps) is the reference the Ray engine must
reproduce. With one device it is the reference hybrid decoder.

The virtual clock runs in two passes (`run_virtual`), because in it what a device emits never
depends on when: a token depends only on the device's own verdicts and keyed randomness, and a
verdict only on the device's own context (the forwards are batch invariant, agents.lm). So:

1. content: every device drafts as soon as its previous verdict's content is known, and the
   verifier answers every queued request at once. SLM and LLM forwards run at the largest batches
   the fleet allows (all devices in step), which is the compute limit; emulated times here mean
   nothing. Each device's tokens (agents.device.Drafted) and each verdict's frame
   (agents.protocol.Verdict: what it says, without when) are recorded.
2. replay: the same state machines run again in emulated time (links, retransmissions, the
   verifier's batching rule and its lower bounds), taking the content from the record instead of
   the models. This pass writes the trace; it costs no forward at all.

The trace is the one the single-pass emulation (`run_local(mode="emulate")`, what the wall clock
does) gives: same content, same timing rule (tests/testbed/test_runtime.py compares them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from agents import protocol
from agents.device import DeviceGroupCore, DeviceSpec, Drafted, RunParams
from agents.events import VerifierBatch
from agents.timing import merge
from agents.verifier import BatchRecord, ServerProfile, VerifierCore
from policies.base import Policy


@dataclass
class Content:
    """A content pass's record: what every device emitted and what every verdict said."""

    devices: dict[int, list[Drafted]] = field(default_factory=dict)
    verdicts: dict[tuple[int, int], protocol.Verdict] = field(default_factory=dict)

    def update(self, other: "Content") -> None:
        self.devices.update(other.devices)
        self.verdicts.update(other.verdicts)


@dataclass
class EngineResult:
    rows: list[dict]
    batches: list[BatchRecord]
    group_timings: dict  # agents.timing snapshots
    verifier_timings: dict
    content: Content | None = None  # mode="content": the record for a replay


def run_local(
    specs: list[DeviceSpec],
    run: RunParams,
    server: ServerProfile,
    slm,
    llm,
    policies: dict[str, Policy],
    on_step: Callable[[DeviceGroupCore, VerifierCore], None] | None = None,
    mode: str = "emulate",
    replay: Content | None = None,
    on_events: Callable[[list], None] | None = None,
) -> EngineResult:
    """Emulate every device to the end in the virtual clock; `on_step` sees progress, `on_events`
    gets the events of each step (agents.events: the devices', then the verifier's batches; a content
    pass has no batch events, its batches are not timed). mode: emulate (one pass), content or replay
    (the passes of run_virtual)."""
    group = DeviceGroupCore(specs, run, slm, policies, record=mode == "content",
                            replay=replay.devices if replay is not None else None)
    verifier = VerifierCore(llm, server, run.seed, run.vocab_size, mode=mode,
                            replay=replay.verdicts if replay is not None else None)
    verifier.open(group.opens())
    batches_seen = 0
    while not group.done:
        for upload in group.step():
            if (verdict := verifier.submit(upload)) is not None:
                group.on_verdict(verdict)
        # Release every batch that no device can still precede, then let devices move on.
        while (ready := verifier.next_batch()) is not None:
            for verdict in verifier.verify(*ready):
                group.on_verdict(verdict)
        events = group.drain_events()  # drained every step: devices hold none for long
        if mode != "content":
            events.extend(VerifierBatch.of(b) for b in verifier.batches[batches_seen:])
            batches_seen = len(verifier.batches)
        if on_events is not None and events:
            on_events(events)
        if on_step is not None:
            on_step(group, verifier)
        if not group.has_work() and not verifier.queue and not group.done:
            raise RuntimeError("engine stalled: no device can move and nothing is queued")
    content = Content(group.recorded(), verifier.log) if mode == "content" else None
    return EngineResult(group.rows(), verifier.batches, group.timings.snapshot(), verifier.timings.snapshot(),
                        content)


def run_virtual(
    specs: list[DeviceSpec],
    run: RunParams,
    server: ServerProfile,
    slm,
    llm,
    policies: dict[str, Policy],
    on_content: Callable[[DeviceGroupCore, VerifierCore], None] | None = None,
    on_step: Callable[[DeviceGroupCore, VerifierCore], None] | None = None,
    on_content_events: Callable[[list], None] | None = None,
    on_events: Callable[[list], None] | None = None,
) -> EngineResult:
    """The virtual clock in two passes (module docstring): content at full batch, then the
    replay in emulated time. The timings are the content pass's, plus "replay" (its wall time).
    on_content/on_content_events see the content pass (untimed), on_step/on_events the replay."""
    content = run_local(specs, run, server, slm, llm, policies, on_content, mode="content",
                        on_events=on_content_events)
    return replay_content(specs, run, server, policies, content.content, on_step, content, on_events)


def replay_content(specs: list[DeviceSpec], run: RunParams, server: ServerProfile, policies: dict[str, Policy],
                   content: Content, on_step=None, timed: EngineResult | None = None,
                   on_events: Callable[[list], None] | None = None) -> EngineResult:
    """Pass 2 of run_virtual on a content record (from run_local or from the actors). `timed`: the
    content pass's result, whose timings are carried over (the replay's own time is "replay")."""
    t0 = time.perf_counter()
    result = run_local(specs, run, server, None, None, policies, on_step, mode="replay", replay=content,
                       on_events=on_events)
    replay = {"replay": {"seconds": time.perf_counter() - t0, "calls": 1, "items": len(result.rows)}}
    if timed is not None:
        result.group_timings = merge(timed.group_timings, replay)
        result.verifier_timings = dict(timed.verifier_timings)
    else:
        result.group_timings = replay
    return result
