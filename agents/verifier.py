"""The LLM verifier: per-device sessions, dynamic batching in emulated time, verdicts.

`VerifierCore` is transport-free and clock-free: it is handed uploads stamped with their
emulated arrival time and forms batches by the rule below, so the same arrivals give the
same batches, the same LLM forwards and the same verdicts in every layout.

Batching rule (max_batch, max_wait): the server is free at t_free; the earliest queued
arrival a1 opens a batch that closes at a1 + max_wait, or earlier when max_batch requests
have arrived; the batch starts at S = max(t_free, close) and takes the requests that
arrived by S (up to max_batch), in (arrival, device, seq) order. In the virtual clock a batch is
released only when no earlier arrival can still come: every open session without a queued
request has a lower bound on its next arrival (`bound`) and all bounds must exceed S.

Composition, not modes (docs/design.md section 2, the two-pass virtual clock): a VerifierCore takes
its verdicts from a verdict source and its batches from a batching rule:
- verdicts (agents.verdicts): from the LLM (`LLMVerdicts`); from the LLM, each verdict's frame logged
  for a replay (`RecordingVerdicts`, the content pass); or from such a log, with no LLM and nothing
  decoded (`ReplayVerdicts`, the timing replay). The LLM forwards many sessions at once only where its
  forward is batch invariant (agents.verdicts says why);
- batches: by the rule above, in emulated time (`BatchingRule`), or every queued request at once,
  untimed (`AllAtOnce`, the content pass, whose times mean nothing).
The one-pass emulation (the wall clock) is the LLM with the rule; `content_pass` and `replay` build
the virtual clock's two.

Fidelity (docs/design.md section 7): every verdict computed from the LLM (not a replay) carries, as
measurement only, the LLM's logits at the positions it covers (VerdictStamp.llm_logits: each
piggybacked token's, then the verified draft's); the device, which holds x, computes the exact
TV distances from them (agents.device.Device._measure_fidelity says why there).

Recovery (docs/design.md section 9), by deterministic replay, never by checkpoints:
- a restarted device group re-executes its devices from their prompts: `reset` forgets their
  sessions, the group opens them again, and every upload is verified anew (same context, same
  keyed randomness, batch-invariant forwards: the same verdicts and LLM logits, bit for bit);
- a restarted verifier is rebuilt from the devices' committed state (`restore`): sessions are
  re-opened and each LLM cache re-fed in the same incremental calls as the first time.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from agents import protocol
from agents.device import SessionState
from agents.verdicts import LLMVerdicts, RecordingVerdicts, ReplayVerdicts, in_arrival_order
from agents.wire import Open, Upload, Verdict, VerdictStamp


@dataclass(frozen=True)
class ServerProfile:
    """Emulated verification cost: base + per_token * tokens + per_sequence * batch (ms)."""

    verify_ms_base: float = 20.0
    verify_ms_per_token: float = 0.5
    verify_ms_per_sequence: float = 2.0
    max_batch: int = 8
    max_wait_ms: float = 2.0

    def verify_seconds(self, batch_size: int, n_tokens: int) -> float:
        ms = self.verify_ms_base + self.verify_ms_per_token * n_tokens + self.verify_ms_per_sequence * batch_size
        return ms / 1000.0


@dataclass
class Session:
    device: int
    temperature: float
    max_new_tokens: int
    lookahead_s: float
    feed: list[int]  # tokens the LLM has not consumed yet (always the last committed one)
    bound: float  # lower bound on the emulated arrival of this device's next upload
    queued: bool = False
    closed: bool = False
    next_seq: int = 0  # the sequence number the next new upload must carry
    last_verdict: Verdict | None = None  # answered again when its upload is retransmitted


@dataclass
class BatchRecord:
    """What one verifier batch did, for stats and the summary."""

    t_start: float
    t_end: float
    size: int
    n_tokens: int
    queue_waits: list[float]


# Up to this many entries per k, _kth_arrival partitions the whole queue (O(n), mostly in C) rather than
# walking it (O(k log k) in Python): with k = 256, ~4x faster at 1000 queued, even at ~4000, the walk past that.
_PARTITION_PER_K = 16


def _kth_arrival(queue: list, k: int) -> float:
    """The k-th earliest arrival in a heap of (arrival, ...) entries (k <= len). A queue up to
    _PARTITION_PER_K * k long: numpy's partition of the arrivals; a longer one: a best-first walk of the
    heap's top k entries, O(k log k) however long the queue (sorting it all was O(n log n) per batch,
    quadratic in a fleet's size)."""
    if len(queue) <= _PARTITION_PER_K * k:
        arrivals = np.array([entry[0] for entry in queue])
        return float(np.partition(arrivals, k - 1)[k - 1])
    return _kth_arrival_walk(queue, k)


