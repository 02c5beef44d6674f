"""Hostile clients against a live Verifier (docs/design.md section 9, issue 11): whatever a client
sends can only ever produce an ERROR reply and a count, never a crash, a hang or a takeover
of another client's session. Every test talks ZeroMQ to a real Verifier on loopback (run it
under shared/bin/offline) with a tiny LLM; a legitimate session then runs to completion with
exactly the verdicts it gets when nobody else is there.
"""

from __future__ import annotations

import dataclasses
import math
import random
import struct
import threading
import time

import pytest
import zmq

from agents import codec, protocol, wire
from agents.actors import ClockParams, Verifier, memory
from agents.protocol import ErrorCode
from agents.verifier import ServerProfile

PROMPT = [3, 4, 5, 6]
STEPS = 5  # uploads of a legitimate session, then a final flush
REPLY_S = 20.0


@pytest.fixture(scope="module")
def lm():
    from agents.lm import BatchedLM
    from agents.models import load_model, parse_spec

    return BatchedLM(load_model(parse_spec("tiny:llm")))


@pytest.fixture
def serve(lm):
    """serve(**limits) -> a started Verifier on the shared tiny LLM (stopped, caches dropped after)."""
    made = []

    def make(**kw) -> Verifier:
        v = Verifier(None, ServerProfile(), 7, lm.vocab_size, ClockParams(), lm=lm, **kw)
        v.endpoint = v.start()
        made.append(v)
        return v

    yield make
    for v in made:
        v.stop()
    for sid in lm.sessions():
        lm.drop(sid)


class Client:
    """A DEALER with a chosen identity; replies come back as (decoded frame, raw parts)."""

    def __init__(self, endpoint: str, identity: bytes):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)

    def send(self, parts) -> None:
        self.sock.send_multipart(parts)

    def reply(self, timeout_s: float = REPLY_S):
        assert self.sock.poll(int(timeout_s * 1000)), "no reply"
        parts = self.sock.recv_multipart()
        return protocol.decode_frame(parts[0]), parts

    def error(self, code: ErrorCode | None = None, match: str = "") -> protocol.Error:
        msg, _ = self.reply()
        assert isinstance(msg, protocol.Error), f"expected an ERROR reply, got {msg}"
        assert code is None or msg.code == code, f"expected {code!r}, got {ErrorCode(msg.code)!r}: {msg.message}"
        assert match in msg.message, msg.message
        return msg

    def silent(self, seconds: float = 0.3) -> bool:
        return not self.sock.poll(int(seconds * 1000))

    def close(self) -> None:
        self.sock.close()


def payload(lm) -> bytes:
    return codec.encode_payload([1, 2, 3], [0.5, 0.25, 0.125], lm.vocab_size)


def step_upload(
    lm, device: int, step: int, t_sent: float | None = None, t_arrive: float | None = None, **frame
) -> wire.Upload:
    """Step `step` of a legitimate session: odd steps piggyback one skipped token; arrivals 1 s apart.
    `frame`: UPLOAD fields to change."""
    piggyback = [10 + step] if step % 2 else []
    fields = dict(
        device=device,
        session=wire.SESSION,
        seq=step,
        token_index=step + (step + 1) // 2,
        draft=1 + step % 3,
        draft_prob=[0.5, 0.25, 0.125][step % 3],
        piggyback=piggyback,
        piggyback_probs=[0.3] * len(piggyback),
        payload=payload(lm),
    )
    stamp = wire.UploadStamp(float(step) if t_sent is None else t_sent, step + 0.01 if t_arrive is None else t_arrive)
    return wire.Upload(protocol.Upload(**{**fields, **frame}), stamp)


def flush_upload(lm, device: int, seq: int = STEPS, token_index: int = STEPS * 2) -> wire.Upload:
    frame = protocol.Flush(
        device=device,
        session=wire.SESSION,
        seq=seq,
        token_index=token_index,
        piggyback=[20, 21],
        piggyback_probs=[0.4, 0.2],
    )
    return wire.Upload(frame, wire.UploadStamp(float(STEPS), STEPS + 0.01))


def open_msg(device: int, prompt=PROMPT, max_new: int = 100, lookahead: float = 0.01) -> wire.Open:
    frame = protocol.Open(device=device, session=wire.SESSION, seq=0, prompt=list(prompt), seed=0, temperature=1.0)
    return wire.Open(frame, wire.OpenStamp(max_new, lookahead))


def open_parts(
    device: int, prompt=PROMPT, max_new: int = 100, lookahead: float = 0.01, stamp: bytes | None = None
) -> list[bytes]:
    """An OPEN's parts; `stamp`: raw stamp bytes instead of the OpenStamp's."""
    frame, packed = wire.encode(open_msg(device, prompt, max_new, lookahead))
    return [frame, packed if stamp is None else stamp]


