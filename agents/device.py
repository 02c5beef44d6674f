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

Composition, not modes (docs/design.md section 2): a device takes its content from a content source
(agents.content: the models, the models recording for a replay, or a record) and its time from a link
model (agents.links: its links, or none in the content pass, whose times mean nothing). The state
machine below is the same in every pass: the one-pass emulation (and the wall clock) is the models
over links, the virtual clock's content pass the models recording over no links, its timing replay
the record over links.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass, field

import numpy as np

from agents import codec, protocol
from agents.content import ContentSource, Drafted, ModelContent, RecordingContent, ReplayContent
from agents.events import ShadowResolved, TokenCommitted
from agents.fidelity import branch_fidelity, exact_fidelity, truncate_for_upload
from agents.links import MAX_RETRANSMISSIONS as MAX_RETRANSMISSIONS  # its old home (testbed.config.checks)
from agents.links import Answer, Links, NoLinks
from agents.speculative import sample_draft, softmax_t
from agents.stop import LENGTH, StopRule
from agents.timing import Timings
from agents.wire import SESSION, Open, OpenStamp, Upload, Verdict
from netem import DuplexProfile
from policies.base import Decision, DecisionContext, Policy
from policies.rng import keyed_rng

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
    # True: one batched SLM forward per group step (prompts included), where the forward is batch
    # invariant (agents.lm's packed forward gives a session the same bits alone or in any batch, so a
    # draft never depends on which devices shared its forward). A forward that is not (the hf forward;
    # BatchedLM.describe() says which one runs) gets one forward per device anyway (agents.content).
    # False: one forward per device.
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


# Every other column of a token's row before anything is known of it, in TokenRecord's order (testbed.results)
_ROW_UNKNOWN = dict(
    token_id=-1,
    draft_id=-1,
    uncertainty=math.nan,
    transmitted=False,
    k=0,
    prob_bits=0,
    payload_bytes=0,
    uplink_bytes=0,
    accepted=False,
    resampled=False,
    beta=math.nan,
    beta_is_shadow=False,
    retransmissions=0,
    t_draft_start=math.nan,
    t_upload_sent=math.nan,
    t_verdict=math.nan,
    t_commit=math.nan,
    fidelity_tv=math.nan,
    fidelity_tv_branch=math.nan,
    uplink_lost=0,
    downlink_bytes=0,
    downlink_lost=0,
    flush_bytes=0,
    flush_retransmissions=0,
    stop_reason="",
)


