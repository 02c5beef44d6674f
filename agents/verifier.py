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
- verdicts: from the LLM (`LLMVerdicts`); from the LLM, each verdict's frame logged for a replay
  (`RecordingVerdicts`, the content pass); or from such a log, with no LLM and nothing decoded
  (`ReplayVerdicts`, the timing replay);
- batches: by the rule above, in emulated time (`BatchingRule`), or every queued request at once,
  untimed (`AllAtOnce`, the content pass, whose times mean nothing).
The one-pass emulation (the wall clock) is the LLM with the rule; `content_pass` and `replay` build
the virtual clock's two.

Batch invariance: a verdict must not depend on which requests shared its forward, or the content pass
(every queued request in one forward) would differ from a one-pass run. The LLM therefore forwards
many sessions at once only where its forward is batch invariant (agents.lm); a model on another
forward gets one sequence per forward, as RunParams.batch_slm does for the SLM.

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

import contextlib
import heapq
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from agents import protocol
from agents.content import batch_invariant
from agents.device import SessionState
from agents.speculative import reconstruct, rejection_prob, sample_draft, softmax_t, verify
from agents.timing import Timings
from agents.wire import Open, Upload, Verdict, VerdictStamp
from policies.rng import keyed_rng

EAGER_ROWS = 64  # token rows one eager LLM forward may take beyond its own batch (bounds memory)
PREFILL_ROWS = 2048  # prompt tokens per prefill forward (bounds the activations of a large fleet)


def prefill_chunks(items: list, max_rows: int) -> list[list]:
    """Consecutive groups of (session, tokens) items of at most max_rows tokens (one item may
    exceed it alone)."""
    chunks: list[list] = []
    rows = max_rows
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


def _in_order(queue: list) -> list:
    """Queue entries in (arrival, device, seq) order."""
    return sorted(queue, key=lambda q: q[:3])


# --- where verdicts come from -------------------------------------------------------------------