def run_session(
    client: Client, lm, devices, steps=range(STEPS), opened: bool = False, flush: bool = True, pause_s: float = 0.0
):
    """Drive `devices` in lockstep through `steps` and a final flush; every reply's raw parts, in order."""
    if not opened:
        for d in devices:
            client.send(open_parts(d))
    out = []
    for step in list(steps) + (["flush"] if flush else []):
        for d in devices:
            client.send(wire.encode(flush_upload(lm, d) if step == "flush" else step_upload(lm, d, step)))
        got = {}
        for _ in devices:
            msg, parts = client.reply()
            assert isinstance(msg, protocol.Verdict), f"step {step}: {msg}"
            got[msg.device] = parts
        out.extend(got[d] for d in devices)
        time.sleep(pause_s)
    return out


def baseline(serve, lm, devices=(7,)) -> list:
    """The verdicts of a session with nobody else on the verifier."""
    v = serve()
    c = Client(v.endpoint, b"baseline")
    try:
        return run_session(c, lm, list(devices))
    finally:
        c.close()
        v.stop()
        for sid in lm.sessions():
            lm.drop(sid)


def assert_serving(v: Verifier, errors: int | None = None) -> None:
    assert v.thread.is_alive() and v.failure is None, v.failure
    if errors is not None:
        assert v.errors == errors, v.error_log


def wait_for(cond, timeout_s: float = 10.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout_s, "condition not reached"
        time.sleep(0.01)


# --- OPEN: every bad one is refused alone, nothing half-opened ----------------------------------

BAD_OPENS = {
    "empty prompt": (dict(prompt=[]), ErrorCode.BAD_BODY, "empty prompt"),
    "id == |V|": (dict(prompt=[1, "V"]), ErrorCode.BAD_BODY, "token ids"),
    "prompt over positions": (dict(prompt="P+1"), ErrorCode.LIMIT, "tokens"),
    "max_new zero": (dict(max_new=0), ErrorCode.BAD_BODY, "max_new_tokens"),
    "stamp short": (dict(stamp=struct.pack("<Id", 100, 0.01)[:-1]), ErrorCode.BAD_FRAME, "stamp: 11 bytes"),
    "stamp long": (dict(stamp=struct.pack("<Id", 100, 0.01) + b"\0"), ErrorCode.BAD_FRAME, "stamp: 13 bytes"),
    "an upload's stamp": (dict(stamp=struct.pack("<ddI", 0.01, 100.0, 0)), ErrorCode.BAD_FRAME, "stamp: 20 bytes"),
    "lookahead nan": (dict(lookahead=math.nan), ErrorCode.BAD_BODY, "lookahead"),
    "lookahead negative": (dict(lookahead=-1.0), ErrorCode.BAD_BODY, "lookahead"),
    "lookahead -inf": (dict(lookahead=-math.inf), ErrorCode.BAD_BODY, "lookahead"),
}


@pytest.mark.parametrize("case", list(BAD_OPENS))
def test_a_bad_open_is_refused_and_the_device_can_then_open_properly(serve, lm, case):
    kw, code, match = BAD_OPENS[case]
    if kw.get("prompt") == [1, "V"]:
        kw = {**kw, "prompt": [1, lm.vocab_size]}
    if kw.get("prompt") == "P+1":
        kw = {**kw, "prompt": [1] * (lm.max_positions + 1)}
    want = baseline(serve, lm)
    v = serve()
    c = Client(v.endpoint, b"dev")
    try:
        c.send(open_parts(7, **kw))
        c.error(code, match)
        assert_serving(v, errors=1)
        assert v.error_codes[code] == 1 and 7 not in v.admission.owners and 7 not in v.core.sessions
        assert run_session(c, lm, [7]) == want  # the refused OPEN left nothing behind
        assert_serving(v, errors=1)
    finally:
        c.close()


def test_infinite_lookahead_is_a_legitimate_open(serve, lm):
    """slm-only devices never ask the LLM and advertise lookahead +inf: accepted, holds nothing back."""
    want = baseline(serve, lm)
    v = serve()
    c = Client(v.endpoint, b"dev")
    try:
        c.send(open_parts(8, lookahead=math.inf))
        assert run_session(c, lm, [7]) == want
        assert_serving(v, errors=0)
        assert v.admission.owners == {8: b"dev", 7: b"dev"}
    finally:
        c.close()


def test_a_second_open_is_refused_whoever_sends_it(serve, lm):
    want = baseline(serve, lm)
    v = serve()
    a, b = Client(v.endpoint, b"A"), Client(v.endpoint, b"B")
    try:
        a.send(open_parts(7))
        a.send(open_parts(7))
        a.error(ErrorCode.REFUSED, "already open")
        b.send(open_parts(7, prompt=[9, 9]))
        b.error(ErrorCode.REFUSED, "already open")
        assert v.admission.owners[7] == b"A"
        assert run_session(a, lm, [7], opened=True) == want
        assert_serving(v, errors=2)
        assert b.silent()
    finally:
        a.close()
        b.close()


# --- stamps -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stamp",
    [
        dict(t_arrive=math.nan),
        dict(t_arrive=math.inf),
        dict(t_arrive=-1.0),
        dict(t_sent=math.nan),
        dict(t_sent=-math.inf),
        dict(t_sent=-0.5),
    ],
)
def test_upload_stamps_must_be_finite_non_negative_times(serve, lm, stamp):
    want = baseline(serve, lm)
    v = serve()
    c = Client(v.endpoint, b"dev")
    try:
        c.send(open_parts(7))
        c.send(wire.encode(step_upload(lm, 7, 0, **stamp)))
        c.error(ErrorCode.BAD_BODY, "stamp")
        # The refused upload consumed no sequence number: seq 0 is still the next one.
        assert run_session(c, lm, [7], opened=True) == want
        assert_serving(v, errors=1)
    finally:
        c.close()