def token_row(spec: DeviceSpec, index: int, **values) -> dict:
    """One row of tokens.parquet (columns as in testbed.results)."""
    row = {
        "device": spec.device,
        "tier": spec.tier,
        "policy": spec.policy_name,
        "prompt_index": spec.prompt_index,
        "token_index": index,
        **_ROW_UNKNOWN,  # a copy: one per token, so it is built in one go rather than key by key
    }
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
    content: ContentSource = field(default_factory=ModelContent)  # where each token comes from (agents.content)
    link_model: InitVar[type[Links | NoLinks]] = Links  # how long its messages take (agents.links)
    links: Links | NoLinks = field(init=False)
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
    # Fidelity: what x of a token is recomputed from until its verdict, (array, is_logits): the SLM
    # logits (x = softmax(z/T), bit for bit) or x itself; None when not held (budget, replay).
    held_draft: tuple | None = None  # the waiting upload's draft
    held_bytes: int = 0
    answered: list[Answered] = field(default_factory=list)  # verdicts applied, by seq (for a verifier restart)
    events: list = field(default_factory=list)  # agents.events emitted since the group last drained them
    _drafted_logits: tuple | None = field(default=None, repr=False)  # (token index, logits) from draft()
    # Why the sequence ended ("eos", "stop", "length"; "" while it goes on): at the committed token
    # that ended it, as the content source says (ContentSource.stop), or at max_new_tokens.
    stop_reason: str = ""
    pending_stop: int = 0  # the stop a record holds for the token waiting for its verdict (Drafted.stop)

    def __post_init__(self, link_model: type[Links | NoLinks]) -> None:
        self.links = link_model(self.spec, self.run)
        self.feed = list(self.spec.prompt_ids)
        self.content.start(self)

    # --- state -------------------------------------------------------------------------
    @property
    def generated_all(self) -> bool:
        """The sequence has ended: max_new_tokens generated, or a stop (eos, a stop string) committed."""
        return self.index >= self.run.max_new_tokens or bool(self.stop_reason)

    def _ends(self, row: dict, token: int, recorded: int) -> None:
        """Decide whether the token just committed (row, not emitted yet) ends the sequence: a stop
        first (as a serving engine, an eos on the last allowed token is an eos), then length. Only the
        committed tokens decide; a replay takes the content pass's decision from the record."""
        reason = self.content.stop(self, row["token_index"], token, recorded)
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
        self.content.committed(self, c)
        decision = c.decision
        slm_s = self.spec.slm_ms_per_token / 1000.0 if self.policy.drafts else 0.0
        t_start, t_drafted = self.t, self.t + slm_s
        self.feed = []
        # fidelity_tv: a replay's from the record; else NaN until the verdict (llm-only: drawn from y)
        row = token_row(
            self.spec,
            self.index,
            uncertainty=decision.uncertainty,
            t_draft_start=t_start,
            fidelity_tv=0.0 if decision.llm_samples else c.fidelity_tv,
            fidelity_tv_branch=c.fidelity_tv_branch,
        )
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
            kept = (
                row
                if self.history
                else {k: row[k] for k in ("token_index", "uncertainty", "fidelity_tv", "fidelity_tv_branch")}
            )
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
            device=self.spec.device,
            session=SESSION,
            seq=self.seq,
            token_index=self.index,
            draft=c.draft,
            draft_prob=c.draft_prob,
            piggyback=[p[0] for p in self.piggyback],
            piggyback_probs=[p[1] for p in self.piggyback],
            payload=payload,
            llm_samples=decision.llm_samples,
        )
        row.update(
            transmitted=True,
            k=decision.k,
            prob_bits=decision.prob_bits if payload else 0,
            payload_bytes=len(payload),
            t_upload_sent=t_drafted,
        )
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
            device=self.spec.device,
            session=SESSION,
            seq=self.seq,
            token_index=self.index,
            piggyback=[p[0] for p in self.piggyback],
            piggyback_probs=[p[1] for p in self.piggyback],
        )
        return self._send(frame, self.t)

    def _send(self, frame: protocol.Upload | protocol.Flush, t_sent: float) -> Upload:
        """Send `frame` up at t_sent (agents.links: every rto_s its packets that did not get through)."""
        upload, self.waiting_bytes = self.links.send(frame, t_sent)
        self.waiting = upload
        self.seq += 1
        return upload

    # --- verdicts ------------------------------------------------------------------------
    def on_verdict(self, verdict: Verdict) -> None:
        """Apply the verdict on the waiting upload: it reaches the device over the downlink (agents.links,
        resending the upload while it is lost), the fidelity of the tokens it covers is measured, their
        betas go back to the content source, and the verified token (none after a final flush) commits."""
        upload = self.waiting
        if upload is None or verdict.frame.seq != upload.frame.seq:
            return  # a duplicate of a verdict already applied
        got = self.links.answer(self.spec, upload, verdict, self.waiting_bytes)
        self.waiting_bytes = got.wire_bytes
        self.events.extend(got.events)
        self._measure_fidelity(upload, verdict.stamp.llm_logits)
        if self.history:
            self.answered.append(Answered(upload.frame.piggyback, upload.final, verdict.frame))
        if upload.final:  # billed to the device's last token: a skipped one, or (a stop) a verified one,
            # whose own link counts stay in it: the flush's are added
            self.last_row.update(flush_bytes=self.waiting_bytes, flush_retransmissions=got.retransmissions)
            for k, n in got.columns.items():
                self.last_row[k] += n
        # the fidelity came with the verdict's logits, or (a replay) with each token's commit
        self._resolve_shadows(upload, verdict.frame, measured=verdict.stamp.llm_logits is not None)
        self.waiting = None
        if upload.final:
            self.flushed = True
        else:
            self._commit_verified(verdict.frame, got)

    def _resolve_shadows(self, upload: Upload, v: protocol.Verdict, measured: bool) -> None:
        """The shadow betas of the skipped tokens this upload piggybacked: into their rows, to the policy."""
        for (_, _, skipped, _), beta in zip(self.piggyback, v.shadow_betas):
            skipped.update(beta=beta, beta_is_shadow=True)
            self.content.observe(self, skipped["token_index"], skipped["uncertainty"], beta, True)
            self.events.append(
                ShadowResolved(
                    self.spec.device,
                    skipped["token_index"],
                    upload.frame.token_index,
                    beta,
                    skipped["fidelity_tv"] if measured else math.nan,
                    skipped["fidelity_tv_branch"] if measured else math.nan,
                )
            )
        self.piggyback = []

    def _commit_verified(self, v: protocol.Verdict, got: Answer) -> None:
        """Commit the token the verdict decided (the draft accepted, or the resampled one) when it arrives."""
        row = self.pending_row
        row.update(
            token_id=v.token,
            accepted=v.accepted,
            resampled=v.resampled,
            beta=v.beta,
            uplink_bytes=self.waiting_bytes,
            retransmissions=got.retransmissions,
            t_verdict=got.arrive,
            t_commit=got.arrive,
            **got.columns,
        )
        self.content.observe(self, row["token_index"], row["uncertainty"], v.beta, False)
        self._ends(row, v.token, self.pending_stop)
        self._keep(row)
        self.events.append(TokenCommitted(dict(row)))
        self.pending_row = None
        self.feed = [v.token]
        self.index += 1
        self.t = got.arrive

    def _keep(self, row: dict) -> None:
        self.last_row = row
        if self.history:
            self.rows.append(row)

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
        draft = self.held_draft
        self.held_draft = None
        if not self.held_bytes:  # nothing held (a replay holds nothing): nothing to free or measure
            return
        held = [p[3] for p in self.piggyback]
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
            y = softmax_t(llm_logits[n], T)
            self._set_fidelity(self.pending_row, *self._fidelity(got, y, upload.frame.payload))

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
        self.content.measured(self, row["token_index"], value, branch)