class LLMVerdicts:
    """Verdicts from the LLM: its forward over each request's context (the last committed token, the
    piggybacked drafts, the draft), then speculative verification and the measured betas."""

    def __init__(self, llm, seed: int, vocab_size: int):
        self.llm = llm  # agents.lm.BatchedLM
        self.seed, self.vocab_size = seed, vocab_size
        self.batched = batch_invariant(llm)  # many sessions per forward (module docstring)
        self.computed: dict[tuple[int, int], np.ndarray] = {}  # (device, seq) -> LLM logits, eagerly
        self.timings = Timings()

    def prefill(self, items: list[tuple[int, list[int]]], phase: str) -> None:
        """Feed (session, tokens) items to the LLM's caches, logits unused, in as few forwards as
        PREFILL_ROWS allows (one per item without batch invariance)."""
        for chunk in prefill_chunks(items, PREFILL_ROWS if self.batched else 0):
            with self.timings(phase, sum(len(t) for _, t in chunk)):
                self.llm.extend(chunk, logits=False)

    def forget(self, device: int) -> None:
        """The session is over (closed, or its group died): its cache and its eager logits go."""
        self.llm.drop(device)
        self.computed = {k: z for k, z in self.computed.items() if k[0] != device}

    def check(self, f: protocol.Upload | protocol.Flush, s: Session):
        """The upload's payload, decoded; ProtocolError for bad ids or payload, or for a context past the
        model's positions (refused alone, before it can join a batch)."""
        payload = protocol.check_upload(f, self.vocab_size)
        positions = getattr(self.llm, "max_positions", None)
        context = self.llm.length(f.device) + len(s.feed) + len(f.piggyback)
        if positions is not None and context > positions:
            raise protocol.ProtocolError(f"device {f.device}: {len(f.piggyback)} piggybacked tokens take "
                                         f"the context to {context}, over the model's {positions} positions",
                                         protocol.ErrorCode.LIMIT)
        return payload

    def of_flush(self, s: Session, f: protocol.Flush) -> tuple[protocol.Verdict, np.ndarray | None]:
        """The verdict on a final flush (the shadow betas of its piggyback) and the LLM's logits at those
        positions; a flush with no piggyback (a sequence that stopped at a verified token) runs no forward."""
        logits = None
        if f.piggyback:
            with self.timings("llm.verify_forward", len(s.feed) + len(f.piggyback)):
                logits = self.llm.extend([(f.device, s.feed + list(f.piggyback))], all_positions=True)[0]
        frame = protocol.Verdict(device=f.device, session=f.session, seq=f.seq, token_index=f.token_index,
                                 token=protocol.NO_TOKEN, shadow_betas=self._shadow_betas(s, f, logits))
        return frame, logits

    def of_batch(self, requests: list[tuple[Upload, object]], sessions: dict[int, Session],
                 queue: list) -> tuple[list[protocol.Verdict], list[np.ndarray | None]]:
        """The verdicts on one batch, and the LLM logits each carries for the device's fidelity: the rows
        of its piggybacked tokens, then the verified draft's (none for a token the LLM sampled). The
        forward is shared with the rest of the `queue` (compute)."""
        batch = [u.frame for u, _ in requests]
        self.compute([u for u, _ in requests], [q[3] for q in _in_order(queue)], sessions)
        logits = [self.computed.pop((f.device, f.seq)) for f in batch]
        with self.timings("verify_math", len(batch)):
            frames = [self._verdict(sessions[f.device], f, payload, z)
                      for f, (_, payload), z in zip(batch, requests, logits)]
        return frames, [z[: len(f.piggyback) + (not f.llm_samples)] for f, z in zip(batch, logits)]

    def restored(self, device: int, seq: int, frame: protocol.Verdict) -> None:
        """A restarted verifier learnt the verdict `frame` from the device (VerifierCore.restore)."""

    def compute(self, required: list[Upload], extra: list[Upload], sessions: dict[int, Session]) -> None:
        """The LLM forward of every required request not computed yet and of as many extra ones
        as fit in EAGER_ROWS token rows, in ONE batched forward (one forward each without batch
        invariance).

        Real compute is decoupled from emulated batching: the forward is batch invariant
        (agents.lm), so a request's logits are the same bits whichever real forward computed
        them. of_batch therefore computes its batch together with everything else already
        queued (up to EAGER_ROWS token rows), and later batches find their logits ready: real
        forwards run at the largest batch the arrivals allow, emulated batches stay as the
        server profile forms them."""
        todo, rows = [], 0
        for f in (u.frame for u in required + extra):
            if (f.device, f.seq) in self.computed:
                continue
            rows += len(sessions[f.device].feed) + len(f.piggyback)
            if len(todo) >= len(required) and rows > EAGER_ROWS:
                break
            todo.append(f)
        for forward in ([todo] if self.batched else [[f] for f in todo]) if todo else []:
            items = [(f.device, sessions[f.device].feed + list(f.piggyback)) for f in forward]
            with self.timings("llm.verify_forward", sum(len(t) for _, t in items)):
                logits = self.llm.extend(items, all_positions=True)
            for f, z in zip(forward, logits):
                self.computed[(f.device, f.seq)] = z

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
            beta = float(_wire_beta(f.draft_prob, y[f.draft]))
        return protocol.Verdict(device=f.device, session=f.session, seq=f.seq, token_index=f.token_index,
                                token=int(token), accepted=bool(accepted), resampled=not accepted and not f.llm_samples,
                                beta=beta, shadow_betas=shadows)

    @staticmethod
    def _shadow_betas(s: Session, f: protocol.Upload | protocol.Flush, z: np.ndarray | None) -> list[float]:
        """beta for each piggybacked (skipped) draft: the rejection probability the LLM would have had,
        measured though the token was never verified."""
        if not f.piggyback:
            return []
        y = softmax_t(z[: len(f.piggyback)], s.temperature)
        tokens = np.asarray(f.piggyback)
        return _wire_beta(np.asarray(f.piggyback_probs), y[np.arange(len(tokens)), tokens]).tolist()


def _wire_beta(x_d, y_d) -> np.ndarray:
    """beta (speculative.rejection_prob) of drafts whose x_d is the wire's (float32) value, rounded to
    float32 as the wire carries it: every engine records the same value."""
    return rejection_prob(x_d, y_d).astype(np.float32)


class RecordingVerdicts(LLMVerdicts):
    """The content pass: verdicts from the LLM, each frame (what it says, without when) kept in `log`
    for the replay, by (device, seq)."""

    def __init__(self, llm, seed: int, vocab_size: int):
        super().__init__(llm, seed, vocab_size)
        self.log: dict[tuple[int, int], protocol.Verdict] = {}

    def of_flush(self, s: Session, f: protocol.Flush) -> tuple[protocol.Verdict, np.ndarray | None]:
        frame, logits = super().of_flush(s, f)
        self.log[(f.device, f.seq)] = frame
        return frame, logits

    def of_batch(self, requests, sessions, queue):
        frames, measured = super().of_batch(requests, sessions, queue)
        self.log.update(((u.frame.device, u.frame.seq), v) for (u, _), v in zip(requests, frames))
        return frames, measured

    def restored(self, device: int, seq: int, frame: protocol.Verdict) -> None:
        self.log[(device, seq)] = frame  # as the device received it: the rebuilt log equals the lost one