# --- ownership ----------------------------------------------------------------------------------


def test_a_session_belongs_to_the_identity_that_opened_it(serve, lm):
    want = baseline(serve, lm)
    v = serve()
    a, b = Client(v.endpoint, b"A"), Client(v.endpoint, b"B")
    try:
        a.send(open_parts(7))
        # B forges A's next upload (seq 0, another draft), a flush that would close A's session,
        # and the seq after: all refused, and none of it reaches A or A's session.
        b.send(wire.encode(step_upload(lm, 7, 0, draft=3, draft_prob=0.125)))
        b.error(ErrorCode.UNKNOWN_SESSION, "no session of this client")
        b.send(wire.encode(flush_upload(lm, 7)))
        b.error(ErrorCode.UNKNOWN_SESSION)
        b.send(wire.encode(step_upload(lm, 7, 1)))
        b.error(ErrorCode.UNKNOWN_SESSION)
        assert a.silent()
        got = run_session(a, lm, [7], steps=range(1), opened=True, flush=False)  # step 0 only
        # A retransmission of A's seq 0 from B would fetch A's verdict: refused too.
        b.send(wire.encode(step_upload(lm, 7, 0)))
        b.error(ErrorCode.UNKNOWN_SESSION)
        assert got == want[:1]
    finally:
        a.close()
        b.close()


def test_forgeries_leave_the_owners_trace_untouched(serve, lm):
    want = baseline(serve, lm)
    v = serve()
    a, b = Client(v.endpoint, b"A"), Client(v.endpoint, b"B")
    try:
        a.send(open_parts(7))
        for seq in range(STEPS + 1):  # every sequence number A will use, before A uses it
            b.send(wire.encode(step_upload(lm, 7, seq, draft=2, draft_prob=0.25)))
        for _ in range(STEPS + 1):
            b.error(ErrorCode.UNKNOWN_SESSION)
        assert run_session(a, lm, [7], opened=True) == want
        assert_serving(v, errors=STEPS + 1)
    finally:
        a.close()
        b.close()


# --- limits -------------------------------------------------------------------------------------


def test_sessions_per_identity_and_in_total_are_bounded(serve, lm):
    v = serve(max_sessions=3, max_sessions_per_identity=2)
    a, b, c = (Client(v.endpoint, i) for i in (b"A", b"B", b"C"))
    try:
        for d in (1, 2, 3):
            a.send(open_parts(d))
        a.error(ErrorCode.LIMIT, "this client holds its limit of 2")
        b.send(open_parts(3))
        wait_for(lambda: 3 in v.admission.owners)  # B's and C's connections are not ordered with each other
        c.send(open_parts(4))
        c.error(ErrorCode.LIMIT, "limit of 3 sessions")
        assert (v.admission.owners[1], v.admission.owners[2], v.admission.owners[3]) == (
            b"A",
            b"A",
            b"B",
        ) and 4 not in v.admission.owners
        assert_serving(v, errors=2)
    finally:
        for x in (a, b, c):
            x.close()


def test_expected_sessions_caps_the_total(serve, lm):
    v = serve(expected_sessions=2)
    a, h = Client(v.endpoint, b"A"), Client(v.endpoint, b"H")
    try:
        a.send(open_parts(1))
        a.send(open_parts(2))
        wait_for(lambda: len(v.admission.owners) == 2)
        h.send(open_parts(99))
        h.error(ErrorCode.LIMIT)
        assert_serving(v, errors=1)
    finally:
        a.close()
        h.close()


