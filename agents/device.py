"""Virtual devices: the per-device CU-HLM state machine and the group that batches their SLM.

A `Device` is pure emulation state. It never reads a clock: every time it records comes
from its profile (slm_ms_per_token) and its links, so the same device produces the same
trace whichever process hosts it and however fast that process is (docs/design.md section 2).

Per token t (docs/design.md section 1): the group runs the SLM for every device ready to draft
(one forward per device, or one batched forward with RunParams.batch_slm); each device
samples its draft d ~ x = softmax(z/T), asks its policy, and either commits d at once
(skip: piggybacked on the next upload) or sends an `Upload` that waits for a `Verdict` (the
messages are agents.wire's: a protocol frame and an emulation stamp each).

Fidelity (docs/design.md section 7) is measured here, exactly: a device keeps the SLM logits of each
token it sent or skipped, with the policy's decision and its decision law (Decision.law: what the
policy would have done for every other draft), until the verdict that covers it; the verifier returns
the LLM's logits of those positions with that verdict (VerdictStamp.llm_logits, measurement only:
never charged to the downlink), and the device computes TV(P, y) of the law P of the committed token
over the draft and the policy's randomness (agents.fidelity), the same for a skipped token and a
verified one. The TV of the branch that happened (TV(x, y) when skipped, TV(hybrid, y) when verified) is
kept as fidelity_tv_branch for comparison; a decision without a law (a plug-in policy) has only that,
and NaN as fidelity_tv. The values go in the token's row and in its content record
(Drafted.fidelity_tv), from which a replay copies them. Why this direction and not x up to the
verifier: see Device._measure_fidelity.

Losses are resolved here, in emulated time, by the same rule in both clocks: the packets of an
upload that did not get through are sent again every rto_s until all have (selective repeat,
as the TCP under ZeroMQ does: netem.Delivery); a lost verdict makes the device resend its
upload every rto_s, and the verifier answers a repeat that arrives after the verdict left
with the same verdict (earlier repeats find the request still queued and are ignored).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from agents import codec, protocol
from agents.wire import SESSION, Open, OpenStamp, Upload, UploadStamp, Verdict
from agents.events import MessageLost, ShadowResolved, TokenCommitted, UploadSent, VerdictReceived
from agents.fidelity import branch_fidelity, exact_fidelity, truncate_for_upload
from agents.speculative import sample_draft, softmax_t
from agents.stop import CODE_REASONS, LENGTH, REASON_CODES, StopRule
from agents.timing import Timings
from netem import DuplexProfile, Link, link_seed
from policies.base import Decision, DecisionContext, Policy
from policies.rng import keyed_rng

MAX_RETRANSMISSIONS = 32
# Fidelity: SLM logits a device may hold for tokens whose verdict has not come back (float32, |V|
# entries each: 64 MiB is ~110 tokens of the Qwen pair). A token past the budget keeps NaN.
FIDELITY_HOLD_BYTES = 64 << 20


@dataclass(frozen=True)
class DeviceSpec:
    """One virtual device as the runner hands it to a group."""

    device: int
    tier: str
    policy_name: str
    slm_ms_per_token: float
    link: DuplexProfile
    prompt_index: int
    prompt_ids: tuple[int, ...]


@dataclass(frozen=True)
class RunParams:
    seed: int
    max_new_tokens: int
    temperature: float
    vocab_size: int
    rto_s: float = 0.2  # retransmission timeout for a lost upload or verdict (emulated)
    # True: one batched SLM forward per group step (prompts included). Exact: agents.lm's packed
    # forward gives a session the same bits alone or in any batch, so a draft never depends on
    # which devices shared its forward. False: one forward per device (for models on the hf
    # forward, which is not batch invariant; BatchedLM.describe() says which one runs).
    batch_slm: bool = True
    # What ends a sequence before max_new_tokens (agents.stop): eos ids, stop strings. Empty: nothing.
    stop: StopRule = StopRule()


@dataclass(frozen=True, slots=True)
class Answered:
    """One verdict a device has applied, with what its upload fed the LLM besides the last committed
    token: the committed state a restarted verifier rebuilds a session from (VerifierCore.restore).
    The verdict's frame as the wire carried it, so the rebuilt content log equals the lost one bit
    for bit."""

    piggyback: tuple[int, ...]
    final: bool
    verdict: protocol.Verdict


@dataclass(frozen=True)
class SessionState:
    """A device's session as the device knows it: how it was opened and every verdict applied
    since, in sequence order (seq = position)."""

    open: Open
    answered: tuple[Answered, ...]


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

    def recorded(self) -> "Drafted":
        """As a content record keeps it: the payload's size, and no decision law (only the fidelity
        at the verdict reads it, from what the device holds; a record of many tokens should not)."""
        if isinstance(self.payload, int) and self.decision.law is None:
            return self
        size = self.payload if isinstance(self.payload, int) else len(self.payload)
        return replace(self, payload=size, decision=replace(self.decision, law=None))


def token_row(spec: DeviceSpec, index: int, **values) -> dict:
    """One row of tokens.parquet (columns as in testbed.results)."""
    row = dict(
        device=spec.device, tier=spec.tier, policy=spec.policy_name, prompt_index=spec.prompt_index,
        token_index=index, token_id=-1, draft_id=-1, uncertainty=math.nan, transmitted=False, k=0,
        prob_bits=0, payload_bytes=0, uplink_bytes=0, accepted=False, resampled=False, beta=math.nan,
        beta_is_shadow=False, retransmissions=0, t_draft_start=math.nan, t_upload_sent=math.nan,
        t_verdict=math.nan, t_commit=math.nan, fidelity_tv=math.nan, fidelity_tv_branch=math.nan, uplink_lost=0,
        downlink_bytes=0, downlink_lost=0, flush_bytes=0, flush_retransmissions=0, stop_reason="",
    )
    row.update(values)
    return row


def _wire_prob(ctx: DecisionContext) -> float:
    """x_d as the wire carries it (float32), so every engine measures beta from the same value."""
    return float(np.float32(ctx.probs[ctx.draft]))


@dataclass
class Device:
    spec: DeviceSpec
    run: RunParams
    policy: Policy
    uplink: Link = field(init=False)
    downlink: Link = field(init=False)
    t: float = 0.0  # emulated time at which the device is ready for its next step
    index: int = 0  # index of the token being generated
    seq: int = 0
    feed: list[int] = field(default_factory=list)  # tokens the SLM has not consumed yet
    # skipped tokens not yet uploaded: (token, x_d, row, held), held as in `held_draft`
    piggyback: list[tuple[int, float, dict, tuple | None]] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    # Keep every row (rows) and applied verdict (answered). A driver's replay keeps neither: its rows
    # leave as events, and no verifier is rebuilt from it; so its memory does not grow with tokens.
    history: bool = True
    last_row: dict | None = None  # the last committed token's row (a final flush is billed to it)
    waiting: Upload | None = None
    waiting_bytes: int = 0  # what the uplink carried of it so far (every round, every resend)
    pending_row: dict | None = None
    flushed: bool = False
    record: list | None = None  # content pass: every token's Drafted (payload as its size), in order
    # Fidelity: what x of a token is recomputed from until its verdict, (array, is_logits): the SLM
    # logits (x = softmax(z/T), bit for bit) or x itself; None when not held (budget, replay).
    held_draft: tuple | None = None  # the waiting upload's draft
    held_bytes: int = 0
    answered: list[Answered] = field(default_factory=list)  # verdicts applied, by seq (for a verifier restart)
    events: list = field(default_factory=list)  # agents.events emitted since the group last drained them
    _drafted_logits: tuple | None = field(default=None, repr=False)  # (token index, logits) from draft()
    # Why the sequence ended ("eos", "stop", "length"; "" while it goes on): at the committed token
    # that ended it, by the stop detector (agents.stop), or in a replay by the record (`replaying`).
    stop_reason: str = ""
    replaying: bool = False
    pending_stop: int = 0  # a replay: the recorded stop of the token waiting for its verdict
    detector: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        seed = self.run.seed
        self.uplink = Link(self.spec.link.uplink, link_seed(seed, self.spec.device, "uplink"))
        self.downlink = Link(self.spec.link.downlink, link_seed(seed, self.spec.device, "downlink"))
        self.feed = list(self.spec.prompt_ids)
        self.detector = self.run.stop.detector()

    # --- state -------------------------------------------------------------------------
    @property
    def generated_all(self) -> bool:
        """The sequence has ended: max_new_tokens generated, or a stop (eos, a stop string) committed."""
        return self.index >= self.run.max_new_tokens or bool(self.stop_reason)

    def _ends(self, row: dict, token: int, recorded: int) -> None:
        """Decide whether the token just committed (row, not emitted yet) ends the sequence: a stop
        first (as a serving engine, an eos on the last allowed token is an eos), then length. Only the
        committed tokens decide; a replay takes the content pass's decision from the record."""
        if self.replaying:
            reason = CODE_REASONS[recorded]
        else:
            reason = self.detector.push(token) if self.detector is not None else ""
            if reason and self.record is not None:
                i = row["token_index"]
                self.record[i] = replace(self.record[i], stop=REASON_CODES[reason])
        if not reason and row["token_index"] + 1 >= self.run.max_new_tokens:
            reason = LENGTH
        if reason:
            row["stop_reason"] = self.stop_reason = reason

    @property
    def ready(self) -> bool:
        """Ready to draft (or, for llm-only, to request) its next token."""
        return self.waiting is None and not self.generated_all

    @property
    def finished(self) -> bool:
        return self.generated_all and self.waiting is None and self.flushed

    @property
    def lookahead_s(self) -> float:
        """Lower bound on the gap between a verdict leaving the verifier and this device's
        next upload arriving there: it must at least draft one token. A device that never
        asks the LLM (slm-only) puts no bound on the verifier at all."""
        if not self.policy.uses_llm:
            return math.inf
        return self.spec.slm_ms_per_token / 1000.0 if self.policy.drafts else 0.0

    # --- drafting ------------------------------------------------------------------------
    def draft(self, logits: np.ndarray) -> DecisionContext:
        """Sample the draft d ~ softmax(z/T) for the current token; returns the policy context."""
        x = softmax_t(logits, self.run.temperature)
        rng = keyed_rng(self.run.seed, self.spec.device, self.index, "draft")
        d = int(sample_draft(x, rng))
        self._drafted_logits = (self.index, logits)  # a reference; apply copies what it keeps
        return DecisionContext(self.run.seed, self.spec.device, self.index, self.run.temperature, d, x)

    def drafted(self, decision: Decision, ctx: DecisionContext | None) -> Drafted:
        """The content of the current token: the draft, x_d as the wire carries it and, when
        transmitting a distribution, the encoded top-k payload."""
        payload = b""
        if decision.transmit and not decision.llm_samples:
            indices, probs = truncate_for_upload(ctx.probs, decision.k)
            payload = codec.encode_payload(indices, probs, self.run.vocab_size, decision.prob_bits)
        if ctx is None:
            assert decision.transmit, "a policy that does not draft must transmit"
            return Drafted(decision, -1, math.nan, payload)
        return Drafted(decision, ctx.draft, _wire_prob(ctx), payload)

    def apply(self, decision: Decision, ctx: DecisionContext | None) -> Upload | None:
        """Act on the policy's decision for the current token; an Upload when transmitting."""
        return self.commit(self.drafted(decision, ctx), self._hold(ctx, decision))

    def _hold(self, ctx: DecisionContext | None, decision: Decision) -> tuple | None:
        """What the fidelity of the current token is computed from at its verdict: (a copy of the SLM
        logits draft() saw, or x itself without them; is_logits; the decision, whose law says what
        the policy would have done for every other draft), within FIDELITY_HOLD_BYTES; None past it."""
        stash, self._drafted_logits = self._drafted_logits, None
        if ctx is None:
            return None
        if stash is not None and stash[0] == self.index:
            held = (np.array(stash[1], copy=True), True, decision)  # one row, not the batch it is a view of
        else:
            held = (ctx.probs, False, decision)
        if self.held_bytes + held[0].nbytes > FIDELITY_HOLD_BYTES:
            return None
        self.held_bytes += held[0].nbytes
        return held

    def _release(self, held: tuple | None) -> tuple | None:
        """(z, x, decision) of a held token, freeing it: x float64, bit for bit what its draft was
        sampled from; z the logits the policy saw (or T log x, the same softmax at every temperature)."""
        if held is None:
            return None
        self.held_bytes -= held[0].nbytes
        T = self.run.temperature
        if held[1]:
            return held[0], softmax_t(held[0], T), held[2]
        x = np.asarray(held[0], dtype=np.float64)
        with np.errstate(divide="ignore"):
            return T * np.log(x), x, held[2]

    def commit(self, c: Drafted, held: tuple | None = None) -> Upload | None:
        """Advance the state machine by one token with its content `c` (from drafted, or from a
        content pass in a replay); an Upload when transmitting. `held`: from _hold, for fidelity."""
        if self.record is not None:
            self.record.append(c.recorded())
        decision = c.decision
        slm_s = self.spec.slm_ms_per_token / 1000.0 if self.policy.drafts else 0.0
        t_start, t_drafted = self.t, self.t + slm_s
        self.feed = []
        # fidelity_tv: a replay's from the record; else NaN until the verdict (llm-only: drawn from y)
        row = token_row(self.spec, self.index, uncertainty=decision.uncertainty, t_draft_start=t_start,
                        fidelity_tv=0.0 if decision.llm_samples else c.fidelity_tv, fidelity_tv_branch=c.fidelity_tv_branch)
        if c.draft >= 0:
            row["draft_id"] = c.draft
        if not decision.transmit:
            # Accepted on the device: no uplink, no LLM cost now; the LLM learns the token later.
            row.update(token_id=c.draft, accepted=True, t_commit=t_drafted)
            self._ends(row, c.draft, c.stop)
            self._keep(row)
            self.events.append(TokenCommitted(dict(row)))  # a copy: the shadow beta comes as its own event
            # what the verdict needs of it; the whole row only when rows are kept (a slm-only
            # device's skips wait here for the final flush: ~1 kB a token otherwise)
            kept = row if self.history else {k: row[k] for k in ("token_index", "uncertainty", "fidelity_tv",
                                                                        "fidelity_tv_branch")}
            self.piggyback.append((c.draft, c.draft_prob, kept, held))
            self.feed = [c.draft]
            self.index += 1
            self.t = t_drafted
            return None
        if decision.llm_samples:  # the LLM samples y itself: nothing to measure
            self._release(held)
            held = None
        self.held_draft = held
        self.pending_stop = c.stop
        payload = c.payload if isinstance(c.payload, bytes) else bytes(c.payload)  # replay: its size
        frame = protocol.Upload(
            device=self.spec.device, session=SESSION, seq=self.seq, token_index=self.index, draft=c.draft,
            draft_prob=c.draft_prob, piggyback=[p[0] for p in self.piggyback],
            piggyback_probs=[p[1] for p in self.piggyback], payload=payload, llm_samples=decision.llm_samples)
        row.update(transmitted=True, k=decision.k, prob_bits=decision.prob_bits if payload else 0,
                   payload_bytes=len(payload), t_upload_sent=t_drafted)
        self.pending_row = row
        return self._send(frame, t_drafted)

    def flush(self) -> Upload | None:
        """After the last token: hand the LLM the remaining skipped drafts (for the shadow
        betas and an exact LLM context). None when there is nothing to flush. A sequence that
        stopped (eos, a stop string) flushes even with no skipped draft: the verifier, which does
        not run the stop rule, learns from the flush that the session is over and frees it (at
        length it knows from max_new_tokens)."""
        assert self.generated_all and self.waiting is None
        if not self.piggyback and self.stop_reason in ("", LENGTH):
            self.flushed = True
            return None
        frame = protocol.Flush(
            device=self.spec.device, session=SESSION, seq=self.seq, token_index=self.index,
            piggyback=[p[0] for p in self.piggyback], piggyback_probs=[p[1] for p in self.piggyback])
        return self._send(frame, self.t)

    def _send(self, frame: protocol.Upload | protocol.Flush, t_sent: float) -> Upload:
        """Send `frame` up at t_sent, and every rto_s its packets that did not get through."""
        if self.record is not None:  # content pass: no time, no links (the replay runs them)
            upload = Upload(frame, UploadStamp(t_sent, t_sent))
            self.waiting_bytes = protocol.wire_size(frame)
        else:  # every rto_s, the packets not through yet go again (netem.Delivery: selective repeat)
            delivery, t, arrive = self.uplink.message(protocol.wire_size(frame)), t_sent, None
            for retransmissions in range(MAX_RETRANSMISSIONS + 1):
                arrive = delivery.round(t)
                if arrive is not None:
                    break
                t += self.run.rto_s
            if arrive is None:
                raise RuntimeError(f"device {self.spec.device}: upload {frame.seq} lost {MAX_RETRANSMISSIONS + 1} times")
            upload = Upload(frame, UploadStamp(t_sent, arrive, retransmissions))
            self.waiting_bytes = delivery.wire_bytes
        self.waiting = upload
        self.seq += 1
        return upload

    # --- verdicts ------------------------------------------------------------------------
    def on_verdict(self, verdict: Verdict) -> None:
        upload = self.waiting
        if upload is None or verdict.frame.seq != upload.frame.seq:
            return  # a duplicate of a verdict already applied
        v, t_sent = verdict.frame, verdict.stamp.t_sent
        up_bytes, down_bytes = protocol.wire_size(upload.frame), protocol.wire_size(v)
        retx = upload.stamp.retransmissions
        t_last = upload.stamp.t_sent + retx * self.run.rto_s  # the copy that reached the verifier
        # content pass: no links (verdict time is meaningless there; the replay runs the links)
        arrive = self.downlink.send(down_bytes, t_sent) if self.record is None else t_sent
        # Link accounting (events and the row's link columns): each retransmission in _send followed a
        # lost copy; every downlink send is a copy of the verdict.
        up_lost, down_copies, down_lost = upload.stamp.retransmissions, int(self.record is None), int(arrive is None)
        # The verdict was lost: resend the upload every rto_s until a repeat is answered. Only
        # tries that could have been answered count toward the limit: a copy that reached the
        # verifier before the verdict left (the request was still queued, so it was ignored), or
        # a lost copy sent before then, is no lost transmission. Without this a verifier queue
        # longer than MAX_RETRANSMISSIONS * rto_s ended a device on its first lost verdict. Every
        # copy is still sent (the link's state and the uplink bytes count it), so a run that
        # never reached the limit keeps its trace bit for bit.
        # A resend is a new message; its packets that did not get through go again at the next
        # rto_s (selective repeat, as in _send) until it is through, then the next resend is new.
        lost, resend = 0, None
        while arrive is None:
            if lost >= MAX_RETRANSMISSIONS:
                raise RuntimeError(f"device {self.spec.device}: verdict {v.seq} lost {MAX_RETRANSMISSIONS} times")
            t_last += self.run.rto_s
            retx += 1
            resend = resend or self.uplink.message(up_bytes)
            before = resend.wire_bytes
            again = resend.round(t_last)
            self.waiting_bytes += resend.wire_bytes - before
            up_lost += again is None
            if again is not None:
                resend = None
            if (t_last if again is None else again) < t_sent:
                continue  # too early to be answered: not a loss (t_last grows, so this ends)
            lost += 1
            if again is not None:
                arrive = self.downlink.send(down_bytes, again)
                down_copies += 1
                down_lost += arrive is None
        self._measure_fidelity(upload, verdict.stamp.llm_logits)
        links = dict(uplink_lost=up_lost, downlink_bytes=down_bytes * down_copies, downlink_lost=down_lost)
        if self.record is None:  # a content pass has no links: the replay emits them
            self._emit_links(upload, up_bytes, down_bytes, retx, down_copies, up_lost, down_lost, arrive)
        if self.history:
            self.answered.append(Answered(upload.frame.piggyback, upload.final, v))
        if upload.final:  # billed to the device's last token: a skipped one, or (a stop) a verified one,
            # whose own link counts stay in it: the flush's are added
            self.last_row.update(flush_bytes=self.waiting_bytes, flush_retransmissions=retx)
            for k, n in links.items():
                self.last_row[k] += n
        measured = verdict.stamp.llm_logits is not None  # else the fidelity came with the commit (a replay)
        for (_, _, skipped, _), beta in zip(self.piggyback, v.shadow_betas):
            skipped.update(beta=beta, beta_is_shadow=True)
            self.policy.observe(self.spec.device, skipped["token_index"], skipped["uncertainty"], beta, True)
            self.events.append(ShadowResolved(self.spec.device, skipped["token_index"], upload.frame.token_index, beta,
                                              skipped["fidelity_tv"] if measured else math.nan,
                                              skipped["fidelity_tv_branch"] if measured else math.nan))
        self.piggyback = []
        self.waiting = None
        if upload.final:
            self.flushed = True
            return
        row = self.pending_row
        row.update(token_id=v.token, accepted=v.accepted, resampled=v.resampled,
                   beta=v.beta, uplink_bytes=self.waiting_bytes, retransmissions=retx,
                   t_verdict=arrive, t_commit=arrive, **links)
        self.policy.observe(self.spec.device, row["token_index"], row["uncertainty"], v.beta, False)
        self._ends(row, v.token, self.pending_stop)
        self._keep(row)
        self.events.append(TokenCommitted(dict(row)))
        self.pending_row = None
        self.feed = [v.token]
        self.index += 1
        self.t = arrive

    def _keep(self, row: dict) -> None:
        self.last_row = row
        if self.history:
            self.rows.append(row)

    def _emit_links(self, upload: Upload, up_bytes: int, down_bytes: int, retx: int, down_copies: int,
                    up_lost: int, down_lost: int, arrive: float) -> None:
        """The link events of one resolved upload (before its shadow betas: a results writer completes
        a flush's row with them). up_bytes, down_bytes: one copy of the upload and of its verdict."""
        s = self.spec
        key = (s.device, s.tier, s.policy_name, upload.frame.token_index, upload.frame.seq, upload.final)
        self.events.append(UploadSent(*key, up_bytes, 1 + retx, upload.stamp.t_sent, self.waiting_bytes))
        self.events.append(VerdictReceived(*key, down_bytes, down_copies, arrive))
        for direction, n in (("uplink", up_lost), ("downlink", down_lost)):
            if n:
                self.events.append(MessageLost(*key, direction, n))

    def _measure_fidelity(self, upload: Upload, llm_logits: np.ndarray | None) -> None:
        """Fidelity of the tokens this verdict covers, from the LLM logits it carries (row i: the
        i-th piggybacked token's position; then the draft's): the exact TV(P, y) of each
        (agents.fidelity), skipped or verified alike, from its policy's decision law; a policy
        without one gets only the branch approximation (fidelity_tv_branch). Frees what was held.

        Why x stays here and y comes down, rather than x going up with the upload: the verifier's
        socket bounds every inbound message part (agents.actors: max_frame_bytes + 4 KiB, 4 MiB by
        default), and x is 4 |V| bytes per token (~600 KB for the Qwen pair) for the draft and
        for every skipped token since the last upload, an unbounded number; a device's socket has
        no such bound. Memory is about the same either way: a token's x is held here until its
        verdict instead of in the verifier's queue until its verification."""
        held = [p[3] for p in self.piggyback]
        draft = self.held_draft
        self.held_draft = None
        if llm_logits is None:  # a replay (values from the record), or nothing to measure
            for h in held + [draft]:
                self._release(h)
            return
        T = self.run.temperature
        n = len(held)
        for i, (h, (_, _, row, _)) in enumerate(zip(held, self.piggyback)):
            got = self._release(h)
            if got is not None and i < len(llm_logits):
                self._set_fidelity(row, *self._fidelity(got, softmax_t(llm_logits[i], T), None))
        got = self._release(draft)
        if got is not None and not upload.final and not upload.frame.llm_samples and len(llm_logits) > n:
            self._set_fidelity(self.pending_row, *self._fidelity(got, softmax_t(llm_logits[n], T), upload.frame.payload))

    @staticmethod
    def _fidelity(got: tuple, y: np.ndarray, payload: bytes | None) -> tuple[float, float]:
        """(fidelity_tv, fidelity_tv_branch) of one token: the exact value when its decision has a law
        (else NaN), and the TV of the branch that happened (payload: the verified draft's upload; None:
        skipped), kept for every token so that the two can be compared; only a token without the exact
        value has to make do with it."""
        z, x, decision = got
        exact = exact_fidelity(z, x, decision.law, y) if decision.law is not None else math.nan
        return exact, branch_fidelity(x, y, payload)

    def _set_fidelity(self, row: dict, value: float, branch: float) -> None:
        row["fidelity_tv"], row["fidelity_tv_branch"] = value, branch
        if self.record is not None:  # content pass: the replay takes it from the record
            i = row["token_index"]
            self.record[i] = replace(self.record[i], fidelity_tv=value, fidelity_tv_branch=branch)


