"""What devices and the verifier say to each other: the frames (message types, their binary
layout, validation, error codes). An UPLOAD carries the draft distribution as an opaque payload
whose encoding is agents.codec's.

Frames (issue 3): one ZeroMQ message each, little-endian, a 20-byte header then a body.

    header: magic b"HT", version u8, type u8, device u32, session u32, seq u32, body_len u32

    OPEN     seed u64, temperature f64, n u32, prompt u32[n], tier str16, policy str16
    UPLOAD   token_index u32, flags u8 (bit 0 llm_samples), draft u32, n u32, piggyback u32[n],
             payload_len u32, payload; measurement: draft_prob f32, piggyback_probs f32[n]
    FLUSH    token_index u32, n u32, piggyback u32[n]; measurement: piggyback_probs f32[n]
    VERDICT  token_index u32, token u32, flags u8 (bit 0 accepted, bit 1 resampled);
             measurement: beta f32, n u32, shadow_betas f32[n]
    ERROR    code u16 (ErrorCode), bad_seq u32 (0xFFFFFFFF: unknown), message str16

str16 = u16 byte length + UTF-8. Token ids are u32 with 0xFFFFFFFF reserved for "no token"
(NO_TOKEN = -1 in the dataclasses). "Measurement" fields sit at the end of a body: they let
the verifier report beta = max(0, 1 - y_d / x_d) with the device's exact x_d (docs/design.md step
3) but a deployment would not send them, so the link is charged `wire_size` (header and the
rest of the body), not the full frame length. Float measurements are NaN (not applicable)
or in [0, 1].

Anything malformed raises ProtocolError (a ValueError) saying what and where; never
another exception type, never garbage.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from typing import ClassVar

from agents import codec


class ErrorCode(enum.IntEnum):
    """Codes of ERROR frames (and of ProtocolError.code)."""

    BAD_FRAME = 1  # truncated, bad magic, length mismatch
    BAD_VERSION = 2
    UNKNOWN_TYPE = 3
    OVERSIZED = 4
    BAD_BODY = 5
    BAD_PAYLOAD = 6
    OUT_OF_ORDER = 7  # for the verifier's sequence check
    UNKNOWN_SESSION = 8  # no such session, or not one this client opened
    INTERNAL = 9
    REFUSED = 10  # well formed but not allowed: a second OPEN of a session, a device outside the run
    LIMIT = 11  # over a server limit: sessions, prompt or piggyback length, prefill tokens, message parts


class ProtocolError(ValueError):
    """Malformed wire data, or arguments that would make it.

    `code` is the ErrorCode an ERROR reply should carry; device, session and seq are set when
    the frame header could be read (so the reply can be addressed), else None.
    """

    def __init__(
        self,
        message: str,
        code: ErrorCode = ErrorCode.BAD_FRAME,
        *,
        device: int | None = None,
        session: int | None = None,
        seq: int | None = None,
    ):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.device, self.session, self.seq = device, session, seq


# ----------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------

FRAME_MAGIC = b"HT"
PROTOCOL_VERSION = 1
_FRAME_HEADER = struct.Struct("<2sBBIIII")
FRAME_HEADER_BYTES = _FRAME_HEADER.size  # 20
MAX_FRAME_BYTES = 4 << 20  # default limit, header included; every encode/decode takes its own
NO_TOKEN = -1
_WIRE_NO_TOKEN = 0xFFFFFFFF
MAX_ERROR_MESSAGE_BYTES = 1024  # longer ERROR messages are cut (an error reply must not fail)


class MsgType(enum.IntEnum):
    OPEN = 1
    UPLOAD = 2
    FLUSH = 3
    VERDICT = 4
    # 5 was CLOSE, never sent (a session ends with its last verdict or FLUSH): now an unknown type
    ERROR = 6


@dataclass(frozen=True, kw_only=True)
class Message:
    """Header fields shared by every frame. Replies (VERDICT, ERROR) echo the seq they answer."""

    TYPE: ClassVar[MsgType]
    device: int
    session: int
    seq: int


@dataclass(frozen=True, kw_only=True)
class Open(Message):
    """A device opens a session: the verifier primes its LLM with the prompt."""

    TYPE: ClassVar[MsgType] = MsgType.OPEN
    prompt: tuple[int, ...]
    seed: int  # the scenario seed: keyed_rng(seed, device, token_index, purpose) on the server
    temperature: float
    tier: str = ""
    policy: str = ""

    def __post_init__(self):
        object.__setattr__(self, "prompt", _int_tuple(self.prompt))


@dataclass(frozen=True, kw_only=True)
class Upload(Message):
    """A request to verify the draft of token `token_index`.

    piggyback: tokens the device skipped (accepted locally) since its last upload, in order;
    they are token indices token_index - len(piggyback) .. token_index - 1. With llm_samples
    (llm-only) there is no draft (NO_TOKEN) and no payload: the LLM samples the token itself.
    """

    TYPE: ClassVar[MsgType] = MsgType.UPLOAD
    token_index: int
    draft: int
    piggyback: tuple[int, ...] = ()
    payload: bytes = b""
    llm_samples: bool = False
    draft_prob: float = math.nan  # measurement: the device's x_d of the draft
    piggyback_probs: tuple[float, ...] = ()  # measurement: x_d of each piggybacked token

    def __post_init__(self):
        object.__setattr__(self, "piggyback", _int_tuple(self.piggyback))
        object.__setattr__(self, "piggyback_probs", _float_tuple(self.piggyback_probs))
        object.__setattr__(self, "payload", bytes(self.payload))


@dataclass(frozen=True, kw_only=True)
class Flush(Message):
    """The last skipped tokens after generation ends: no verification, only their shadow betas.
    token_index is one past the last piggybacked token (the number of tokens generated)."""

    TYPE: ClassVar[MsgType] = MsgType.FLUSH
    token_index: int
    piggyback: tuple[int, ...]
    piggyback_probs: tuple[float, ...] = ()  # measurement

    def __post_init__(self):
        object.__setattr__(self, "piggyback", _int_tuple(self.piggyback))
        object.__setattr__(self, "piggyback_probs", _float_tuple(self.piggyback_probs))


@dataclass(frozen=True, kw_only=True)
class Verdict(Message):
    """The answer to an UPLOAD (token = the final token) or a FLUSH (token = NO_TOKEN)."""

    TYPE: ClassVar[MsgType] = MsgType.VERDICT
    token_index: int
    token: int
    accepted: bool = False
    resampled: bool = False
    beta: float = math.nan  # measurement: max(0, 1 - y_d/x_d) of the draft; NaN without one
    shadow_betas: tuple[float, ...] = ()  # measurement: the same for each piggybacked token

    def __post_init__(self):
        object.__setattr__(self, "shadow_betas", _float_tuple(self.shadow_betas))


@dataclass(frozen=True, kw_only=True)
class Error(Message):
    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: int
    message: str = ""
    bad_seq: int = -1  # the offending frame's seq, -1 when unknown


def _int_tuple(values) -> tuple[int, ...]:
    return values if type(values) is tuple else tuple(int(v) for v in values)


def _float_tuple(values) -> tuple[float, ...]:
    return values if type(values) is tuple else tuple(float(v) for v in values)


# Body layouts: fixed parts as precompiled structs; arrays and strings are length-prefixed.
_OPEN = struct.Struct("<QdI")
_UPLOAD = struct.Struct("<IBII")
_FLUSH = struct.Struct("<II")
_VERDICT = struct.Struct("<IIB")
_ERROR = struct.Struct("<HI")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_F32 = struct.Struct("<f")
_UPLOAD_LLM_SAMPLES = 1
_VERDICT_ACCEPTED, _VERDICT_RESAMPLED = 1, 2


def encode_frame(msg: Message, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Serialise a message; raises ProtocolError if it is invalid or larger than the limit."""
    try:
        encode_body = _ENCODERS[type(msg)]
    except KeyError:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: not a frame message", ErrorCode.BAD_BODY) from None
    where = dict(device=msg.device, session=msg.session, seq=msg.seq)
    try:
        _validate(msg)
        body = encode_body(msg)
        header = _FRAME_HEADER.pack(
            FRAME_MAGIC, PROTOCOL_VERSION, msg.TYPE, msg.device, msg.session, msg.seq, len(body)
        )
    except (struct.error, OverflowError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"cannot encode {msg.TYPE.name}: {exc}", ErrorCode.BAD_BODY, **where) from None
    if FRAME_HEADER_BYTES + len(body) > max_frame_bytes:
        raise ProtocolError(
            f"{msg.TYPE.name} frame of {FRAME_HEADER_BYTES + len(body)} bytes exceeds the {max_frame_bytes}-byte limit",
            ErrorCode.OVERSIZED,
            **where,
        )
    return header + body