def test_prompt_length_and_prefill_tokens_per_identity_are_bounded(serve, lm):
    v = serve(max_prompt_tokens=8, max_prefill_tokens_per_identity=10)
    a, b = Client(v.endpoint, b"A"), Client(v.endpoint, b"B")
    try:
        a.send(open_parts(1, prompt=[5] * 9))
        a.error(ErrorCode.LIMIT, "prompt of 9 tokens")
        a.send(open_parts(2, prompt=[5] * 6))
        a.send(open_parts(3, prompt=[5] * 6))
        a.error(ErrorCode.LIMIT, "would total 12 tokens")
        b.send(open_parts(3, prompt=[5] * 6))  # another client's budget is its own
        wait_for(lambda: v.admission.identity_prefill == {b"A": 6, b"B": 6})
        assert v.admission.owners == {2: b"A", 3: b"B"}
        assert_serving(v, errors=2)
    finally:
        a.close()
        b.close()


# --- headers at their maxima --------------------------------------------------------------------


def test_error_replies_stay_encodable_whatever_the_header_held():
    top = 0xFFFFFFFF
    for device, session, seq in [(top, top, top), (0, 0, top), (-5, 2**40, -1), (None, None, None)]:
        exc = protocol.ProtocolError("bad", ErrorCode.BAD_VERSION, device=device, session=session, seq=seq)
        reply = protocol.decode_frame(protocol.encode_frame(protocol.error_reply(exc)))
        assert reply.code == ErrorCode.BAD_VERSION
        assert reply.bad_seq == (-1 if seq in (top, -1, None) else seq)
        assert reply.seq == (top if seq == top else 0)
        assert reply.device == (device if device in (0, top) else 0)
        assert len(wire.error_message(exc)) == 2


def test_a_frame_with_every_header_field_at_its_maximum_is_answered(serve, lm):
    """One 40-byte frame used to kill the verifier: its error reply could not be encoded."""
    v = serve()
    c = Client(v.endpoint, b"dev")
    top = 0xFFFFFFFF
    try:
        header = struct.Struct("<2sBBIIII")
        frames = [
            header.pack(b"HT", 9, 2, top, top, top, 20) + bytes(20),  # bad version
            header.pack(b"HT", 1, 255, top, top, top, 20) + bytes(20),  # bad type
            header.pack(b"HT", 1, 2, top, top, top, top) + bytes(20),
        ]  # body_len at its maximum
        for frame in frames:
            c.send([frame, bytes(20)])
            err = c.error()
            assert (err.device, err.seq, err.bad_seq) == (top, top, -1)
        # Well-formed uploads with seq 0xFFFFFFFF: for a stranger's device and for its own.
        c.send(wire.encode(step_upload(lm, top, 0, seq=top)))
        c.error(ErrorCode.UNKNOWN_SESSION)
        c.send(open_parts(7))
        c.send(wire.encode(step_upload(lm, 7, 0, seq=top)))
        assert c.error(ErrorCode.OUT_OF_ORDER).bad_seq == -1
        assert_serving(v, errors=len(frames) + 2)
        assert len(run_session(c, lm, [7], opened=True)) == STEPS + 1
    finally:
        c.close()


# --- piggybacks beyond the model's positions ----------------------------------------------------


def test_a_piggyback_beyond_the_models_positions_is_refused_alone(serve, lm):
    P = lm.max_positions
    v = serve()
    c = Client(v.endpoint, b"dev")
    try:
        c.send(open_parts(7, prompt=[1, 2, 3], max_new=2 * P, lookahead=0.5))  # context: 2 cached + 1 fed
        c.send(open_parts(8, max_new=1))  # done after one verdict: holds no later batch back

        def long(n: int, seq: int = 0, t: float = 0.01) -> wire.Upload:
            return step_upload(
                lm, 7, 0, seq=seq, token_index=n, piggyback=[5] * n, piggyback_probs=[0.5] * n, t_arrive=t
            )

        # One token too many, queued next to device 8's request: refused alone, 8 is verified.
        c.send(wire.encode(long(P - 2)))
        c.send(wire.encode(step_upload(lm, 8, 0)))
        c.error(ErrorCode.LIMIT, "positions")
        msg, _ = c.reply()
        assert isinstance(msg, protocol.Verdict) and msg.device == 8
        # Exactly the model's positions: verified.
        c.send(wire.encode(long(P - 3, t=1.0)))
        msg, _ = c.reply()
        assert isinstance(msg, protocol.Verdict) and (msg.device, msg.seq) == (7, 0)
        # The full context cannot take a flush's piggyback either (that forward runs in submit).
        c.send(wire.encode(flush_upload(lm, 7, seq=1, token_index=P)))
        c.error(ErrorCode.LIMIT, "positions")
        assert_serving(v, errors=2)
    finally:
        c.close()