def _kth_arrival_walk(queue: list, k: int) -> float:
    frontier, t = [(queue[0][0], 0)], 0.0
    for _ in range(k):
        t, i = heapq.heappop(frontier)
        for child in (2 * i + 1, 2 * i + 2):
            if child < len(queue):
                heapq.heappush(frontier, (queue[child][0], child))
    return t


# --- how requests form batches ------------------------------------------------------------------


class BatchingRule:
    """The batching rule (module docstring), in emulated time; every batch is kept (BatchRecord)."""

    timed = True

    def take(self, core: VerifierCore, start: float, now: float | None) -> list[tuple[Upload, object]] | None:
        """The batch that starts at `start`, popped from the queue, if it may be released: in the virtual
        clock (now=None) only when no earlier arrival can still come; in the wall clock when `now`
        has reached it."""
        if now is None and (len(core.sessions) < core.expected_sessions or core.pending_bound() <= start):
            return None
        if now is not None and now < start:
            return None
        batch: list[tuple[Upload, object]] = []
        while core.queue and len(batch) < core.server.max_batch and core.queue[0][0] <= start:
            batch.append(heapq.heappop(core.queue)[3:])
        return batch

    def keep(self, core: VerifierCore, record: BatchRecord) -> None:
        core.batches.append(record)


class AllAtOnce:
    """The content pass: every queued request at once, whatever the time (emulated times mean nothing
    there, so no session's bound holds a batch back and no batch is kept)."""

    timed = False

    def take(self, core: VerifierCore, start: float, now: float | None) -> list[tuple[Upload, object]]:
        batch = [q[3:] for q in in_arrival_order(core.queue)]
        core.queue.clear()
        return batch

    def keep(self, core: VerifierCore, record: BatchRecord) -> None:
        pass


class _ClientChecks:
    """What fails inside only checked the upload: a ProtocolError addressed to its device (a checking
    bug must not pass for an LLM failure: the caller answers it too, as INTERNAL). A class rather than a
    contextlib.contextmanager: it is entered once per upload, and a generator costs ~5x to set up."""

    __slots__ = ("f",)

    def __init__(self, f: protocol.Upload | protocol.Flush) -> None:
        self.f = f

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> None:  # returns None: whatever was raised goes on
        if exc is None:
            return
        f = self.f
        if isinstance(exc, protocol.ProtocolError):
            if exc.device is None:
                exc.device, exc.seq = f.device, f.seq
        elif isinstance(exc, Exception):
            raise protocol.ProtocolError(
                f"device {f.device}: upload could not be checked ({type(exc).__name__}: {exc})",
                protocol.ErrorCode.INTERNAL,
                device=f.device,
                seq=f.seq,
            ) from exc


