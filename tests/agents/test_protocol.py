"""Frame protocol: round trips, exact sizes, strict validation, fuzzing (nothing but
ProtocolError may come out of a decoder, whatever the bytes)."""

from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents import protocol as P
from agents.codec import decode_payload, encode_payload
from agents.protocol import (
    NO_TOKEN,
    Error,
    ErrorCode,
    Flush,
    Open,
    ProtocolError,
    SeqStatus,
    Upload,
    Verdict,
    check_sequence,
    decode_frame,
    encode_frame,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- frames -----------------------------------------------------------------------------------

ids = st.lists(st.integers(0, 2**32 - 2), max_size=40)
prob32 = st.one_of(st.floats(0, 1, width=32), st.just(math.nan))
header = dict(device=st.integers(0, 2**32 - 1), session=st.integers(0, 2**32 - 1), seq=st.integers(0, 2**32 - 1))


@st.composite
def uploads(draw):
    piggyback = draw(ids)
    llm_samples = draw(st.booleans())
    return Upload(
        **{k: draw(v) for k, v in header.items()},
        token_index=draw(st.integers(len(piggyback), 2**32 - 1)),
        draft=NO_TOKEN if llm_samples else draw(st.integers(0, 2**32 - 2)),
        piggyback=piggyback,
        llm_samples=llm_samples,
        payload=b"" if llm_samples else draw(st.binary(min_size=1, max_size=64)),
        draft_prob=math.nan if llm_samples else draw(prob32),
        piggyback_probs=[draw(prob32) for _ in piggyback],
    )


@st.composite
def flushes(draw):
    piggyback = draw(ids)
    return Flush(
        **{k: draw(v) for k, v in header.items()},
        token_index=draw(st.integers(len(piggyback), 2**32 - 1)),
        piggyback=piggyback,
        piggyback_probs=[draw(prob32) for _ in piggyback],
    )


@st.composite
def verdicts(draw):
    token = draw(st.one_of(st.just(NO_TOKEN), st.integers(0, 2**32 - 2)))
    outcome = (False, False)
    if token != NO_TOKEN:
        outcome = draw(st.sampled_from([(False, False), (True, False), (False, True)]))
    return Verdict(
        **{k: draw(v) for k, v in header.items()},
        token_index=draw(st.integers(0, 2**32 - 1)),
        token=token,
        accepted=outcome[0],
        resampled=outcome[1],
        beta=draw(prob32) if token != NO_TOKEN else math.nan,
        shadow_betas=draw(st.lists(prob32, max_size=20)),
    )


messages = st.one_of(
    st.builds(
        Open,
        **header,
        prompt=ids,
        seed=st.integers(0, 2**64 - 1),
        temperature=st.floats(0, 10, allow_nan=False),
        tier=st.text(max_size=20),
        policy=st.text(max_size=20),
    ),
    uploads(),
    flushes(),
    verdicts(),
    st.builds(
        Error,
        **header,
        code=st.sampled_from(list(ErrorCode)),
        message=st.text(max_size=100),
        bad_seq=st.one_of(st.just(-1), st.integers(0, 2**32 - 2)),
    ),
)


@FUZZ
@given(messages)
def test_frame_round_trip(msg):
    data = encode_frame(msg)
    back = decode_frame(data)
    assert back == msg  # decoded NaNs are math.nan itself, so dataclass equality holds
    assert encode_frame(back) == data
    header = P.read_header(data)
    assert (header.msg_type, header.device, header.session, header.seq) == (msg.TYPE, msg.device, msg.session, msg.seq)
    assert header.body_len == len(data) - P.FRAME_HEADER_BYTES


def test_wire_size_leaves_out_only_the_measurement_fields():
    up = Upload(
        device=1,
        session=2,
        seq=3,
        token_index=9,
        draft=42,
        piggyback=[5, 6, 7],
        payload=b"x" * 50,
        draft_prob=0.25,
        piggyback_probs=[0.5, 0.5, 0.5],
    )
    assert len(encode_frame(up)) - P.wire_size(up) == 4 + 4 * 3
    assert P.wire_size(up) == 20 + 13 + 12 + 4 + 50
    flush = Flush(device=1, session=2, seq=4, token_index=12, piggyback=[1, 2], piggyback_probs=[0.5, 0.5])
    assert len(encode_frame(flush)) - P.wire_size(flush) == 8
    verdict = Verdict(
        device=1, session=2, seq=3, token_index=9, token=42, accepted=True, beta=0.0, shadow_betas=[0.1, 0.2, 0.3]
    )
    assert len(encode_frame(verdict)) - P.wire_size(verdict) == 4 + 4 + 12
    error = Error(device=1, session=2, seq=5, code=ErrorCode.LIMIT, message="x")
    assert P.wire_size(error) == len(encode_frame(error))  # no measurement fields


def _frame(msg_type=P.MsgType.OPEN, body=b"", version=1, magic=b"HT", body_len=None, device=7, session=8, seq=9):
    n = len(body) if body_len is None else body_len
    return struct.pack("<2sBBIIII", magic, version, msg_type, device, session, seq, n) + body


@pytest.mark.parametrize(
    "data,code,match",
    [
        (b"HT\x01", ErrorCode.BAD_FRAME, "shorter than the 20-byte header"),
        (_frame(magic=b"XX"), ErrorCode.BAD_FRAME, "magic"),
        (_frame(version=2), ErrorCode.BAD_VERSION, "version"),
        (_frame(msg_type=0), ErrorCode.UNKNOWN_TYPE, "type"),
        (_frame(msg_type=99), ErrorCode.UNKNOWN_TYPE, "type"),
        (_frame(msg_type=5), ErrorCode.UNKNOWN_TYPE, "type"),  # was CLOSE, never sent
        (_frame(body_len=1), ErrorCode.BAD_FRAME, "header says"),
        (_frame(P.MsgType.FLUSH, struct.pack("<II", 0, 0) + b"\0"), ErrorCode.BAD_BODY, "unexpected bytes"),
        (_frame(body_len=2**32 - 1), ErrorCode.OVERSIZED, "limit"),
        (_frame(P.MsgType.OPEN, struct.pack("<QdI", 1, 1.0, 1000)), ErrorCode.BAD_BODY, "prompt at byte 40 needs 4000"),
        (_frame(P.MsgType.OPEN, struct.pack("<QdI", 1, -1.0, 0) + bytes(4)), ErrorCode.BAD_BODY, "temperature"),
        (
            _frame(P.MsgType.OPEN, struct.pack("<QdIIH", 1, 1.0, 1, 2**32 - 1, 0) + bytes(2)),
            ErrorCode.BAD_BODY,
            "reserved",
        ),
        (
            _frame(P.MsgType.OPEN, struct.pack("<QdIH", 1, 1.0, 0, 2) + b"\xff\xfe" + bytes(2)),
            ErrorCode.BAD_BODY,
            "UTF-8",
        ),
        (_frame(P.MsgType.UPLOAD, struct.pack("<IBIII", 0, 4, 1, 0, 1) + b"x" + bytes(4)), ErrorCode.BAD_BODY, "flags"),
        (
            _frame(P.MsgType.UPLOAD, struct.pack("<IBIII", 0, 0, 1, 0, 0) + bytes(4)),
            ErrorCode.BAD_BODY,
            "needs a payload",
        ),
        (
            _frame(P.MsgType.UPLOAD, struct.pack("<IBIII", 0, 1, 1, 0, 0) + struct.pack("<f", math.nan)),
            ErrorCode.BAD_BODY,
            "NO_TOKEN exactly when",
        ),
        (
            _frame(P.MsgType.UPLOAD, struct.pack("<IBIIII", 0, 0, 1, 1, 3, 1) + b"x" + bytes(8)),
            ErrorCode.BAD_BODY,
            "token_index 0 < 1",
        ),
        (
            _frame(P.MsgType.UPLOAD, struct.pack("<IBIII", 0, 0, 1, 0, 1) + b"x" + struct.pack("<f", 2.0)),
            ErrorCode.BAD_BODY,
            "draft_prob",
        ),
        (_frame(P.MsgType.VERDICT, struct.pack("<IIBfI", 0, 1, 3, 0.5, 0)), ErrorCode.BAD_BODY, "both accepted"),
        (_frame(P.MsgType.VERDICT, struct.pack("<IIBfI", 0, 2**32 - 1, 0, 0.5, 0)), ErrorCode.BAD_BODY, "FLUSH reply"),
        (_frame(P.MsgType.VERDICT, struct.pack("<IIBfIf", 0, 1, 1, 0.5, 1, -1.0)), ErrorCode.BAD_BODY, "shadow_betas"),
        (_frame(P.MsgType.ERROR, struct.pack("<HIH", 77, 0, 0)), ErrorCode.BAD_BODY, "ErrorCode"),
    ],
)
def test_decode_frame_rejects(data, code, match):
    with pytest.raises(ProtocolError, match=match) as info:
        decode_frame(data)
    assert info.value.code == code
    if len(data) >= 20 and data[:2] == b"HT" and code != ErrorCode.BAD_FRAME:
        assert (info.value.device, info.value.session, info.value.seq) == (7, 8, 9)  # the reply can be addressed


def test_frame_size_limit_is_configurable_on_both_sides():
    up = Upload(device=1, session=1, seq=1, token_index=0, draft=3, payload=b"p" * 1000, draft_prob=0.5)
    data = encode_frame(up)
    with pytest.raises(ProtocolError, match="limit") as info:
        encode_frame(up, max_frame_bytes=500)
    assert info.value.code == ErrorCode.OVERSIZED
    with pytest.raises(ProtocolError, match="limit") as info:
        decode_frame(data, max_frame_bytes=500)
    assert info.value.code == ErrorCode.OVERSIZED
    assert decode_frame(data, max_frame_bytes=len(data)) == up
    assert P.MAX_FRAME_BYTES == 4 << 20


@pytest.mark.parametrize(
    "msg,match",
    [
        (Upload(device=1, session=1, seq=1, token_index=0, draft=3), "needs a payload"),
        (Upload(device=1, session=1, seq=1, token_index=0, draft=-2, payload=b"x"), "draft"),
        (
            Upload(
                device=1,
                session=1,
                seq=1,
                token_index=5,
                draft=1,
                payload=b"x",
                piggyback=[2**32 - 1],
                piggyback_probs=[0.5],
            ),
            "reserved",
        ),
        (Upload(device=1, session=1, seq=1, token_index=5, draft=1, payload=b"x", piggyback=[1]), "piggyback_probs"),
        (Upload(device=-1, session=1, seq=1, token_index=0, draft=1, payload=b"x"), "cannot encode"),
        (Open(device=1, session=1, seq=0, prompt=[1], seed=-5, temperature=1.0), "cannot encode"),
        (Open(device=1, session=1, seq=0, prompt=[1], seed=1, temperature=math.inf), "temperature"),
        (Open(device=1, session=1, seq=0, prompt=[1], seed=1, temperature=1.0, tier="x" * 70000), "UTF-8 bytes"),
        (Verdict(device=1, session=1, seq=1, token_index=0, token=4, accepted=True, resampled=True), "both"),
        (Error(device=1, session=1, seq=1, code=1000), "ErrorCode"),
    ],
)
def test_encode_frame_rejects_invalid_messages(msg, match):
    with pytest.raises(ProtocolError, match=match):
        encode_frame(msg)


def test_error_messages_are_cut_not_refused():
    err = Error(device=1, session=1, seq=1, code=ErrorCode.INTERNAL, message="é" * 5000)
    back = decode_frame(encode_frame(err))
    assert len(back.message.encode()) <= P.MAX_ERROR_MESSAGE_BYTES and set(back.message) == {"é"}


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        msg = decode_frame(data)
    except ProtocolError:
        return
    assert decode_frame(encode_frame(msg)) == msg


@FUZZ
@given(st.binary(max_size=200))
def test_decode_frame_fuzz_arbitrary_bytes(data):
    _decode_or_protocol_error(data)


@FUZZ
@given(st.sampled_from(list(P.MsgType) + [0, 7, 255]), st.binary(max_size=120), st.integers(0, 2))
def test_decode_frame_fuzz_valid_header_random_body(msg_type, body, version):
    _decode_or_protocol_error(_frame(msg_type, body, version=version))


@FUZZ
@given(messages, st.data())
def test_decode_frame_fuzz_mutations(msg, data):
    valid = encode_frame(msg)
    kind = data.draw(st.sampled_from(["truncate", "extend", "flip", "fix-length-flip"]))
    buf = bytearray(valid)
    if kind == "truncate":
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    elif kind == "extend":
        buf += data.draw(st.binary(min_size=1, max_size=16))
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            bit = data.draw(st.integers(0, len(buf) * 8 - 1))
            buf[bit // 8] ^= 1 << (bit % 8)
        if kind == "fix-length-flip":  # keep the header consistent so the body parser is reached
            buf[:20] = valid[:20]
    _decode_or_protocol_error(bytes(buf))


def test_error_reply_and_sequence_check():
    try:
        decode_frame(_frame(version=3, device=4, session=5, seq=6))
    except ProtocolError as exc:
        reply = P.error_reply(exc)
    assert (reply.device, reply.session, reply.seq, reply.bad_seq, reply.code) == (4, 5, 6, 6, ErrorCode.BAD_VERSION)
    assert "version" in decode_frame(encode_frame(reply)).message
    unaddressed = P.error_reply(ProtocolError("garbage"), device=3)
    assert (unaddressed.device, unaddressed.bad_seq, unaddressed.code) == (3, -1, ErrorCode.BAD_FRAME)
    assert check_sequence(5, 5) is SeqStatus.NEXT
    assert check_sequence(5, 4) is SeqStatus.REPEAT
    assert check_sequence(5, 2) is SeqStatus.STALE
    assert check_sequence(5, 7) is SeqStatus.GAP


def test_upload_carries_a_real_payload_end_to_end():
    payload = encode_payload([10, 3], [0.6, 0.3], 151936)
    up = Upload(
        device=3,
        session=1,
        seq=4,
        token_index=7,
        draft=10,
        piggyback=[11, 12],
        payload=payload,
        draft_prob=0.6,
        piggyback_probs=[0.9, 0.8],
    )
    back = decode_frame(encode_frame(up))
    indices, probs, vocab = decode_payload(back.payload)
    assert indices.tolist() == [10, 3] and vocab == 151936
    assert back.piggyback == (11, 12) and back.piggyback_probs == (np.float32(0.9), np.float32(0.8))


def test_check_upload_against_the_verifiers_vocabulary():
    V = 1000
    payload = encode_payload([10, 3], [0.6, 0.3], V)
    up = Upload(
        device=3,
        session=1,
        seq=4,
        token_index=7,
        draft=10,
        piggyback=[11, 12],
        payload=payload,
        piggyback_probs=[0.5, 0.5],
    )
    assert P.check_upload(up, V).indices.tolist() == [10, 3]
    for bad, match, code in [
        (dict(draft=V), "draft token 1000", ErrorCode.BAD_BODY),
        (dict(piggyback=[1, V]), "piggybacked", ErrorCode.BAD_BODY),
        (dict(payload=payload[:-1]), "payload is", ErrorCode.BAD_PAYLOAD),
    ]:
        with pytest.raises(ProtocolError, match=match) as info:
            P.check_upload(dataclasses.replace(up, **bad), V)
        assert info.value.code == code and info.value.seq == 4
    with pytest.raises(ProtocolError, match="vocab_size 1000 != the verifier's 999"):
        P.check_upload(up, 999)
    llm_only = Upload(
        device=1,
        session=1,
        seq=2,
        token_index=1,
        draft=NO_TOKEN,
        piggyback=[1],
        piggyback_probs=[0.5],
        llm_samples=True,
    )
    assert P.check_upload(llm_only, V) is None
    assert (
        P.check_upload(Flush(device=1, session=1, seq=1, token_index=1, piggyback=[5], piggyback_probs=[0.5]), V)
        is None
    )