# --- devices outside the run --------------------------------------------------------------------


@pytest.mark.parametrize("limits", [dict(allowed_devices={7, 8}), dict(expected_sessions=2)])
def test_an_open_outside_the_run_cannot_hold_batches_back(serve, lm, limits):
    """An idle session of an unknown device used to freeze the virtual clock's batch release."""
    want = baseline(serve, lm, devices=(7, 8))
    v = serve(**limits)
    a, h = Client(v.endpoint, b"A"), Client(v.endpoint, b"H")
    try:
        a.send(open_parts(7))
        a.send(open_parts(8))
        wait_for(lambda: len(v.admission.owners) == 2)
        h.send(open_parts(99, lookahead=0.0))  # would hold every batch back forever
        h.error(ErrorCode.REFUSED if "allowed_devices" in limits else ErrorCode.LIMIT)
        assert run_session(a, lm, [7, 8], opened=True) == want
        assert_serving(v, errors=1)
    finally:
        a.close()
        h.close()


# --- message shape and floods -------------------------------------------------------------------


def test_messages_of_too_many_parts_are_refused_unread(serve, lm):
    v = serve()
    c = Client(v.endpoint, b"dev")
    try:
        c.send([b"x" * 1024] * 1000)
        c.error(ErrorCode.BAD_FRAME, "message of 1000 parts")
        c.send(open_parts(7) + [b""])  # a valid OPEN with one part too many: not decoded, not opened
        c.error(ErrorCode.BAD_FRAME, "3 parts")
        assert 7 not in v.admission.owners
        c.send(open_parts(7)[:1])
        c.error(ErrorCode.BAD_FRAME, "got 1 parts")
        assert_serving(v, errors=3)
        assert v.sock.getsockopt(zmq.RCVHWM) == Verifier.RCVHWM
        assert len(run_session(c, lm, [7])) == STEPS + 1
    finally:
        c.close()


def test_a_flood_of_errors_keeps_memory_and_the_log_bounded(serve, lm):
    v = serve()
    flood = Client(v.endpoint, b"flood")
    n = Verifier.MAX_ERROR_LOG + 300
    try:
        for i in range(n):
            flood.send([b"junk %d " % i + bytes(2000), b"x"])
            if i % 200 == 199:  # read the replies so the ROUTER never has to drop them
                for _ in range(200):
                    flood.error(ErrorCode.BAD_FRAME)
        for _ in range(n % 200):
            flood.error(ErrorCode.BAD_FRAME)
        assert_serving(v, errors=n)
        assert len(v.error_log) <= Verifier.MAX_ERROR_LOG
    finally:
        flood.close()


# --- exceptions: client input is answered, an LLM failure ends the run --------------------------


def test_a_bug_while_checking_one_message_is_answered_not_fatal(serve, lm, monkeypatch):
    real_decode, real_check = wire.decode, protocol.check_upload

    def decode(parts):
        if parts and parts[0].startswith(b"BOOM"):
            raise RuntimeError("decoder bug")
        return real_decode(parts)

    def check(frame, vocab_size):
        if getattr(frame, "draft", None) == vocab_size - 1:  # no legitimate step drafts it (a FLUSH has no draft)
            raise TypeError("checker bug")
        return real_check(frame, vocab_size)

    monkeypatch.setattr(wire, "decode", decode)
    monkeypatch.setattr(protocol, "check_upload", check)
    want = baseline(serve, lm)
    v = serve()
    c = Client(v.endpoint, b"dev")
    try:
        c.send([b"BOOM", b""])
        c.error(ErrorCode.INTERNAL, "decoder bug")
        c.send(open_parts(7))
        c.send(wire.encode(step_upload(lm, 7, 0, draft=lm.vocab_size - 1)))
        c.error(ErrorCode.INTERNAL, "checker bug")
        assert_serving(v, errors=2)
        assert run_session(c, lm, [7], opened=True) == want  # the bad upload consumed no seq
    finally:
        c.close()


def test_a_failing_llm_forward_still_ends_the_run(serve, lm, monkeypatch):
    v = serve()
    c = Client(v.endpoint, b"dev")
    real = lm.extend

    def extend(items, all_positions=False, **kw):
        if all_positions:
            raise RuntimeError("forward broke")
        return real(items, all_positions=all_positions, **kw)

    monkeypatch.setattr(lm, "extend", extend)
    try:
        c.send(open_parts(7))
        c.send(wire.encode(step_upload(lm, 7, 0)))
        wait_for(lambda: v.failure is not None)
        assert "RuntimeError: forward broke" in v.failure and v.errors == 0
    finally:
        c.close()