class DeviceGroupCore:
    """Many virtual devices sharing one SLM: one batched forward per step over every device
    ready to draft. Transport-free: callers deliver uploads and verdicts."""

    def __init__(self, specs: list[DeviceSpec], run: RunParams, slm, policies: dict[str, Policy],
                 record: bool = False, replay: dict[int, list[Drafted]] | None = None, history: bool = True):
        """record: keep every token's content (Device.record) for a later replay. replay: the
        recorded content per device; the SLM and the policies are then not consulted (slm may
        be None), only the state machine and the links run. history=False: rows() and
        session_states() stay empty (Device.history), the events are the only output."""
        self.run = run
        self.slm = slm  # agents.lm.BatchedLM (None when no device drafts, or in a replay)
        self.devices = {s.device: Device(s, run, policies[s.policy_name], history=history) for s in specs}
        # Devices a step may move (ready, or to flush) and devices that may hold events: a step and a
        # drain visit these, in device order, not the whole fleet (with 10,000 devices and a few
        # hundred moving per step, visiting all made the replay quadratic in devices).
        self._order = {device: i for i, device in enumerate(self.devices)}
        self._awake = set(self.devices)
        self._noisy = set(self.devices)
        self.replay = replay
        if replay is not None:
            for d in self.devices.values():
                d.replaying, d.detector = True, None
        if record:
            for d in self.devices.values():
                d.record = []
        self.timings = Timings()

    def recorded(self) -> dict[int, list[Drafted]]:
        """The content recorded so far (record=True), per device."""
        return {device: d.record for device, d in self.devices.items()}

    @property
    def done(self) -> bool:
        return all(d.finished for d in self.devices.values())

    def has_work(self) -> bool:
        return any(self._movable(self.devices[i]) for i in self._awake)

    def awaiting_verdicts(self) -> bool:
        """Some device waits for a verdict (a content pass steps in lockstep: none may)."""
        return any(d.waiting is not None for d in self.devices.values())

    def next_time(self) -> float:
        """Emulated time of the earliest device that can move without the verifier."""
        return min((d.t for d in map(self.devices.get, self._awake) if self._movable(d)), default=math.inf)

    @staticmethod
    def _must_flush(d: Device) -> bool:
        return d.generated_all and d.waiting is None and not d.flushed

    @classmethod
    def _movable(cls, d: Device) -> bool:
        return d.ready or cls._must_flush(d)

    def _in_order(self, devices) -> list[Device]:
        return [self.devices[i] for i in sorted(devices, key=self._order.__getitem__)]

    def step(self, until: float | None = None) -> list[Upload]:
        """Advance every device that can move without the verifier by one token (or flush
        it when it has generated all its tokens); with `until` (wall clock) only those whose
        emulated time has come. Returns the uploads to deliver."""
        uploads: list[Upload] = []
        due = (lambda d: True) if until is None else (lambda d: d.t <= until)
        movable = self._in_order(self._awake)  # every device that is ready or must flush is in _awake
        self._noisy.update(self._awake)
        ready = [d for d in movable if d.ready and due(d)]
        if self.replay is not None:
            for d in ready:
                if (u := d.commit(self.replay[d.spec.device][d.index])) is not None:
                    uploads.append(u)
            ready = []
        drafting = [d for d in ready if d.policy.drafts]
        if drafting:
            timings = self.timings
            phase = "slm.prefill" if any(len(d.feed) > 1 for d in drafting) else "slm.decode"
            with timings(phase, sum(len(d.feed) for d in drafting)):
                if self.run.batch_slm:
                    logits = self.slm.extend([(d.spec.device, d.feed) for d in drafting])
                else:
                    logits = [self.slm.extend([(d.spec.device, d.feed)])[0] for d in drafting]
            by_policy: dict[int, list[tuple[Device, DecisionContext, np.ndarray]]] = {}
            with timings("draft", len(drafting)):
                for d, z in zip(drafting, logits):
                    ctx = d.draft(z)
                    by_policy.setdefault(id(d.policy), []).append((d, ctx, z))
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
                decision = d.policy.decide(None, None)
                uploads.append(d.apply(decision, None))
        for d in movable:  # those that just committed their last token included
            if self._must_flush(d) and due(d):
                if (u := d.flush()) is not None:
                    uploads.append(u)
        self._awake = {d.spec.device for d in movable if self._movable(d)}
        return uploads

    def on_verdict(self, verdict: Verdict) -> None:
        d = self.devices[verdict.frame.device]
        d.on_verdict(verdict)
        self._noisy.add(d.spec.device)
        if self._movable(d):
            self._awake.add(d.spec.device)

    def opens(self) -> list[Open]:
        """Each device's OPEN (VerifierCore.open)."""
        run = self.run
        return [Open(protocol.Open(device=d.spec.device, session=SESSION, seq=0, prompt=d.spec.prompt_ids,
                                   seed=run.seed, temperature=run.temperature, tier=d.spec.tier,
                                   policy=d.spec.policy_name),
                     OpenStamp(run.max_new_tokens, d.lookahead_s))
                for d in self.devices.values()]

    def session_states(self) -> list[SessionState]:
        """Every device's session as committed here: what a restarted verifier re-opens and
        re-prefills (VerifierCore.restore). An upload still waiting is not in it: it is resent."""
        return [SessionState(o, tuple(d.answered)) for o, d in zip(self.opens(), self.devices.values())]

    def unanswered(self) -> list[Upload]:
        """Uploads waiting for their verdict (resent to a restarted verifier)."""
        return [d.waiting for d in self.devices.values() if d.waiting is not None]

    def rows_since(self, seen: dict[int, int]) -> list[dict]:
        """Rows committed since the last call with the same `seen` (updated in place): the
        live feed for progress and metrics."""
        fresh = []
        for device, d in self.devices.items():
            fresh.extend(d.rows[seen.get(device, 0):])
            seen[device] = len(d.rows)
        return fresh

    def rows(self) -> list[dict]:
        return [r for d in self.devices.values() for r in d.rows]

    def drain_events(self) -> list:
        """Every event (agents.events) the devices emitted since the last call, each device's in order."""
        out = []
        for d in self._in_order(self._noisy):
            if d.events:
                out.extend(d.events)
                d.events = []
        self._noisy = set()
        return out

