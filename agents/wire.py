"""The messages of the runtime: one type per message, each the pair ZeroMQ carries as
[wire frame, emulation stamp].

The frame is agents.protocol's: what a real device and server exchange, and all links are
charged for (protocol.wire_size). The stamp is what only an emulation has, one type per
message with named fields, little-endian:

    Open     OpenStamp     max_new_tokens u32, lookahead_s f64
    Upload   UploadStamp   t_sent f64, t_arrive f64, retransmissions u32  (frame UPLOAD or FLUSH)
    Verdict  VerdictStamp  t_sent f64, then optionally the LLM logits block
    ERROR    (empty stamp; decode raises it as a ProtocolError)

max_new_tokens and the lookahead are emulation control (the verifier's batch release, docs/design.md
section 2); the times are emulated; retransmissions counts the copies lost before this one.
A verdict's logits block (VerdictStamp.llm_logits, for the device's fidelity, agents.device):
dtype u8 (4: float32, 8: float64), rows u32, cols u32, then rows x cols values. Measurement
only, like the rest of the stamp: ~600 KB a row for the Qwen pair on loopback, never charged
to the emulated downlink. Only a verdict's stamp is ever that long (the verifier's inbound
parts stay small and bounded).

decode validates the stamp as strictly as protocol validates the frame: upload times finite
and >= 0, an OPEN's max_new_tokens >= 1 and its lookahead >= 0 (+inf allowed: a device that
never asks the LLM), a logits block of exactly the size it declares. Like decode_frame it
raises nothing but ProtocolError.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from agents import protocol

SESSION = 1  # one session per device per run
PARTS = 2  # [frame, stamp]: a receiver refuses a message of more parts before reading them
_E = protocol.ErrorCode


def _fail(text: str, frame: protocol.Message, code=_E.BAD_BODY) -> protocol.ProtocolError:
    return protocol.ProtocolError(
        f"device {frame.device}: {frame.TYPE.name} stamp: {text}",
        code,
        device=frame.device,
        session=frame.session,
        seq=frame.seq,
    )


def _fixed(st: struct.Struct, data, frame: protocol.Message) -> tuple:
    if len(data) != st.size:
        raise _fail(f"{len(data)} bytes, expected {st.size}", frame, _E.BAD_FRAME)
    return st.unpack(data)


@dataclass(frozen=True, slots=True)
class OpenStamp:
    max_new_tokens: int  # tokens the device will generate: no verdict is due after the last
    lookahead_s: float  # lower bound on a verdict-to-next-arrival gap (agents.device.Device.lookahead_s)

    def pack(self) -> bytes:
        return _OPEN.pack(self.max_new_tokens, self.lookahead_s)

    @staticmethod
    def unpack(data, frame: protocol.Open) -> OpenStamp:
        max_new, lookahead = _fixed(_OPEN, data, frame)
        if max_new < 1:
            raise _fail(f"max_new_tokens {max_new} is not >= 1", frame)
        if not lookahead >= 0.0:  # NaN fails too
            raise _fail(f"lookahead {lookahead!r} is not >= 0", frame)
        return OpenStamp(max_new, lookahead)


@dataclass(frozen=True, slots=True)
class UploadStamp:
    t_sent: float  # emulated time the first copy left the device
    t_arrive: float  # emulated arrival at the verifier (of the copy that got through)
    retransmissions: int = 0  # copies lost before it

    def pack(self) -> bytes:
        return _UPLOAD.pack(self.t_sent, self.t_arrive, self.retransmissions)

    @staticmethod
    def unpack(data, frame: protocol.Upload | protocol.Flush) -> UploadStamp:
        t_sent, t_arrive, retx = _fixed(_UPLOAD, data, frame)
        if not all(math.isfinite(t) and t >= 0.0 for t in (t_sent, t_arrive)):
            raise _fail(f"times must be finite and >= 0, got t_sent {t_sent!r}, t_arrive {t_arrive!r}", frame)
        return UploadStamp(t_sent, t_arrive, retx)


@dataclass(frozen=True, slots=True)
class VerdictStamp:
    t_sent: float  # emulated time the verifier sent it
    # The LLM's logits at each piggybacked token's position, then at the verified draft's, [n, V],
    # for the device's fidelity. None in a replay (the fidelity is in the content record) and in a repeat.
    llm_logits: np.ndarray | None = field(default=None, compare=False, repr=False)

    def pack(self) -> bytes:
        if self.llm_logits is None:
            return _VERDICT.pack(self.t_sent)
        z = np.asarray(self.llm_logits)
        dtype = _LOGITS_DTYPES[8 if z.dtype == np.float64 else 4]
        z = np.ascontiguousarray(z, dtype=dtype).reshape(len(z), -1)
        return _VERDICT.pack(self.t_sent) + _LOGITS.pack(dtype.itemsize, *z.shape) + z.tobytes()

    @staticmethod
    def unpack(data, frame: protocol.Verdict) -> VerdictStamp:
        if len(data) == _VERDICT.size:
            return VerdictStamp(*_VERDICT.unpack(data))
        block = memoryview(data)[_VERDICT.size :]
        if len(block) < _LOGITS.size:
            raise _fail(
                f"{len(data)} bytes: {_VERDICT.size}, or more with a {_LOGITS.size}-byte logits header",
                frame,
                _E.BAD_FRAME,
            )
        size, rows, cols = _LOGITS.unpack_from(block)
        dtype = _LOGITS_DTYPES.get(size)
        if dtype is None or len(block) != _LOGITS.size + rows * cols * size:
            raise _fail(
                f"logits block of {len(block)} bytes does not match its header (itemsize {size}, {rows} x {cols})",
                frame,
            )
        (t_sent,) = _VERDICT.unpack_from(data)
        return VerdictStamp(t_sent, np.frombuffer(block, dtype=dtype, offset=_LOGITS.size).reshape(rows, cols))


_OPEN = struct.Struct("<Id")
_UPLOAD = struct.Struct("<ddI")
_VERDICT = struct.Struct("<d")
_LOGITS = struct.Struct("<BII")  # dtype (itemsize), rows, cols
_LOGITS_DTYPES = {4: np.dtype("<f4"), 8: np.dtype("<f8")}


@dataclass(frozen=True, slots=True)
class Open:
    """A device opens its session: the verifier primes its LLM with the prompt."""

    frame: protocol.Open
    stamp: OpenStamp


@dataclass(frozen=True, slots=True)
class Upload:
    """A device's request: to verify its draft (frame UPLOAD) or, after its last token, only to
    measure the shadow betas of the last skipped tokens (frame FLUSH)."""

    frame: protocol.Upload | protocol.Flush
    stamp: UploadStamp

    @property
    def final(self) -> bool:
        return isinstance(self.frame, protocol.Flush)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verifier's answer to an Upload (token NO_TOKEN for a FLUSH)."""

    frame: protocol.Verdict
    stamp: VerdictStamp