# --- fuzzing ------------------------------------------------------------------------------------

FUZZ_MIN, FUZZ_MAX = 1000, 20000  # messages: at least, and at most while the session runs
FUZZ_SECONDS = 30.0
_HEADER = struct.Struct("<2sBBIIII")
_FLOATS = [0.0, 0.01, 1.0, 1e9, -1.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, 1e308]


def _fuzz_message(rng: random.Random, V: int, lm) -> list[bytes]:
    """A random or mutated message: valid frames of every type for the legitimate device and
    others (so forgeries are in the mix), bit flips, truncation, header fields at their maxima,
    random bytes, wrong stamps, wrong part counts."""
    top = 0xFFFFFFFF
    device = rng.choice([7, 7, 7, 0, 1, 99, top])
    seq = rng.choice([0, 1, 2, 3, 4, 5, top, rng.randrange(2**32)])
    kind = rng.randrange(7)
    if kind == 0:
        prompt = [rng.randrange(V + 3) for _ in range(rng.choice([0, 1, 3, 50]))]
        prompt = [min(t, top - 1) for t in prompt]
        frame = protocol.encode_frame(
            protocol.Open(
                device=device,
                session=1,
                seq=seq,
                prompt=prompt,
                seed=rng.randrange(2**64),
                temperature=rng.choice([0.0, 1.0, 7.5]),
            )
        )
    elif kind in (1, 2):
        u = step_upload(lm, device, rng.randrange(STEPS), seq=seq, draft=rng.choice([1, 2, 3, V - 1]))
        if rng.random() < 0.3:
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
            u = wire.Upload(dataclasses.replace(u.frame, payload=junk), u.stamp)
        try:
            frame = wire.encode(u)[0]
        except protocol.ProtocolError:
            frame = b"HT"
    elif kind == 3:
        frame = wire.encode(flush_upload(lm, device, seq=seq))[0]
    elif kind == 4:
        frame = protocol.encode_frame(
            rng.choice(
                [
                    protocol.Verdict(
                        device=device, session=1, seq=seq, token_index=3, token=1, accepted=True, beta=0.5
                    ),
                    protocol.Error(device=device, session=1, seq=seq, code=ErrorCode.BAD_FRAME, message="hi"),
                ]
            )
        )
    elif kind == 5:
        frame = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 19, 20, 40, 300])))
    else:
        frame = _HEADER.pack(
            b"HT",
            rng.choice([1, 1, 0, 255]),
            rng.choice([1, 2, 3, 4, 5, 6, 0, 255]),
            top,
            top,
            top,
            rng.choice([0, 20, top]),
        ) + bytes(rng.randrange(64))
    buf = bytearray(frame)
    mutation = rng.randrange(6)
    if mutation == 1 and buf:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif mutation == 2 and buf:
        del buf[rng.randrange(len(buf)) :]
    elif mutation == 3:
        buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif mutation == 4 and len(buf) >= 20:
        field = rng.choice([4, 8, 12, 16])  # device, session, seq or body_len at its maximum
        buf[field : field + 4] = b"\xff\xff\xff\xff"
    elif mutation == 5 and rng.random() < 0.2:
        buf += bytes(64 << 10)  # a large frame
    stamp = rng.choice(
        [
            struct.pack("<ddI", rng.choice(_FLOATS), rng.choice(_FLOATS), rng.randrange(2**32)),  # UPLOAD's
            struct.pack("<Id", rng.randrange(2**32), rng.choice(_FLOATS)),  # OPEN's
            struct.pack("<d", rng.choice(_FLOATS)),
        ]
    )  # VERDICT's
    if rng.random() < 0.1:
        stamp = stamp[: rng.randrange(len(stamp))]
    parts = [bytes(buf), stamp]
    shape = rng.random()
    if shape < 0.05:
        parts = parts[:1]
    elif shape < 0.10:
        parts = parts + [b""] * rng.choice([1, 2, 50])
    return parts


