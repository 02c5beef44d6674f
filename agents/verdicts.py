"""Where a verifier's verdicts come from (docs/design.md section 2, the two-pass virtual clock): the LLM
(`LLMVerdicts`), the LLM with every frame logged for a replay (`RecordingVerdicts`, the content pass),
or such a log (`ReplayVerdicts`, the timing replay). agents.verifier.VerifierCore composes one with a
batching rule.

From the LLM, a verdict is its forward over the request's context (the last committed token, the
piggybacked drafts, the draft), speculative verification (agents.speculative, docs/design.md section 1,
step 7) and the measured betas. The forward runs many sessions at once only where it is batch invariant
(agents.lm): else a verdict would depend on which requests shared its forward, and the content pass
(every queued request in one forward) would differ from a one-pass run. A model on another forward gets
one sequence per forward, as RunParams.batch_slm does for the SLM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from agents import protocol
from agents.content import batch_invariant
from agents.speculative import reconstruct, rejection_prob, sample_draft, softmax_t, verify
from agents.timing import Timings
from agents.wire import Upload
from policies.rng import keyed_rng

if TYPE_CHECKING:
    from agents.verifier import Session

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


def in_arrival_order(queue: list) -> list:
    """Queue entries in (arrival, device, seq) order."""
    return sorted(queue, key=lambda q: q[:3])


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
            raise protocol.ProtocolError(
                f"device {f.device}: {len(f.piggyback)} piggybacked tokens take "
                f"the context to {context}, over the model's {positions} positions",
                protocol.ErrorCode.LIMIT,
            )
        return payload

    def of_flush(self, s: Session, f: protocol.Upload | protocol.Flush) -> tuple[protocol.Verdict, np.ndarray | None]:
        """The verdict on a final flush (the shadow betas of its piggyback) and the LLM's logits at those
        positions; a flush with no piggyback (a sequence that stopped at a verified token) runs no forward."""
        logits = None
        if f.piggyback:
            with self.timings("llm.verify_forward", len(s.feed) + len(f.piggyback)):
                logits = self.llm.extend([(f.device, s.feed + list(f.piggyback))], all_positions=True)[0]
        frame = protocol.Verdict(
            device=f.device,
            session=f.session,
            seq=f.seq,
            token_index=f.token_index,
            token=protocol.NO_TOKEN,
            shadow_betas=self._shadow_betas(s, f, logits),
        )
        return frame, logits

    def of_batch(
        self, requests: list[tuple[Upload, object]], sessions: dict[int, Session], queue: list
    ) -> tuple[list[protocol.Verdict], list[np.ndarray | None]]:
        """The verdicts on one batch, and the LLM logits each carries for the device's fidelity: the rows
        of its piggybacked tokens, then the verified draft's (none for a token the LLM sampled). The
        forward is shared with the rest of the `queue` (compute)."""
        batch = [u.frame for u, _ in requests]
        self.compute([u for u, _ in requests], [q[3] for q in in_arrival_order(queue)], sessions)
        logits = [self.computed.pop((f.device, f.seq)) for f in batch]
        with self.timings("verify_math", len(batch)):
            frames = [
                self._verdict(sessions[f.device], f, payload, z) for f, (_, payload), z in zip(batch, requests, logits)
            ]
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
        todo: list[protocol.Upload | protocol.Flush] = []
        rows = 0
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
        return protocol.Verdict(
            device=f.device,
            session=f.session,
            seq=f.seq,
            token_index=f.token_index,
            token=int(token),
            accepted=bool(accepted),
            resampled=not accepted and not f.llm_samples,
            beta=beta,
            shadow_betas=shadows,
        )

    @staticmethod
    def _shadow_betas(s: Session, f: protocol.Upload | protocol.Flush, z: np.ndarray | None) -> list[float]:
        """beta for each piggybacked (skipped) draft: the rejection probability the LLM would have had,
        measured though the token was never verified."""
        if not f.piggyback:
            return []
        assert z is not None, "piggybacked tokens come with their logits"
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

    def of_flush(self, s: Session, f: protocol.Upload | protocol.Flush) -> tuple[protocol.Verdict, np.ndarray | None]:
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
    frame; agents.record.PackedVerdicts or a dict). No LLM runs and no payload is decoded (the
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

    def of_flush(self, s: Session, f: protocol.Upload | protocol.Flush) -> tuple[protocol.Verdict, None]:
        return self.log[(f.device, f.seq)], None

    def of_batch(
        self, requests: list[tuple[Upload, object]], sessions: dict[int, Session], queue: list
    ) -> tuple[list[protocol.Verdict], list[None]]:
        return [self.log[(u.frame.device, u.frame.seq)] for u, _ in requests], [None] * len(requests)

    def restored(self, device: int, seq: int, frame: protocol.Verdict) -> None:
        pass