class ReplayVerdicts:
    """The timing replay: each verdict's frame from a content pass's log (`log`: (device, seq) ->
    frame; agents.engine.PackedVerdicts or a dict). No LLM runs and no payload is decoded (the
    content pass checked each upload); its verdicts carry no logits (the record has the fidelity)."""

    llm = None

    def __init__(self, log: Mapping[tuple[int, int], protocol.Verdict]):
        self.log = log
        self.timings = Timings()

    def prefill(self, items: list[tuple[int, list[int]]], phase: str) -> None:
        pass

    def forget(self, device: int) -> None:
        pass

    def check(self, f: protocol.Upload | protocol.Flush, s: Session):
        return None

    def of_flush(self, s: Session, f: protocol.Flush) -> tuple[protocol.Verdict, None]:
        return self.log[(f.device, f.seq)], None

    def of_batch(self, requests: list[tuple[Upload, object]], sessions: dict[int, Session],
                 queue: list) -> tuple[list[protocol.Verdict], list[None]]:
        return [self.log[(u.frame.device, u.frame.seq)] for u, _ in requests], [None] * len(requests)

    def restored(self, device: int, seq: int, frame: protocol.Verdict) -> None:
        pass


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
        batch = []
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
        batch = [q[3:] for q in _in_order(core.queue)]
        core.queue.clear()
        return batch

    def keep(self, core: VerifierCore, record: BatchRecord) -> None:
        pass


@contextlib.contextmanager
def _client_checks(f: protocol.Upload | protocol.Flush) -> Iterator[None]:
    """What fails inside only checked the upload: a ProtocolError addressed to its device (a checking
    bug must not pass for an LLM failure: the caller answers it too, as INTERNAL)."""
    try:
        yield
    except protocol.ProtocolError as exc:
        if exc.device is None:
            exc.device, exc.seq = f.device, f.seq
        raise
    except Exception as exc:
        raise protocol.ProtocolError(f"device {f.device}: upload could not be checked "
                                     f"({type(exc).__name__}: {exc})", protocol.ErrorCode.INTERNAL,
                                     device=f.device, seq=f.seq) from exc


class VerifierCore:
    """Sessions, batches and verdicts, composed of a verdict source and a batching rule (module
    docstring); by default the one-pass emulation: verdicts from `llm`, the timed batching rule.
    Requests come in through open and submit (agents.wire's messages), verdicts go out of submit
    (a repeat, a flush) and verify.
    """

    def __init__(self, llm, server: ServerProfile, seed: int, vocab_size: int, expected_sessions: int = 0,
                 verdicts: LLMVerdicts | ReplayVerdicts | None = None,
                 batching: BatchingRule | AllAtOnce | None = None):
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
    def content_pass(cls, llm, server: ServerProfile, seed: int, vocab_size: int,
                     expected_sessions: int = 0) -> VerifierCore:
        """The virtual clock's content pass (agents.engine): verdicts from the LLM, logged (`log`), every
        queued request at once."""
        return cls(llm, server, seed, vocab_size, expected_sessions, RecordingVerdicts(llm, seed, vocab_size),
                   AllAtOnce())

    @classmethod
    def replay(cls, log: Mapping[tuple[int, int], protocol.Verdict], server: ServerProfile, seed: int,
               vocab_size: int) -> VerifierCore:
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
                raise protocol.ProtocolError(f"device {o.frame.device}: OPEN twice", protocol.ErrorCode.REFUSED,
                                             device=o.frame.device, seq=0)
            devices.add(o.frame.device)
        for o in opens:
            f = o.frame
            self.sessions[f.device] = Session(f.device, f.temperature, o.stamp.max_new_tokens, o.stamp.lookahead_s,
                                              [f.prompt[-1]], o.stamp.lookahead_s)
        self.verdicts.prefill([(o.frame.device, list(o.frame.prompt[:-1])) for o in opens if len(o.frame.prompt) > 1],
                              "llm.prefill")

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
        with _client_checks(f):  # up to `next_seq += 1` only checks: a failure there is the client's
            s = self.sessions.get(f.device)
            if s is None:
                raise protocol.ProtocolError(f"device {f.device}: upload before open",
                                             protocol.ErrorCode.UNKNOWN_SESSION)
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
        return self.verdicts.check(f, s)  # bad ids, payload or context: rejected here, alone

    def _close(self, s: Session, f: protocol.Flush, t_arrive: float) -> Verdict:
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