def _fuzz(endpoint: str, V: int, lm, seed: int, stop: threading.Event, report: dict) -> None:
    rng = random.Random(seed)
    socks = []
    for i in range(3):
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, b"fuzz-%d" % i)
        s.connect(endpoint)
        socks.append(s)
    sent = replies = 0
    bad_replies = []
    t0 = time.time()

    def drain(wait_ms: int = 0) -> None:
        nonlocal replies
        for s in socks:
            while s.poll(wait_ms):
                parts = s.recv_multipart()
                replies += 1
                try:
                    msg = protocol.decode_frame(parts[0])
                    if not isinstance(msg, protocol.Error):
                        bad_replies.append(msg)
                except protocol.ProtocolError as exc:
                    bad_replies.append(exc)

    try:
        while sent < FUZZ_MAX and time.time() - t0 < FUZZ_SECONDS and (sent < FUZZ_MIN or not stop.is_set()):
            rng.choice(socks).send_multipart(_fuzz_message(rng, V, lm))
            sent += 1
            report["sent"] = sent
            if sent % 50 == 0:
                drain()
        report["outlasted_session"] = stop.is_set()
        deadline = time.time() + 20
        while replies < sent and time.time() < deadline:
            drain(50)
    finally:
        for s in socks:
            s.close()
        report.update(replies=replies, bad_replies=bad_replies)


def test_fuzzing_clients_cannot_disturb_a_legitimate_session(serve, lm):
    limits = dict(allowed_devices={7}, expected_sessions=1)
    v0 = serve(**limits)
    c0 = Client(v0.endpoint, b"legit")
    want = run_session(c0, lm, [7])
    c0.close()
    v0.stop()
    for sid in lm.sessions():
        lm.drop(sid)

    v = serve(**limits)
    c = Client(v.endpoint, b"legit")
    stop, report = threading.Event(), {}
    sampling, peak = threading.Event(), {}

    def sample() -> None:  # the verifier runs in this process: its resident memory, every 20 ms
        while not sampling.is_set():
            peak["rss_anon"] = max(peak.get("rss_anon", 0), memory().get("rss_anon_bytes", 0))
            time.sleep(0.02)

    try:
        got = run_session(c, lm, [7], steps=range(1), flush=False)  # the session is open and verified once ...
        before = memory()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        fuzzer = threading.Thread(target=_fuzz, args=(v.endpoint, lm.vocab_size, lm, 11, stop, report))
        fuzzer.start()  # ... then the fuzzers join in
        wait_for(lambda: report.get("sent", 0) >= 50)
        got += run_session(c, lm, [7], steps=range(1, STEPS), opened=True, pause_s=0.1)
        stop.set()
        fuzzer.join(timeout=FUZZ_SECONDS + 30)
        assert not fuzzer.is_alive()
        sampling.set()
        sampler.join()
        after = memory()
    finally:
        stop.set()
        sampling.set()
        c.close()
    growth = peak["rss_anon"] - before["rss_anon_bytes"]
    codes = {ErrorCode(code).name: n for code, n in sorted(v.error_codes.items())}
    print(
        f"\nfuzzing: {report['sent']} messages sent by 3 clients during the legitimate session, "
        f"{report['replies']} ERROR replies, {v.errors} counted {codes}; verifier memory (RssAnon) "
        f"{before['rss_anon_bytes'] / 2**20:.1f} MiB before, peak +{growth / 2**20:.1f} MiB, "
        f"{(after['rss_anon_bytes'] - before['rss_anon_bytes']) / 2**20:+.1f} MiB after; process peak RSS "
        f"{before['peak_rss_bytes'] / 2**20:.1f} -> {after['peak_rss_bytes'] / 2**20:.1f} MiB; "
        f"legitimate verdicts identical to the run without the fuzzer: {got == want} ({len(got)} verdicts)"
    )
    # The legitimate session, run beside the fuzzer, gets the very verdicts (every byte of every part:
    # token, acceptance, beta, shadow betas, emulated send time) of the same session without it.
    assert len(got) == len(want) == STEPS + 1 and got == want
    assert growth < 256 << 20, f"the verifier's memory grew by {growth / 2**20:.0f} MiB under the fuzz"
    assert_serving(v)
    assert report["outlasted_session"] and report["sent"] >= FUZZ_MIN  # the fuzz ran all along the session
    assert not report["bad_replies"]  # every reply was an ERROR frame that decodes
    # Every fuzz message was refused with exactly one reply and one count.
    assert report["replies"] == report["sent"] == v.errors, (report["sent"], report["replies"], v.errors)


# --- hypothesis: generated and mutated messages, each answered by exactly one ERROR ---------------