class DeviceGroupCore:
    """Many virtual devices sharing one SLM: one batched forward per step over every device
    ready to draft. Transport-free: callers deliver uploads and verdicts."""

    def __init__(
        self,
        specs: list[DeviceSpec],
        run: RunParams,
        slm,
        policies: dict[str, Policy],
        history: bool = True,
        content: ContentSource | None = None,
        links: type[Links | NoLinks] = Links,
    ):
        """The one-pass emulation by default: content from the models (slm, the policies) over each
        device's links. `content`, `links`: other pieces (content_pass, replay). history=False: rows()
        and session_states() stay empty (Device.history), the events are the only output."""
        self.run = run
        self.content = content if content is not None else ModelContent(slm, run.batch_slm)
        self.slm = self.content.slm  # agents.lm.BatchedLM (None when no device drafts, or in a replay)
        self.devices = {
            s.device: Device(s, run, policies[s.policy_name], self.content, links, history=history) for s in specs
        }
        # Devices a step may move (ready, or to flush) and devices that may hold events: a step and a
        # drain visit these, in device order, not the whole fleet (with 10,000 devices and a few
        # hundred moving per step, visiting all made the replay quadratic in devices).
        self._order = {device: i for i, device in enumerate(self.devices)}
        self._awake = set(self.devices)
        self._noisy = set(self.devices)
        self.timings = Timings()

    @classmethod
    def content_pass(
        cls, specs: list[DeviceSpec], run: RunParams, slm, policies: dict[str, Policy], history: bool = True
    ) -> DeviceGroupCore:
        """The virtual clock's content pass (agents.engine): the models' content, recorded (recorded()),
        over no links (its times mean nothing)."""
        return cls(specs, run, slm, policies, history, RecordingContent(slm, run.batch_slm), NoLinks)

    @classmethod
    def replay(
        cls,
        specs: list[DeviceSpec],
        run: RunParams,
        policies: dict[str, Policy],
        record: Mapping[int, Sequence[Drafted]],
        history: bool = True,
    ) -> DeviceGroupCore:
        """The virtual clock's timing replay: each device's content from `record` (a content pass's), over
        its links; no model runs, the policies are asked nothing and told nothing."""
        return cls(specs, run, None, policies, history, ReplayContent(record))

    def recorded(self) -> dict[int, list[Drafted]]:
        """The content recorded so far (content_pass), per device."""
        assert isinstance(self.content, RecordingContent), "only a content pass records its content"
        return self.content.record

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
        due = (lambda d: True) if until is None else (lambda d: d.t <= until)
        movable = self._in_order(self._awake)  # every device that is ready or must flush is in _awake
        self._noisy.update(self._awake)
        ready = [d for d in movable if d.ready and due(d)]
        uploads = self.content.produce(ready, self.timings)
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
        return [
            Open(
                protocol.Open(
                    device=d.spec.device,
                    session=SESSION,
                    seq=0,
                    prompt=d.spec.prompt_ids,
                    seed=run.seed,
                    temperature=run.temperature,
                    tier=d.spec.tier,
                    policy=d.spec.policy_name,
                ),
                OpenStamp(run.max_new_tokens, d.lookahead_s),
            )
            for d in self.devices.values()
        ]

    def session_states(self) -> list[SessionState]:
        """Every device's session as committed here: what a restarted verifier re-opens and
        re-prefills (VerifierCore.restore). An upload still waiting is not in it: it is resent."""
        return [SessionState(o, tuple(d.answered)) for o, d in zip(self.opens(), self.devices.values())]

    def unanswered(self) -> list[Upload]:
        """Uploads waiting for their verdict (resent to a restarted verifier)."""
        return [d.waiting for d in self.devices.values() if d.waiting is not None]

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