Message = Open | Upload | Verdict
_KINDS = {
    protocol.Open: (Open, OpenStamp),
    protocol.Upload: (Upload, UploadStamp),
    protocol.Flush: (Upload, UploadStamp),
    protocol.Verdict: (Verdict, VerdictStamp),
}


def encode(msg: Message) -> list[bytes]:
    return [protocol.encode_frame(msg.frame), msg.stamp.pack()]


def error_message(exc: protocol.ProtocolError) -> list[bytes]:
    """The ERROR reply to `exc`; never raises (an error reply must always go out)."""
    try:
        frame = protocol.encode_frame(protocol.error_reply(exc))
    except protocol.ProtocolError:  # not expected (error_reply keeps every field encodable): answer anyway
        frame = protocol.encode_frame(
            protocol.Error(device=0, session=0, seq=0, code=_E.INTERNAL, message="the error reply could not be encoded")
        )
    return [frame, b""]


def decode(parts: list[bytes]) -> Message:
    """The message in `parts`; raises ProtocolError for anything malformed, and for an ERROR
    reply (a device has nothing to do with one but fail)."""
    if len(parts) != PARTS:
        raise protocol.ProtocolError(f"expected [frame, stamp], got {len(parts)} parts")
    frame = protocol.decode_frame(parts[0])
    if isinstance(frame, protocol.Error):
        raise protocol.ProtocolError(f"verifier error {frame.code}: {frame.message}")
    kind, stamp = _KINDS[type(frame)]
    return kind(frame, stamp.unpack(parts[1], frame))