def _hypothesis_message(data, V: int, lm) -> list[bytes]:
    """A message drawn by hypothesis: an OPEN, UPLOAD or FLUSH with generated fields (or raw bytes),
    then a mutation (bit flips, truncation, appended bytes, a header field at its maximum), a
    generated stamp and a generated part count. Every one is hostile to a verifier whose only
    allowed device (7) is already open by another identity."""
    from hypothesis import strategies as st

    u32 = st.integers(0, 0xFFFFFFFF)
    tokens = st.lists(st.integers(0, V + 4), max_size=24)
    kind = data.draw(st.sampled_from(["open", "upload", "flush", "raw"]))
    device = data.draw(st.sampled_from([7, 7, 0, 99, 0xFFFFFFFF]) | u32)
    seq = data.draw(st.integers(0, STEPS + 1) | u32)
    try:
        if kind == "open":
            frame = protocol.encode_frame(
                protocol.Open(
                    device=device,
                    session=wire.SESSION,
                    seq=seq,
                    prompt=data.draw(tokens),
                    seed=data.draw(st.integers(0, 2**64 - 1)),
                    temperature=data.draw(st.floats(0.0, 10.0)),
                )
            )
        elif kind == "upload":
            u = step_upload(
                lm,
                device,
                data.draw(st.integers(0, STEPS - 1)),
                seq=seq,
                draft=data.draw(st.integers(0, V + 4)),
                draft_prob=data.draw(st.floats(0.0, 1.0)),
                token_index=data.draw(st.integers(0, 64) | u32),
            )
            if data.draw(st.booleans()):
                u = wire.Upload(dataclasses.replace(u.frame, payload=data.draw(st.binary(max_size=64))), u.stamp)
            frame = wire.encode(u)[0]
        elif kind == "flush":
            frame = wire.encode(flush_upload(lm, device, seq=seq, token_index=data.draw(st.integers(0, 64))))[0]
        else:
            frame = data.draw(st.binary(max_size=300))
    except protocol.ProtocolError:  # a field the encoder itself refuses: send raw bytes instead
        frame = data.draw(st.binary(min_size=1, max_size=60))
    buf = bytearray(frame)
    mutation = data.draw(st.sampled_from(["none", "none", "none", "flip", "truncate", "extend", "max-field"]))
    if mutation == "flip" and buf:
        for i in data.draw(st.lists(st.integers(0, len(buf) * 8 - 1), min_size=1, max_size=8)):
            buf[i // 8] ^= 1 << (i % 8)
    elif mutation == "truncate" and buf:
        del buf[data.draw(st.integers(0, len(buf) - 1)) :]
    elif mutation == "extend":
        buf += data.draw(st.binary(min_size=1, max_size=32))
    elif mutation == "max-field" and len(buf) >= 20:
        at = data.draw(st.sampled_from([4, 8, 12, 16]))  # device, session, seq or body_len
        buf[at : at + 4] = b"\xff\xff\xff\xff"
    f = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0.0, 1e6)
    upload_stamp = st.builds(lambda a, b, r: struct.pack("<ddI", a, b, r), f, f, st.integers(0, 40) | u32)
    open_stamp = st.builds(lambda n, x: struct.pack("<Id", n, x), st.integers(0, 200) | u32, f)
    own = open_stamp if kind == "open" else upload_stamp  # mostly the layout the frame's type has
    stamp = data.draw(st.one_of(own, own, own, upload_stamp, open_stamp, st.binary(max_size=40)))
    n = data.draw(st.sampled_from([2] * 16 + [1, 3, 5, 50]))  # mostly [frame, stamp]
    return ([bytes(buf), stamp] + [b""] * max(0, n - 2))[:n]


def test_hypothesis_messages_each_get_one_error_and_leave_the_session_untouched(serve, lm):
    """Property: against a verifier whose one session is open, every generated message (whatever it
    holds) is answered by exactly one decodable ERROR and counted once; the legitimate session then
    goes on with the verdicts it gets when nobody else is there."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    want = baseline(serve, lm)
    v = serve(allowed_devices={7}, expected_sessions=1)
    legit, hostile = Client(v.endpoint, b"legit"), Client(v.endpoint, b"hypothesis")
    sent = []
    try:
        got = run_session(legit, lm, [7], steps=range(1), flush=False)

        @settings(
            max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        @given(st.data())
        def one(data):
            hostile.send(_hypothesis_message(data, lm.vocab_size, lm))
            sent.append(1)
            reply, _ = hostile.reply(timeout_s=5.0)
            assert isinstance(reply, protocol.Error), reply
            assert v.errors == len(sent), v.error_log[-3:]

        one()
        assert hostile.silent(0.2)  # nothing more than one reply per message
        got += run_session(legit, lm, [7], steps=range(1, STEPS), opened=True)
    finally:
        legit.close()
        hostile.close()
    print(
        f"\nhypothesis: {len(sent)} generated messages, {v.errors} ERROR replies counted "
        f"{ {ErrorCode(c).name: n for c, n in sorted(v.error_codes.items())} }; e.g. {v.error_log[-3:]}"
    )
    assert len(sent) == 300 and got == want
    assert_serving(v)