def _ids(values, field: str) -> bytes:
    if values and max(values) >= _WIRE_NO_TOKEN:
        raise ProtocolError(f"{field}: token id {max(values)} is reserved or too large", ErrorCode.BAD_BODY)
    return struct.pack(f"<{len(values)}I", *values)


def _token(value: int, field: str) -> int:
    if value == NO_TOKEN:
        return _WIRE_NO_TOKEN
    if not 0 <= value < _WIRE_NO_TOKEN:
        raise ProtocolError(
            f"{field}: token id {value} outside [0, {_WIRE_NO_TOKEN}) and not NO_TOKEN", ErrorCode.BAD_BODY
        )
    return value


def _str16(text: str, field: str, limit: int = 0xFFFF) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise ProtocolError(f"{field}: {len(raw)} UTF-8 bytes > {limit}", ErrorCode.BAD_BODY)
    return _U16.pack(len(raw)) + raw


def _encode_open(m: Open) -> bytes:
    return b"".join(
        (
            _OPEN.pack(m.seed, m.temperature, len(m.prompt)),
            _ids(m.prompt, "OPEN prompt"),
            _str16(m.tier, "OPEN tier"),
            _str16(m.policy, "OPEN policy"),
        )
    )


def _encode_upload(m: Upload) -> bytes:
    n = len(m.piggyback)
    flags = _UPLOAD_LLM_SAMPLES if m.llm_samples else 0
    return b"".join(
        (
            _UPLOAD.pack(m.token_index, flags, _token(m.draft, "UPLOAD draft"), n),
            _ids(m.piggyback, "UPLOAD piggyback"),
            _U32.pack(len(m.payload)),
            m.payload,
            _F32.pack(m.draft_prob),
            struct.pack(f"<{n}f", *m.piggyback_probs),
        )
    )