class VerifierCore:
    """Sessions, batches and verdicts, composed of a verdict source and a batching rule (module
    docstring); by default the one-pass emulation: verdicts from `llm`, the timed batching rule.
    Requests come in through open and submit (agents.wire's messages), verdicts go out of submit
    (a repeat, a flush) and verify.
    """

    def __init__(
        self,
        llm,
        server: ServerProfile,
        seed: int,
        vocab_size: int,
        expected_sessions: int = 0,
        verdicts: LLMVerdicts | ReplayVerdicts | None = None,
        batching: BatchingRule | AllAtOnce | None = None,
    ):
        self.verdicts = verdicts if verdicts is not None else LLMVerdicts(llm, seed, vocab_size)
        self.batching = batching if batching is not None else BatchingRule()
        self.llm = self.verdicts.llm  # agents.lm.BatchedLM (None in a replay)
        # Virtual clock: no batch is released before every device of the run has opened its
        # session, since an unopened device could still send an earlier arrival.
        self.expected_sessions = expected_sessions
        self.server = server
        self.seed = seed
        self.vocab_size = vocab_size
        self.sessions: dict[int, Session] = {}
        self.queue: list[tuple[float, int, int, Upload, object]] = []  # (arrival, device, seq, upload, payload)
        self.t_free = 0.0
        self.batches: list[BatchRecord] = []
        self.timings = self.verdicts.timings

    @classmethod
    def content_pass(
        cls, llm, server: ServerProfile, seed: int, vocab_size: int, expected_sessions: int = 0
    ) -> VerifierCore:
        """The virtual clock's content pass (agents.engine): verdicts from the LLM, logged (`log`), every
        queued request at once."""
        return cls(
            llm, server, seed, vocab_size, expected_sessions, RecordingVerdicts(llm, seed, vocab_size), AllAtOnce()
        )

    @classmethod
    def replay(
        cls, log: Mapping[tuple[int, int], protocol.Verdict], server: ServerProfile, seed: int, vocab_size: int
    ) -> VerifierCore:
        """The virtual clock's timing replay: the verdicts of a content pass's `log`, batched by the rule."""
        return cls(None, server, seed, vocab_size, verdicts=ReplayVerdicts(log))

    @property
    def log(self) -> Mapping[tuple[int, int], protocol.Verdict]:
        """(device, seq) -> verdict frame: what a content pass logged, or what a replay replays."""
        assert isinstance(self.verdicts, RecordingVerdicts | ReplayVerdicts), "only the virtual clock logs verdicts"
        return self.verdicts.log

    # --- sessions ----------------------------------------------------------------------
    def check_open(self, o: Open) -> None:
        """Raise ProtocolError (addressed to the device) unless this session could be opened now:
        not open yet, a non-empty prompt of ids in [0, V) that fits the model's positions, a
        finite temperature >= 0, max_new_tokens >= 1 and a lookahead >= 0 (+inf: a device that
        never asks the LLM)."""
        E, device, prompt = protocol.ErrorCode, o.frame.device, o.frame.prompt

        def fail(text: str, code=E.BAD_BODY):
            raise protocol.ProtocolError(f"device {device}: OPEN {text}", code, device=device, seq=0)

        if device in self.sessions:
            fail("of a session that is already open", E.REFUSED)
        if not prompt:
            fail("with an empty prompt")
        if not 0 <= min(prompt) <= max(prompt) < self.vocab_size:
            fail(f"prompt token ids must lie in [0, {self.vocab_size})")
        positions = getattr(self.llm, "max_positions", None)
        if positions is not None and len(prompt) > positions:
            fail(f"prompt of {len(prompt)} tokens exceeds the model's {positions} positions", E.LIMIT)
        if not (math.isfinite(o.frame.temperature) and o.frame.temperature >= 0.0):
            fail(f"temperature must be finite and >= 0, got {o.frame.temperature!r}")
        if o.stamp.max_new_tokens < 1:
            fail(f"max_new_tokens must be >= 1, got {o.stamp.max_new_tokens!r}")
        if not o.stamp.lookahead_s >= 0.0:  # NaN fails too
            fail(f"lookahead must be >= 0, got {o.stamp.lookahead_s!r}")

    def open(self, opens: list[Open]) -> None:
        """Open sessions and prefill their prompts. Every OPEN is checked first (check_open; a
        device twice is refused too): if one is bad, ProtocolError is raised and nothing is
        opened. Prefill costs no emulated time (it happens before the emulation starts); the
        prompts share batched forwards (up to PREFILL_ROWS tokens each), exact because the forward
        is batch invariant: which sessions arrive together depends on real timing, their caches do not."""
        opens = list(opens)
        devices = set()
        for o in opens:
            self.check_open(o)
            if o.frame.device in devices:
                raise protocol.ProtocolError(
                    f"device {o.frame.device}: OPEN twice", protocol.ErrorCode.REFUSED, device=o.frame.device, seq=0
                )
            devices.add(o.frame.device)
        for o in opens:
            f = o.frame
            self.sessions[f.device] = Session(
                f.device,
                f.temperature,
                o.stamp.max_new_tokens,
                o.stamp.lookahead_s,
                [f.prompt[-1]],
                o.stamp.lookahead_s,
            )
        self.verdicts.prefill(
            [(o.frame.device, list(o.frame.prompt[:-1])) for o in opens if len(o.frame.prompt) > 1], "llm.prefill"
        )

    def reset(self, devices) -> None:
        """Forget the sessions of `devices`: LLM caches, queued requests, eagerly computed logits (their
        device group died; its successor opens them again and re-executes from the prompts)."""
        devices = set(devices)
        for d in devices:
            if self.sessions.pop(d, None) is not None:
                self.verdicts.forget(d)
        self.queue = [q for q in self.queue if q[1] not in devices]
        heapq.heapify(self.queue)

    def restore(self, states: list[SessionState]) -> None:
        """Re-open sessions from the devices' committed state (a restarted verifier). Each prompt is
        prefilled as by open, then the tokens of every answered upload (the last committed token and
        its piggyback) are fed in the same calls as the first time, step by step: an incrementally
        built cache is not bit-equal to one prefill of the same tokens (the attention's shapes
        differ), the same calls are (and batching across sessions is, agents.lm). A session whose
        final flush was answered stays closed, without a cache. The content log gets the answered
        verdicts' frames back as the devices received them (the wire's float32 values, as logged)."""
        done = {st.open.frame.device for st in states if st.answered and st.answered[-1].final}
        for st in states:
            if st.open.frame.device in done:
                self.check_open(st.open)
        self.open([st.open for st in states if st.open.frame.device not in done])
        steps: list[list[tuple[int, list[int]]]] = []
        for st in states:
            device, o = st.open.frame.device, st.open
            if device in done:
                self.sessions[device] = Session(
                    device, o.frame.temperature, o.stamp.max_new_tokens, o.stamp.lookahead_s, [], math.inf, closed=True
                )
            s = self.sessions[device]
            for seq, a in enumerate(st.answered):
                if device not in done:
                    if len(steps) <= seq:
                        steps.append([])
                    steps[seq].append((device, s.feed + list(a.piggyback)))
                    s.feed = [a.verdict.token]
                s.last_verdict = Verdict(a.verdict, VerdictStamp(self.t_free))
                self.verdicts.restored(device, seq, a.verdict)
            s.next_seq = len(st.answered)
        for items in steps:
            self.verdicts.prefill(items, "llm.restore")

    def pending_bound(self) -> float:
        """Earliest emulated time at which a not-yet-received upload could arrive."""
        return min((s.bound for s in self.sessions.values() if not s.queued and not s.closed), default=math.inf)

    def waiting_on(self) -> dict:
        """Whom the verifier waits for (a stalled run names them, testbed.run.failures): `idle`, every open
        session with no queued upload, as device -> the lower bound on its next arrival (emulated s;
        inf: at most a final flush may still come, which holds nothing back); `timed`, whether those
        bounds are emulated times (not in the content pass); `queued`, the devices whose upload waits
        for a batch; `blocking`, those of `idle` that hold the next batch back in the virtual clock
        (bound <= its start). Read-only: another thread may call it while the serving thread runs."""
        sessions, queue = list(self.sessions.items()), list(self.queue)
        idle = {d: s.bound for d, s in sessions if not s.queued and not s.closed}
        timed, start = self.batching.timed, self.batch_start()
        blocking = sorted(d for d, b in idle.items() if timed and start is not None and b <= start)
        return {"idle": idle, "timed": timed, "queued": sorted(q[1] for q in queue), "blocking": blocking}

    # --- requests ----------------------------------------------------------------------
    def submit(self, upload: Upload) -> Verdict | None:
        """Queue an upload. A retransmitted one (the previous sequence number) gets the same
        verdict again, or nothing while it is still queued; any other unexpected sequence
        number is an OUT_OF_ORDER error. A final flush is answered at once (it carries no
        draft and costs no emulated time) and closes the session; one with no piggyback (a device
        whose sequence stopped at a verified token, agents.stop) runs no forward."""
        f = upload.frame
        with _ClientChecks(f):  # up to `next_seq += 1` only checks: a failure there is the client's
            s = self.sessions.get(f.device)
            if s is None:
                raise protocol.ProtocolError(
                    f"device {f.device}: upload before open", protocol.ErrorCode.UNKNOWN_SESSION
                )
            status = protocol.check_sequence(s.next_seq, f.seq)
            if status is protocol.SeqStatus.REPEAT:
                last = s.last_verdict
                return last if last is not None and last.frame.seq == f.seq else None
            payload = self._check(upload, s, status)
        s.next_seq += 1
        if upload.final:
            return self._close(s, f, upload.stamp.t_arrive)
        s.queued = True
        heapq.heappush(self.queue, (upload.stamp.t_arrive, f.device, f.seq, upload, payload))
        return None

    def _check(self, upload: Upload, s: Session, status: protocol.SeqStatus):
        """ProtocolError unless the upload may be queued now; its payload, decoded (verdicts.check)."""
        f, t_arrive = upload.frame, upload.stamp.t_arrive
        if status is not protocol.SeqStatus.NEXT:
            raise protocol.ProtocolError(
                f"device {f.device}: seq {f.seq} {status.value}, expected {s.next_seq}", protocol.ErrorCode.OUT_OF_ORDER
            )
        if s.closed:
            raise protocol.ProtocolError(f"device {f.device}: upload after the session closed")
        if s.queued:
            raise protocol.ProtocolError(
                f"device {f.device}: seq {f.seq} before the verdict of {f.seq - 1}", protocol.ErrorCode.OUT_OF_ORDER
            )
        if not (math.isfinite(t_arrive) and t_arrive >= 0.0):  # would corrupt the queue order
            raise protocol.ProtocolError(
                f"device {f.device}: arrival time {t_arrive!r} is not finite and >= 0", protocol.ErrorCode.BAD_BODY
            )
        return self.verdicts.check(f, s)  # bad ids, payload or context: rejected here, alone

    def _close(self, s: Session, f: protocol.Upload | protocol.Flush, t_arrive: float) -> Verdict:
        """Answer a final flush (the shadow betas of its piggyback) and close its session."""
        frame, logits = self.verdicts.of_flush(s, f)
        s.last_verdict = Verdict(frame, VerdictStamp(t_arrive))  # a repeat comes without the logits
        s.closed = True
        s.feed = []
        self.verdicts.forget(f.device)
        if logits is None:
            return s.last_verdict
        # the skipped tokens' LLM logits, for their fidelity on the device
        return Verdict(frame, VerdictStamp(t_arrive, logits[: len(f.piggyback)]))

    # --- batching ----------------------------------------------------------------------
    def batch_start(self) -> float | None:
        """S for the next batch given what is queued now (None when nothing is)."""
        if not self.queue:
            return None
        close = self.queue[0][0] + self.server.max_wait_ms / 1000.0
        if len(self.queue) >= self.server.max_batch:
            close = min(close, _kth_arrival(self.queue, self.server.max_batch))
        return max(self.t_free, close)

    def next_batch(self, now: float | None = None) -> tuple[float, list[tuple[Upload, object]]] | None:
        """Pop the next batch if the batching rule releases it (BatchingRule.take: in the virtual clock,
        now=None, only when no earlier arrival can still come; in the wall clock when `now` has reached S)."""
        start = self.batch_start()
        if start is None:
            return None
        batch = self.batching.take(self, start, now)
        return None if batch is None else (start, batch)

    def verify(self, start: float, requests: list[tuple[Upload, object]]) -> list[Verdict]:
        """Speculative verification of one emulated batch (its verdicts from the verdict source)."""
        batch = [u.frame for u, _ in requests]
        sessions = [self.sessions[f.device] for f in batch]
        n_tokens = sum(len(s.feed) + len(f.piggyback) for s, f in zip(sessions, batch))
        t_end = start + self.server.verify_seconds(len(batch), n_tokens)
        frames, measured = self.verdicts.of_batch(requests, self.sessions, self.queue)
        verdicts = []
        for s, f, frame, z in zip(sessions, batch, frames, measured):
            s.last_verdict = Verdict(frame, VerdictStamp(t_end))  # a repeat comes without the logits
            verdicts.append(Verdict(frame, VerdictStamp(t_end, z)) if z is not None and len(z) else s.last_verdict)
            s.feed = [frame.token]
            s.queued = False
            last = f.token_index + 1 >= s.max_new_tokens
            s.bound = t_end + s.lookahead_s if not last else math.inf
        waits = [start - u.stamp.t_arrive for u, _ in requests]
        self.batching.keep(self, BatchRecord(start, t_end, len(batch), n_tokens, waits))
        self.t_free = t_end
        return verdicts
