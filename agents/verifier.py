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
from dataclasses import dataclass

import numpy as np

from agents import protocol
from agents.device import SessionState
from agents.wire import Open, Upload, Verdict, VerdictStamp
from agents.speculative import reconstruct, sample_draft, softmax_t, verify
from agents.timing import Timings
from policies.rng import keyed_rng

EAGER_ROWS = 64  # token rows one eager LLM forward may take beyond its own batch (bounds memory)
PREFILL_ROWS = 2048  # prompt tokens per prefill forward (bounds the activations of a large fleet)


def prefill_chunks(items: list, max_rows: int) -> list[list]:
    """Consecutive groups of (session, tokens) items of at most max_rows tokens (one item may
    exceed it alone)."""
    chunks, rows = [], max_rows
    for item in items:
        if rows + len(item[1]) > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(item)
        rows += len(item[1])
    return chunks


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


def measured_beta(y_d, x_d) -> np.ndarray:
    """beta = max(0, 1 - y_d / x_d), rounded to float32 as the wire carries it (so every
    engine records the same value)."""
    return np.maximum(0.0, 1.0 - np.asarray(y_d) / np.asarray(x_d)).astype(np.float32)


def _kth_arrival(queue: list, k: int) -> float:
    """The k-th earliest arrival in a heap of (arrival, ...) entries (k <= len): a best-first walk of
    the heap's top k entries, O(k log k) however long the queue (sorting it all was O(n log n) per
    batch, quadratic in a fleet's size)."""
    frontier, t = [(queue[0][0], 0)], 0.0
    for _ in range(k):
        t, i = heapq.heappop(frontier)
        for child in (2 * i + 1, 2 * i + 2):
            if child < len(queue):
                heapq.heappush(frontier, (queue[child][0], child))
    return t