def _encode_flush(m: Flush) -> bytes:
    n = len(m.piggyback)
    return b"".join(
        (_FLUSH.pack(m.token_index, n), _ids(m.piggyback, "FLUSH piggyback"), struct.pack(f"<{n}f", *m.piggyback_probs))
    )


def _encode_verdict(m: Verdict) -> bytes:
    flags = (_VERDICT_ACCEPTED if m.accepted else 0) | (_VERDICT_RESAMPLED if m.resampled else 0)
    n = len(m.shadow_betas)
    return b"".join(
        (
            _VERDICT.pack(m.token_index, _token(m.token, "VERDICT token"), flags),
            _F32.pack(m.beta),
            _U32.pack(n),
            struct.pack(f"<{n}f", *m.shadow_betas),
        )
    )


def _encode_error(m: Error) -> bytes:
    # Cut long messages at a character boundary: an error reply must always go out.
    text = m.message.encode("utf-8")[:MAX_ERROR_MESSAGE_BYTES].decode("utf-8", "ignore")
    bad_seq = _WIRE_NO_TOKEN if m.bad_seq == -1 else m.bad_seq
    return _ERROR.pack(m.code, bad_seq) + _str16(text, "ERROR message")


_ENCODERS = {
    Open: _encode_open,
    Upload: _encode_upload,
    Flush: _encode_flush,
    Verdict: _encode_verdict,
    Error: _encode_error,
}


def _is_measure(v: float) -> bool:
    return v != v or 0.0 <= v <= 1.0  # NaN (not applicable) or a probability


