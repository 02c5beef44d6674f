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
   the models. This pass writes the trace; it costs no forward at all. The record goes to it packed
   (agents.record: numpy records, ~60 bytes a token), and with history=False (the runner's) it keeps
   no rows: the events are the trace, so a replay's memory grows with devices, not with tokens.
   A device whose sequence stopped (agents.stop) records fewer tokens than max_new_tokens and the
   reason at its last one (Drafted.stop): the replay consumes exactly the recorded tokens and takes
   the stop from the record, without a tokenizer.

The trace is the one the single-pass emulation (`run_local`, what the wall clock does) gives: same
content, same timing rule (tests/testbed/test_runtime.py compares them). The three runs are the same
loop (`drive`) over the same state machines, composed of other pieces (docs/design.md section 2):

    run_local        DeviceGroupCore(...)               ModelContent over Links
                     VerifierCore(...)                  LLMVerdicts, BatchingRule
    run_content      DeviceGroupCore.content_pass(...)  RecordingContent over NoLinks
                     VerifierCore.content_pass(...)     RecordingVerdicts, AllAtOnce
    replay_content   DeviceGroupCore.replay(...)        ReplayContent over Links
                     VerifierCore.replay(...)           ReplayVerdicts, BatchingRule
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from agents.device import DeviceGroupCore, DeviceSpec, RunParams
from agents.events import VerifierBatch
from agents.record import Content
from agents.timing import merge
from agents.verifier import BatchRecord, ServerProfile, VerifierCore
from policies.base import Policy


@dataclass
class EngineResult:
    rows: list[dict]
    batches: list[BatchRecord]
    group_timings: dict  # agents.timing snapshots
    verifier_timings: dict
    content: Content | None = None  # run_content: the record for a replay


def drive(
    group: DeviceGroupCore,
    verifier: VerifierCore,
    on_step: Callable[[DeviceGroupCore, VerifierCore], None] | None = None,
    on_events: Callable[[list], None] | None = None,
    history: bool = True,
) -> EngineResult:
    """Run `group` against `verifier` to the end in the virtual clock; `on_step(group, verifier)` sees
    progress, `on_events` gets the events of each step (agents.events: the devices', then the
    verifier's batches; a content pass keeps no batch, its batches are not timed). history=False: no
    batch records kept either (the events carry them)."""
    with _frozen_heap():
        return _drive(group, verifier, on_step, on_events, history)


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Everything alive when a run starts (its state machines, a replay's content record, the imported
    modules: some 10^5 objects) lives through it. Frozen (gc.freeze), the cyclic collector's full
    collections scan only what the run made since: they were ~10% of a timing replay's time."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _drive(group, verifier, on_step, on_events, history) -> EngineResult:
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
        events.extend(VerifierBatch.of(b) for b in verifier.batches[batches_seen:])
        if history:
            batches_seen = len(verifier.batches)
        else:  # emitted: the events carry them (every request's queue wait: one float a token)
            verifier.batches.clear()
        if on_events is not None and events:
            on_events(events)
        if on_step is not None:
            on_step(group, verifier)
        if not group.has_work() and not verifier.queue and not group.done:
            raise RuntimeError("engine stalled: no device can move and nothing is queued")
    return EngineResult(group.rows(), verifier.batches, group.timings.snapshot(), verifier.timings.snapshot())


def run_local(
    specs: list[DeviceSpec],
    run: RunParams,
    server: ServerProfile,
    slm,
    llm,
    policies: dict[str, Policy],
    on_step: Callable | None = None,
    on_events: Callable | None = None,
    history: bool = True,
) -> EngineResult:
    """The one-pass emulation: every device to the end in the virtual clock, content from the models
    and time from the links and the batching rule at once (as the wall clock composes them). on_step,
    on_events, history: as in drive (history=False: EngineResult.rows and .batches are empty, the
    events are the trace, so memory does not grow with devices x tokens)."""
    group = DeviceGroupCore(specs, run, slm, policies, history)
    verifier = VerifierCore(llm, server, run.seed, run.vocab_size)
    return drive(group, verifier, on_step, on_events, history)


def run_content(
    specs: list[DeviceSpec],
    run: RunParams,
    server: ServerProfile,
    slm,
    llm,
    policies: dict[str, Policy],
    on_step: Callable | None = None,
    on_events: Callable | None = None,
    history: bool = True,
) -> EngineResult:
    """Pass 1 of run_virtual (module docstring): content at full batch, untimed; EngineResult.content
    is its record. on_step, on_events, history: as in drive."""
    group = DeviceGroupCore.content_pass(specs, run, slm, policies, history)
    verifier = VerifierCore.content_pass(llm, server, run.seed, run.vocab_size)
    result = drive(group, verifier, on_step, on_events, history)
    result.content = Content(group.recorded(), verifier.log)
    return result


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
    history: bool = True,
) -> EngineResult:
    """The virtual clock in two passes (module docstring): content at full batch, then the
    replay in emulated time. The timings are the content pass's, plus "replay" (its wall time).
    on_content/on_content_events see the content pass (untimed), on_step/on_events the replay.
    history as in run_local (both passes)."""
    content = run_content(specs, run, server, slm, llm, policies, on_content, on_content_events, history)
    record, content.content = content.content.packed(), None  # the objects go: the replay holds ~60 B a token
    result = replay_content(specs, run, server, policies, record, on_step, content, on_events, history)
    result.content = record  # what a content library keeps (testbed.content)
    return result


def replay_content(
    specs: list[DeviceSpec],
    run: RunParams,
    server: ServerProfile,
    policies: dict[str, Policy],
    content: Content,
    on_step=None,
    timed: EngineResult | None = None,
    on_events: Callable[[list], None] | None = None,
    history: bool = True,
) -> EngineResult:
    """Pass 2 of run_virtual on a content record (from run_content or from the actors; packed or not).
    `timed`: the content pass's result, whose timings are carried over (the replay's own time is
    "replay"). history as in drive."""
    t0 = time.perf_counter()
    group = DeviceGroupCore.replay(specs, run, policies, content.devices, history)
    verifier = VerifierCore.replay(content.verdicts, server, run.seed, run.vocab_size)
    result = drive(group, verifier, on_step, on_events, history)
    items = sum(len(c) for c in content.devices.values())  # tokens replayed (result.rows may be empty)
    replay = {"replay": {"seconds": time.perf_counter() - t0, "calls": 1, "items": items}}
    if timed is not None:
        result.group_timings = merge(timed.group_timings, replay)
        result.verifier_timings = dict(timed.verifier_timings)
    else:
        result.group_timings = replay
    return result
