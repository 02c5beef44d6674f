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
   (Content.packed: numpy records, ~60 bytes a token), and with history=False (the runner's) it keeps
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

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from agents import protocol
from agents.content import Drafted
from agents.device import DeviceGroupCore, DeviceSpec, RunParams
from agents.events import VerifierBatch
from agents.timing import merge
from agents.verifier import BatchRecord, ServerProfile, VerifierCore
from policies.base import Decision, Policy


@dataclass
class Content:
    """A content pass's record: what every device emitted and what every verdict said."""

    devices: dict[int, list[Drafted]] = field(default_factory=dict)
    verdicts: dict[tuple[int, int], protocol.Verdict] = field(default_factory=dict)

    def update(self, other: Content) -> None:
        self.devices.update(other.devices)
        self.verdicts.update(other.verdicts)

    def packed(self) -> Content:
        """The same record in numpy arrays (PackedDrafted, PackedVerdicts)."""
        return Content(pack_devices(self.devices), PackedVerdicts.of(self.verdicts))


# A content record as Python objects costs ~650 bytes a token (Drafted, Decision, Verdict, their
# floats and the dict keys): 400 MiB for 10,000 devices x 64 tokens, all in the driver that replays
# it. Packed in numpy records it is ~60 bytes a token, and pickles (Ray) as a few buffers. Every
# field is stored at its exact width (floats as float64, as Python holds them), so an item rebuilt
# from a record equals the original.
_DRAFTED = np.dtype(
    [
        ("transmit", "?"),
        ("llm_samples", "?"),
        ("prob_bits", "i2"),
        ("k", "i4"),
        ("draft", "i4"),
        ("payload", "i8"),
        ("uncertainty", "f8"),
        ("draft_prob", "f8"),
        ("fidelity_tv", "f8"),
        ("fidelity_tv_branch", "f8"),
        ("stop", "i1"),
    ]
)


class PackedDrafted(Sequence):
    """One device's content record (its Drafted, in token order; payloads as their sizes) as one
    numpy record array; an item is rebuilt as a Drafted on access."""

    __slots__ = ("a",)

    def __init__(self, items: Sequence[Drafted]):
        self.a = np.array(
            [
                (
                    c.decision.transmit,
                    c.decision.llm_samples,
                    c.decision.prob_bits,
                    c.decision.k,
                    c.draft,
                    c.payload if isinstance(c.payload, int) else len(c.payload),
                    c.decision.uncertainty,
                    c.draft_prob,
                    c.fidelity_tv,
                    c.fidelity_tv_branch,
                    c.stop,
                )
                for c in items
            ],
            dtype=_DRAFTED,
        )

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        transmit, llm_samples, prob_bits, k, draft, payload, u, draft_prob, fidelity, branch, stop = self.a[i].tolist()
        return Drafted(
            Decision(transmit, u, k, prob_bits, llm_samples), draft, draft_prob, payload, fidelity, branch, stop
        )


def pack_devices(devices: Mapping[int, Sequence[Drafted]]) -> dict[int, PackedDrafted]:
    return {d: c if isinstance(c, PackedDrafted) else PackedDrafted(c) for d, c in devices.items()}


_VERDICT = np.dtype(
    [
        ("device", "i8"),
        ("seq", "i8"),
        ("session", "i8"),
        ("token_index", "i8"),
        ("token", "i8"),
        ("accepted", "?"),
        ("resampled", "?"),
        ("beta", "f8"),
        ("shadow_start", "i8"),
        ("shadow_end", "i8"),
    ]
)


class PackedVerdicts(Mapping):
    """A verifier's content log, (device, seq) -> protocol.Verdict, as one record array sorted by
    (device, seq) and the shadow betas end to end; a frame is rebuilt on access."""

    def __init__(self, a: np.ndarray, shadow: np.ndarray):
        self.a, self.shadow = a, shadow
        devices = a["device"]
        starts = np.flatnonzero(np.r_[True, devices[1:] != devices[:-1]]) if len(a) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(a)].astype(np.int64)
        self.rows = {int(devices[s]): (int(s), int(e)) for s, e in zip(starts, ends)}  # device -> its slice

    @classmethod
    def of(cls, log: Mapping) -> PackedVerdicts:
        if isinstance(log, PackedVerdicts):
            return log
        keys = sorted(log)
        shadow, recs = [], []
        for key in keys:
            v = log[key]
            recs.append(
                (
                    v.device,
                    v.seq,
                    v.session,
                    v.token_index,
                    v.token,
                    v.accepted,
                    v.resampled,
                    v.beta,
                    len(shadow),
                    len(shadow) + len(v.shadow_betas),
                )
            )
            shadow.extend(v.shadow_betas)
        return cls(np.array(recs, dtype=_VERDICT), np.array(shadow, dtype=np.float64))

    def __reduce__(self):  # pickle (Ray) the two arrays only
        return PackedVerdicts, (self.a, self.shadow)

    def _index(self, key) -> int:
        device, seq = key
        start, end = self.rows.get(device, (0, 0))
        i = start + int(np.searchsorted(self.a["seq"][start:end], seq))
        if i >= end or self.a["seq"][i] != seq:
            raise KeyError(key)
        return i

    def __getitem__(self, key) -> protocol.Verdict:
        device, seq, session, token_index, token, accepted, resampled, beta, lo, hi = self.a[self._index(key)].tolist()
        return protocol.Verdict(
            device=device,
            session=session,
            seq=seq,
            token_index=token_index,
            token=token,
            accepted=accepted,
            resampled=resampled,
            beta=beta,
            shadow_betas=tuple(self.shadow[lo:hi].tolist()),
        )

    def __contains__(self, key) -> bool:
        try:
            self._index(key)
        except KeyError:
            return False
        return True

    def __iter__(self):
        return iter(zip(self.a["device"].tolist(), self.a["seq"].tolist()))

    def __len__(self) -> int:
        return len(self.a)


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
    return replay_content(specs, run, server, policies, record, on_step, content, on_events, history)


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