def _validate(m: Message) -> None:
    """Semantic rules shared by encode and decode (struct enforces the integer ranges)."""
    where = dict(device=m.device, session=m.session, seq=m.seq)

    def fail(text: str):
        raise ProtocolError(f"{m.TYPE.name} {text}", ErrorCode.BAD_BODY, **where)

    if isinstance(m, Open):
        if not (math.isfinite(m.temperature) and m.temperature >= 0.0):
            fail(f"temperature must be finite and >= 0, got {m.temperature!r}")
    elif isinstance(m, (Upload, Flush)):
        if m.token_index < len(m.piggyback):
            fail(f"token_index {m.token_index} < {len(m.piggyback)} piggybacked tokens before it")
        if len(m.piggyback_probs) != len(m.piggyback):
            fail(f"piggyback_probs has {len(m.piggyback_probs)} entries for {len(m.piggyback)} piggybacked tokens")
        if not all(_is_measure(p) for p in m.piggyback_probs):
            fail("piggyback_probs must be NaN or in [0, 1]")
        if isinstance(m, Upload):
            if m.llm_samples != (m.draft == NO_TOKEN):
                fail(
                    f"draft must be NO_TOKEN exactly when llm_samples is set (draft={m.draft}, "
                    f"llm_samples={m.llm_samples})"
                )
            if m.llm_samples and m.payload:
                fail(f"with llm_samples carries no payload, got {len(m.payload)} bytes")
            if not m.llm_samples and not m.payload:
                fail("without llm_samples needs a payload to verify the draft against")
            if not _is_measure(m.draft_prob):
                fail(f"draft_prob must be NaN or in [0, 1], got {m.draft_prob!r}")
    elif isinstance(m, Verdict):
        if m.accepted and m.resampled:
            fail("cannot be both accepted and resampled")
        if m.token == NO_TOKEN and (m.accepted or m.resampled or m.beta == m.beta):
            fail("without a token (a FLUSH reply) has no accepted/resampled flag and beta NaN")
        if not _is_measure(m.beta) or not all(_is_measure(b) for b in m.shadow_betas):
            fail("beta and shadow_betas must be NaN or in [0, 1]")
    elif isinstance(m, Error):
        if m.code not in ErrorCode.__members__.values():
            fail(f"code {m.code} is not a known ErrorCode")
        if m.bad_seq != -1 and not 0 <= m.bad_seq < _WIRE_NO_TOKEN:
            fail(f"bad_seq {m.bad_seq} outside [0, {_WIRE_NO_TOKEN}) and not -1")


@dataclass(frozen=True)
class FrameHeader:
    version: int
    msg_type: MsgType
    device: int
    session: int
    seq: int
    body_len: int


def read_header(data, max_frame_bytes: int = MAX_FRAME_BYTES) -> FrameHeader:
    """Validate a whole frame's header against its length (cheap: for routing before decoding)."""
    n = len(data)
    if n > max_frame_bytes:
        raise ProtocolError(f"frame of {n} bytes exceeds the {max_frame_bytes}-byte limit", ErrorCode.OVERSIZED)
    if n < FRAME_HEADER_BYTES:
        raise ProtocolError(f"frame of {n} bytes is shorter than the {FRAME_HEADER_BYTES}-byte header")
    magic, version, msg_type, device, session, seq, body_len = _FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ProtocolError(f"frame bytes 0-1 (magic) are {magic!r}, expected {FRAME_MAGIC!r}")
    where = dict(device=device, session=session, seq=seq)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"frame byte 2 (version) is {version}, this side speaks {PROTOCOL_VERSION}", ErrorCode.BAD_VERSION, **where
        )
    if msg_type not in _DECODERS:
        raise ProtocolError(
            f"frame byte 3 (type) is {msg_type}, not a known message type", ErrorCode.UNKNOWN_TYPE, **where
        )
    if FRAME_HEADER_BYTES + body_len > max_frame_bytes:
        raise ProtocolError(
            f"frame bytes 16-19 (body_len) announce {body_len} bytes, over the {max_frame_bytes}-byte frame limit",
            ErrorCode.OVERSIZED,
            **where,
        )
    if n != FRAME_HEADER_BYTES + body_len:
        raise ProtocolError(f"frame is {n} bytes, its header says {FRAME_HEADER_BYTES} + {body_len}", **where)
    return FrameHeader(version, MsgType(msg_type), device, session, seq, body_len)