class VerifierCore:
    """mode (agents.engine explains the two passes of the virtual clock):
    - "emulate": batches by the rule above, verdicts computed and timed (the wall clock);
    - "content": every queued request is released at once (emulated times are not meaningful),
      and each verdict's frame (what it says, without when) is recorded in `log`;
    - "replay": batches by the rule above, verdict content taken from `replay` (a content pass's
      log); no LLM (llm may be None), no payload decoding: only the timing runs.
    Requests come in through open and submit (agents.wire's messages), verdicts go out of submit
    (a repeat, a flush) and verify.
    """

    MODES = ("emulate", "content", "replay")

    def __init__(self, llm, server: ServerProfile, seed: int, vocab_size: int, expected_sessions: int = 0,
                 mode: str = "emulate", replay: dict | None = None):
        if mode not in self.MODES or (mode == "replay") != (replay is not None):
            raise ValueError(f"mode must be one of {self.MODES} (replay exactly with a replay log), got {mode!r}")
        self.mode = mode
        self.replay = replay
        self.log: dict[tuple[int, int], protocol.Verdict] = {}  # content mode: (device, seq) -> verdict frame
        self.llm = llm  # agents.lm.BatchedLM
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
        self.computed: dict[tuple[int, int], np.ndarray] = {}  # (device, seq) -> LLM logits, eagerly
        self.timings = Timings()

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
                raise protocol.ProtocolError(f"device {o.frame.device}: OPEN twice", protocol.ErrorCode.REFUSED,
                                             device=o.frame.device, seq=0)
            devices.add(o.frame.device)
        for o in opens:
            f = o.frame
            self.sessions[f.device] = Session(f.device, f.temperature, o.stamp.max_new_tokens, o.stamp.lookahead_s,
                                              [f.prompt[-1]], o.stamp.lookahead_s)
        prefill = [(o.frame.device, list(o.frame.prompt[:-1])) for o in opens if len(o.frame.prompt) > 1 and self.llm]
        for chunk in prefill_chunks(prefill, PREFILL_ROWS):
            with self.timings("llm.prefill", sum(len(t) for _, t in chunk)):
                self.llm.extend(chunk, logits=False)

    def reset(self, devices) -> None:
        """Forget the sessions of `devices`: LLM caches, queued requests, eagerly computed logits (their
        device group died; its successor opens them again and re-executes from the prompts)."""
        devices = set(devices)
        for d in devices:
            if self.sessions.pop(d, None) is not None and self.llm is not None:
                self.llm.drop(d)
        self.queue = [q for q in self.queue if q[1] not in devices]
        heapq.heapify(self.queue)
        self.computed = {k: z for k, z in self.computed.items() if k[0] not in devices}

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
                self.sessions[device] = Session(device, o.frame.temperature, o.stamp.max_new_tokens,
                                                o.stamp.lookahead_s, [], math.inf, closed=True)
            s = self.sessions[device]
            for seq, a in enumerate(st.answered):
                if device not in done:
                    if len(steps) <= seq:
                        steps.append([])
                    steps[seq].append((device, s.feed + list(a.piggyback)))
                    s.feed = [a.verdict.token]
                s.last_verdict = Verdict(a.verdict, VerdictStamp(self.t_free))
                if self.mode == "content":
                    self.log[(device, seq)] = a.verdict
            s.next_seq = len(st.answered)
        for items in steps:
            for chunk in prefill_chunks(items, PREFILL_ROWS):
                with self.timings("llm.restore", sum(len(t) for _, t in chunk)):
                    self.llm.extend(chunk, logits=False)

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
        timed, start = self.mode != "content", self.batch_start()
        blocking = sorted(d for d, b in idle.items() if timed and start is not None and b <= start)
        return {"idle": idle, "timed": timed, "queued": sorted(q[1] for q in queue), "blocking": blocking}

    # --- requests ----------------------------------------------------------------------
    def submit(self, upload: Upload) -> Verdict | None:
        """Queue an upload. A retransmitted one (the previous sequence number) gets the same
        verdict again, or nothing while it is still queued; any other unexpected sequence
        number is an OUT_OF_ORDER error. A final flush is answered at once (it carries no
        draft and costs no emulated time) and closes the session; one with no piggyback (a device
        whose sequence stopped at a verified token, agents.stop) runs no forward."""
        f, t_arrive = upload.frame, upload.stamp.t_arrive
        try:  # everything up to `next_seq += 1` only checks: a failure there is the client's, not the LLM's
            s = self.sessions.get(f.device)
            if s is None:
                raise protocol.ProtocolError(f"device {f.device}: upload before open",
                                             protocol.ErrorCode.UNKNOWN_SESSION)
            status = protocol.check_sequence(s.next_seq, f.seq)
            if status is protocol.SeqStatus.REPEAT:
                last = s.last_verdict
                return last if last is not None and last.frame.seq == f.seq else None
            if status is not protocol.SeqStatus.NEXT:
                raise protocol.ProtocolError(f"device {f.device}: seq {f.seq} {status.value}, expected "
                                             f"{s.next_seq}", protocol.ErrorCode.OUT_OF_ORDER)
            if s.closed:
                raise protocol.ProtocolError(f"device {f.device}: upload after the session closed")
            if s.queued:
                raise protocol.ProtocolError(f"device {f.device}: seq {f.seq} before the verdict of "
                                             f"{f.seq - 1}", protocol.ErrorCode.OUT_OF_ORDER)
            if not (math.isfinite(t_arrive) and t_arrive >= 0.0):  # would corrupt the queue order
                raise protocol.ProtocolError(f"device {f.device}: arrival time {t_arrive!r} is not finite "
                                             f"and >= 0", protocol.ErrorCode.BAD_BODY)
            # bad ids or payload: rejected here, alone (a replay's content passed this in its content pass)
            payload = protocol.check_upload(f, self.vocab_size) if self.replay is None else None
            positions = getattr(self.llm, "max_positions", None)
            context = (self.llm.length(f.device) if self.llm else 0) + len(s.feed) + len(f.piggyback)
            if positions is not None and context > positions:  # refused alone, before it can join a batch
                raise protocol.ProtocolError(f"device {f.device}: {len(f.piggyback)} piggybacked tokens take "
                                             f"the context to {context}, over the model's {positions} positions",
                                             protocol.ErrorCode.LIMIT)
        except protocol.ProtocolError as exc:
            if exc.device is None:
                exc.device, exc.seq = f.device, f.seq
            raise
        except Exception as exc:  # a checking bug must not pass for an LLM failure: the caller answers it
            raise protocol.ProtocolError(f"device {f.device}: upload could not be checked "
                                         f"({type(exc).__name__}: {exc})", protocol.ErrorCode.INTERNAL,
                                         device=f.device, seq=f.seq) from exc
        s.next_seq += 1
        if upload.final:
            logits = None
            if self.replay is not None:
                frame = self.replay[(f.device, f.seq)]
            else:
                if f.piggyback:
                    with self.timings("llm.verify_forward", len(s.feed) + len(f.piggyback)):
                        logits = self.llm.extend([(f.device, s.feed + list(f.piggyback))], all_positions=True)[0]
                # else: a sequence that stopped at a verified token only closes its session (no forward)
                frame = protocol.Verdict(device=f.device, session=f.session, seq=f.seq, token_index=f.token_index,
                                         token=protocol.NO_TOKEN, shadow_betas=self._shadow_betas(s, f, logits))
                if self.mode == "content":
                    self.log[(f.device, f.seq)] = frame
            s.last_verdict = Verdict(frame, VerdictStamp(t_arrive))  # a repeat comes without the logits
            s.closed = True
            s.feed = []
            if self.llm is not None:
                self.llm.drop(f.device)
            if logits is None:
                return s.last_verdict
            # the skipped tokens' LLM logits, for their fidelity on the device
            return Verdict(frame, VerdictStamp(t_arrive, logits[: len(f.piggyback)]))
        s.queued = True
        heapq.heappush(self.queue, (t_arrive, f.device, f.seq, upload, payload))
        return None

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
        """Pop the next batch if it may be released. Virtual clock (now=None): only when no
        earlier arrival can still come. Wall clock: when `now` has reached S."""
        start = self.batch_start()
        if start is None:
            return None
        if self.mode == "content":  # content only: everything queued, at once
            batch = [q[3:] for q in sorted(self.queue, key=lambda q: q[:3])]
            self.queue.clear()
            return start, batch
        if now is None and (len(self.sessions) < self.expected_sessions or self.pending_bound() <= start):
            return None
        if now is not None and now < start:
            return None
        batch = []
        while self.queue and len(batch) < self.server.max_batch and self.queue[0][0] <= start:
            batch.append(heapq.heappop(self.queue)[3:])
        return start, batch

    def compute(self, required: list[Upload], extra: list[Upload] = ()) -> None:
        """The LLM forward of every required request not computed yet and of as many extra ones
        as fit in EAGER_ROWS token rows, in ONE batched forward.

        Real compute is decoupled from emulated batching: the forward is batch invariant
        (agents.lm), so a request's logits are the same bits whichever real forward computed
        them. verify() therefore computes its batch together with everything else already
        queued (up to EAGER_ROWS token rows), and later batches find their logits ready: real
        forwards run at the largest batch the arrivals allow, emulated batches stay as the
        server profile forms them."""
        todo, rows = [], 0
        for f in (u.frame for u in required + extra):
            if (f.device, f.seq) in self.computed:
                continue
            rows += len(self.sessions[f.device].feed) + len(f.piggyback)
            if len(todo) >= len(required) and rows > EAGER_ROWS:
                break
            todo.append(f)
        if not todo:
            return
        items = [(f.device, self.sessions[f.device].feed + list(f.piggyback)) for f in todo]
        with self.timings("llm.verify_forward", sum(len(t) for _, t in items)):
            logits = self.llm.extend(items, all_positions=True)
        for f, z in zip(todo, logits):
            self.computed[(f.device, f.seq)] = z

    def verify(self, start: float, requests: list[tuple[Upload, object]]) -> list[Verdict]:
        """Speculative verification of one emulated batch (its LLM forward shared with the rest
        of the queue, see compute)."""
        batch = [u.frame for u, _ in requests]
        sessions = [self.sessions[f.device] for f in batch]
        n_tokens = sum(len(s.feed) + len(f.piggyback) for s, f in zip(sessions, batch))
        t_end = start + self.server.verify_seconds(len(batch), n_tokens)
        measured = [None] * len(batch)  # the LLM logits each verdict carries for the device's fidelity
        if self.replay is not None:
            frames = [self.replay[(f.device, f.seq)] for f in batch]
        else:
            self.compute([u for u, _ in requests], [q[3] for q in sorted(self.queue, key=lambda q: q[:3])])
            logits = [self.computed.pop((f.device, f.seq)) for f in batch]
            with self.timings("verify_math", len(batch)):
                frames = [self._verdict(s, f, payload, z)
                          for s, f, (_, payload), z in zip(sessions, batch, requests, logits)]
            if self.mode == "content":
                self.log.update(((f.device, f.seq), v) for f, v in zip(batch, frames))
            # rows of the piggybacked tokens, then the verified draft's (none for a token the LLM sampled)
            measured = [z[: len(f.piggyback) + (not f.llm_samples)] for f, z in zip(batch, logits)]
        verdicts = []
        for s, f, frame, z in zip(sessions, batch, frames, measured):
            s.last_verdict = Verdict(frame, VerdictStamp(t_end))  # a repeat comes without the logits
            verdicts.append(Verdict(frame, VerdictStamp(t_end, z)) if z is not None and len(z) else s.last_verdict)
            s.feed = [frame.token]
            s.queued = False
            last = f.token_index + 1 >= s.max_new_tokens
            s.bound = t_end + s.lookahead_s if not last else math.inf
        waits = [start - u.stamp.t_arrive for u, _ in requests]
        self.batches.append(BatchRecord(start, t_end, len(batch), n_tokens, waits))
        self.t_free = t_end
        return verdicts

    def _verdict(self, s: Session, f: protocol.Upload, payload, z: np.ndarray) -> protocol.Verdict:
        """The verdict on one request from the LLM's logits z (piggyback rows first, then the draft's)."""
        shadows = self._shadow_betas(s, f, z)
        y = softmax_t(z[len(f.piggyback)], s.temperature)
        if f.llm_samples:
            rng = keyed_rng(self.seed, f.device, f.token_index, "llm_sample")
            token, accepted, beta = int(sample_draft(y, rng)), False, math.nan
        else:
            x_hat = reconstruct(payload.indices, payload.probs, payload.vocab_size)
            rng = keyed_rng(self.seed, f.device, f.token_index, "verify")
            token, accepted = verify(f.draft, x_hat, y, rng)
            beta = float(measured_beta(y[f.draft], f.draft_prob))
        return protocol.Verdict(device=f.device, session=f.session, seq=f.seq, token_index=f.token_index,
                                token=int(token), accepted=bool(accepted), resampled=not accepted and not f.llm_samples,
                                beta=beta, shadow_betas=shadows)

    def _shadow_betas(self, s: Session, f: protocol.Upload | protocol.Flush, z: np.ndarray) -> list[float]:
        """beta = max(0, 1 - y_d / x_d) for each piggybacked (skipped) draft: the rejection
        probability the LLM would have had, measured though the token was never verified."""
        if not f.piggyback:
            return []
        y = softmax_t(z[: len(f.piggyback)], s.temperature)
        tokens = np.asarray(f.piggyback)
        return measured_beta(y[np.arange(len(tokens)), tokens], np.asarray(f.piggyback_probs)).tolist()