def decode_frame(data, max_frame_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Parse and validate one frame. The UPLOAD payload stays bytes: check_upload decodes it
    (agents.codec), answering a bad one with ProtocolError code BAD_PAYLOAD."""
    h = read_header(data, max_frame_bytes)
    r = _Reader(data, h)
    msg = _DECODERS[h.msg_type](r, dict(device=h.device, session=h.session, seq=h.seq))
    r.finish()
    _validate(msg)
    return msg


class _Reader:
    """Reads a body front to back; every error names the message, the field and its offset."""

    def __init__(self, data, h: FrameHeader):
        self.data, self.h, self.off = data, h, FRAME_HEADER_BYTES

    def fail(self, text: str):
        raise ProtocolError(
            f"{self.h.msg_type.name} body: {text}",
            ErrorCode.BAD_BODY,
            device=self.h.device,
            session=self.h.session,
            seq=self.h.seq,
        )

    def need(self, size: int, field: str) -> None:
        left = len(self.data) - self.off
        if size > left:
            self.fail(f"{field} at byte {self.off} needs {size} bytes, {left} left")

    def fixed(self, st: struct.Struct, field: str) -> tuple:
        self.need(st.size, field)
        values = st.unpack_from(self.data, self.off)
        self.off += st.size
        return values

    def array(self, code: str, n: int, field: str) -> tuple:
        size = 4 * n
        self.need(size, field)
        values = struct.unpack_from(f"<{n}{code}", self.data, self.off)
        if code == "I" and n and max(values) == _WIRE_NO_TOKEN:
            self.fail(f"{field} at byte {self.off} holds the reserved token id {_WIRE_NO_TOKEN:#x}")
        if code == "f":
            values = tuple(math.nan if v != v else v for v in values)  # one NaN object: equality holds
        self.off += size
        return values

    def raw(self, n: int, field: str) -> bytes:
        self.need(n, field)
        self.off += n
        return bytes(self.data[self.off - n : self.off])

    def text(self, field: str) -> str:
        (n,) = self.fixed(_U16, field + " length")
        start = self.off
        try:
            return self.raw(n, field).decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"{field} at byte {start} is not UTF-8 ({exc.reason} at {start + exc.start})")

    def f32(self, field: str) -> float:
        (v,) = self.fixed(_F32, field)
        return math.nan if v != v else v

    def finish(self) -> None:
        if self.off != len(self.data):
            self.fail(f"{len(self.data) - self.off} unexpected bytes after the last field, at byte {self.off}")


def _wire_token(v: int) -> int:
    return NO_TOKEN if v == _WIRE_NO_TOKEN else v


def _decode_open(r: _Reader, where: dict) -> Open:
    seed, temperature, n = r.fixed(_OPEN, "seed/temperature/n")
    prompt = r.array("I", n, "prompt")
    return Open(
        **where, prompt=prompt, seed=seed, temperature=temperature, tier=r.text("tier"), policy=r.text("policy")
    )


def _decode_upload(r: _Reader, where: dict) -> Upload:
    token_index, flags, draft, n = r.fixed(_UPLOAD, "token_index/flags/draft/n")
    if flags & ~_UPLOAD_LLM_SAMPLES:
        r.fail(f"flags byte {flags:#04x} at byte {FRAME_HEADER_BYTES + 4} has unknown bits")
    piggyback = r.array("I", n, "piggyback")
    (size,) = r.fixed(_U32, "payload_len")
    payload = r.raw(size, "payload")
    draft_prob = r.f32("draft_prob")
    probs = r.array("f", n, "piggyback_probs")
    return Upload(
        **where,
        token_index=token_index,
        draft=_wire_token(draft),
        piggyback=piggyback,
        payload=payload,
        llm_samples=bool(flags),
        draft_prob=draft_prob,
        piggyback_probs=probs,
    )


def _decode_flush(r: _Reader, where: dict) -> Flush:
    token_index, n = r.fixed(_FLUSH, "token_index/n")
    piggyback = r.array("I", n, "piggyback")
    probs = r.array("f", n, "piggyback_probs")
    return Flush(**where, token_index=token_index, piggyback=piggyback, piggyback_probs=probs)


def _decode_verdict(r: _Reader, where: dict) -> Verdict:
    token_index, token, flags = r.fixed(_VERDICT, "token_index/token/flags")
    if flags & ~(_VERDICT_ACCEPTED | _VERDICT_RESAMPLED):
        r.fail(f"flags byte {flags:#04x} at byte {FRAME_HEADER_BYTES + 8} has unknown bits")
    beta = r.f32("beta")
    (n,) = r.fixed(_U32, "shadow_betas length")
    return Verdict(
        **where,
        token_index=token_index,
        token=_wire_token(token),
        accepted=bool(flags & _VERDICT_ACCEPTED),
        resampled=bool(flags & _VERDICT_RESAMPLED),
        beta=beta,
        shadow_betas=r.array("f", n, "shadow_betas"),
    )


def _decode_error(r: _Reader, where: dict) -> Error:
    code, bad_seq = r.fixed(_ERROR, "code/bad_seq")
    return Error(**where, code=code, bad_seq=-1 if bad_seq == _WIRE_NO_TOKEN else bad_seq, message=r.text("message"))


_DECODERS = {
    MsgType.OPEN: _decode_open,
    MsgType.UPLOAD: _decode_upload,
    MsgType.FLUSH: _decode_flush,
    MsgType.VERDICT: _decode_verdict,
    MsgType.ERROR: _decode_error,
}


# ----------------------------------------------------------------------------------------
# Sizes the link is charged, replies, sequence numbers
# ----------------------------------------------------------------------------------------


def wire_size(msg: Message) -> int:
    """The part of encode_frame(msg) a deployment would send, without the measurement fields:
    what links are charged."""
    if isinstance(msg, Upload):
        return FRAME_HEADER_BYTES + _UPLOAD.size + 4 * len(msg.piggyback) + 4 + len(msg.payload)
    if isinstance(msg, Flush):
        return FRAME_HEADER_BYTES + _FLUSH.size + 4 * len(msg.piggyback)
    if isinstance(msg, Verdict):
        return FRAME_HEADER_BYTES + _VERDICT.size
    return len(encode_frame(msg))


def check_upload(frame: Upload | Flush, vocab_size: int) -> codec.Payload | None:
    """What only the verifier can check: token ids inside its vocabulary and a payload that
    decodes for it. Returns the decoded payload (None when the LLM samples itself or for a
    flush)."""
    where = dict(device=frame.device, session=frame.session, seq=frame.seq)
    if frame.piggyback and not 0 <= min(frame.piggyback) <= max(frame.piggyback) < vocab_size:
        raise ProtocolError(f"piggybacked token ids must lie in [0, {vocab_size})", ErrorCode.BAD_BODY, **where)
    if isinstance(frame, Flush) or frame.llm_samples:
        return None
    if not 0 <= frame.draft < vocab_size:
        raise ProtocolError(
            f"draft token {frame.draft} outside the vocabulary [0, {vocab_size})", ErrorCode.BAD_BODY, **where
        )
    try:
        payload = codec.decode_payload_ex(frame.payload)
    except codec.PayloadError as exc:
        raise ProtocolError(str(exc), ErrorCode.BAD_PAYLOAD, **where) from None
    if payload.vocab_size != vocab_size:
        raise ProtocolError(
            f"payload vocab_size {payload.vocab_size} != the verifier's {vocab_size}", ErrorCode.BAD_PAYLOAD, **where
        )
    return payload


def _u32_or(value, default: int) -> int:
    return value if isinstance(value, int) and 0 <= value <= _WIRE_NO_TOKEN else default


def error_reply(exc: ProtocolError, device: int | None = None, session: int | None = None) -> Error:
    """The ERROR frame answering a ProtocolError (addressed as its header said, when known).

    Always encodable, whatever the offending header held: header fields are u32 and echo it,
    but bad_seq reserves 0xFFFFFFFF for "unknown", so a seq of 0xFFFFFFFF (or anything that is
    not a u32) is reported as unknown (-1) rather than making the reply itself invalid."""
    seq = _u32_or(exc.seq, -1)
    return Error(
        device=_u32_or(exc.device, _u32_or(device, 0)),
        session=_u32_or(exc.session, _u32_or(session, 0)),
        seq=max(seq, 0),
        code=exc.code,
        message=str(exc),
        bad_seq=seq if seq < _WIRE_NO_TOKEN else -1,
    )


class SeqStatus(enum.Enum):
    NEXT = "next"  # the one expected: handle it
    REPEAT = "repeat"  # the previous one again (a retransmission): resend its reply
    STALE = "stale"  # older than the previous one: drop or answer OUT_OF_ORDER
    GAP = "gap"  # ahead of the expected one: a frame is missing; answer OUT_OF_ORDER


def check_sequence(expected: int, seq: int) -> SeqStatus:
    """Classify a session's incoming seq against the next one it expects."""
    if seq == expected:
        return SeqStatus.NEXT
    if seq == expected - 1:
        return SeqStatus.REPEAT
    return SeqStatus.STALE if seq < expected else SeqStatus.GAP
