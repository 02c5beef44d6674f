"""ZeroMQ messages of the runtime: [wire frame, emulation stamp].

The wire frame is agents.protocol's (what a real device and server exchange). The stamp
is what only an emulation has: the emulated time a message left and arrived, and for
uploads the retransmission count. Keeping it out of the frame keeps the frame honest:
links are charged for the frame alone.

A verdict's stamp may go on with the LLM logits the device measures fidelity from
(Verdict.llm_logits, agents.device): dtype u8 (4: float32, 8: float64), rows u32, cols u32, then
rows x cols little-endian values. Measurement only, like the rest of the stamp: ~600 KB a row
for the Qwen pair on loopback, never charged to the emulated downlink. Only a verdict's stamp
is ever longer than the fixed part (the verifier's inbound parts stay small and bounded).

decode_message validates the stamp as strictly as the frame: upload times finite and >= 0,
an OPEN's max_new_tokens a whole number >= 1 and its lookahead >= 0 (+inf allowed), a verdict's
logits block of exactly the size it declares.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from agents import protocol
from agents.device import Upload, Verdict

SESSION = 1  # one session per device per run
_STAMP = struct.Struct("<ddI")  # t_sent, t_arrive, retransmissions
_LOGITS = struct.Struct("<BII")  # a verdict's measurement block: dtype (itemsize), rows, cols
_LOGITS_DTYPES = {4: np.dtype("<f4"), 8: np.dtype("<f8")}
PARTS = 2  # [frame, stamp]: a receiver refuses a message of more parts before reading them
MAX_NEW_TOKENS = 2**32 - 1  # token indices are u32 on the wire


@dataclass(frozen=True)
class Open:
    device: int
    prompt: tuple[int, ...]
    temperature: float
    max_new_tokens: int
    lookahead_s: float

    def item(self) -> tuple[int, list[int], float, int, float]:
        return self.device, list(self.prompt), self.temperature, self.max_new_tokens, self.lookahead_s


def _stamp(t_sent: float, t_arrive: float = math.nan, retransmissions: int = 0) -> bytes:
    return _STAMP.pack(t_sent, t_arrive, retransmissions)


def open_message(device: int, prompt: list[int], temperature: float, max_new_tokens: int,
                 lookahead_s: float, seed: int = 0) -> list[bytes]:
    frame = protocol.encode_frame(protocol.Open(device=device, session=SESSION, seq=0, prompt=prompt,
                                                seed=seed, temperature=temperature))
    # max_new_tokens and the lookahead are emulation control: they ride in the stamp.
    return [frame, _stamp(lookahead_s, float(max_new_tokens))]


def upload_message(u: Upload) -> list[bytes]:
    if u.final:
        msg = protocol.Flush(device=u.device, session=SESSION, seq=u.seq, token_index=u.token_index,
                             piggyback=u.piggyback, piggyback_probs=u.piggyback_probs)
    else:
        msg = protocol.Upload(device=u.device, session=SESSION, seq=u.seq, token_index=u.token_index,
                              draft=u.draft, piggyback=u.piggyback, payload=u.payload, llm_samples=u.llm_samples,
                              draft_prob=u.draft_prob, piggyback_probs=u.piggyback_probs)
    return [protocol.encode_frame(msg), _stamp(u.t_sent, u.t_arrive, u.retransmissions)]


def verdict_message(v: Verdict) -> list[bytes]:
    msg = protocol.Verdict(device=v.device, session=SESSION, seq=v.seq, token_index=0, token=v.token,
                           accepted=v.accepted, resampled=v.resampled, beta=v.beta, shadow_betas=v.shadow_betas)
    stamp = _stamp(v.t_sent)
    if v.llm_logits is not None:
        z = np.asarray(v.llm_logits)
        dtype = _LOGITS_DTYPES[8 if z.dtype == np.float64 else 4]
        z = np.ascontiguousarray(z, dtype=dtype).reshape(len(z), -1)
        stamp += _LOGITS.pack(dtype.itemsize, *z.shape) + z.tobytes()
    return [protocol.encode_frame(msg), stamp]


def _logits_block(block) -> np.ndarray:
    """The LLM logits a verdict's stamp carries after its fixed part (see the module docstring)."""
    if len(block) < _LOGITS.size:
        raise protocol.ProtocolError(f"verdict stamp: {len(block)} bytes after the times, expected a "
                                     f"{_LOGITS.size}-byte logits header", protocol.ErrorCode.BAD_BODY)
    size, rows, cols = _LOGITS.unpack_from(block)
    dtype = _LOGITS_DTYPES.get(size)
    if dtype is None or len(block) != _LOGITS.size + rows * cols * size:
        raise protocol.ProtocolError(f"verdict stamp: logits block of {len(block)} bytes does not match its header "
                                     f"(itemsize {size}, {rows} x {cols})", protocol.ErrorCode.BAD_BODY)
    return np.frombuffer(block, dtype=dtype, offset=_LOGITS.size).reshape(rows, cols)


def error_message(exc: protocol.ProtocolError) -> list[bytes]:
    """The ERROR reply to `exc`; never raises (an error reply must always go out)."""
    try:
        frame = protocol.encode_frame(protocol.error_reply(exc))
    except protocol.ProtocolError:  # not expected (error_reply keeps every field encodable): answer anyway
        frame = protocol.encode_frame(protocol.Error(device=0, session=0, seq=0, code=protocol.ErrorCode.INTERNAL,
                                                     message="the error reply could not be encoded"))
    return [frame, _stamp(math.nan)]


def _time(t: float) -> bool:
    """An emulated time a client may stamp: finite and not negative."""
    return math.isfinite(t) and t >= 0.0


def decode_message(parts: list[bytes]):
    """Open | device.Upload | device.Verdict | protocol.Error, or a ProtocolError (returned,
    not raised: the caller answers it and carries on)."""
    try:
        if len(parts) != PARTS:
            raise protocol.ProtocolError(f"expected [frame, stamp], got {len(parts)} parts")
        frame, stamp = parts
        # only a verdict's stamp goes on (its logits block): frame byte 3 is the message type
        longer = len(frame) > 3 and frame[3] == protocol.MsgType.VERDICT
        if len(stamp) < _STAMP.size or (len(stamp) > _STAMP.size and not longer):
            raise protocol.ProtocolError(f"stamp of {len(stamp)} bytes, expected {_STAMP.size}")
        t_sent, t_arrive, retx = _STAMP.unpack_from(stamp)
        msg = protocol.decode_frame(frame)
        logits = _logits_block(memoryview(stamp)[_STAMP.size:]) if len(stamp) > _STAMP.size else None
    except protocol.ProtocolError as exc:
        return exc
    where = dict(device=msg.device, session=msg.session, seq=msg.seq)
    if isinstance(msg, protocol.Open):
        # max_new_tokens rides in t_arrive: a whole number in [1, 2^32). The lookahead is a
        # lower bound on a gap: >= 0, and +inf for a device that never asks the LLM (slm-only).
        if not (1 <= t_arrive <= MAX_NEW_TOKENS and t_arrive == int(t_arrive)):
            return protocol.ProtocolError(f"device {msg.device}: OPEN stamp max_new_tokens {t_arrive!r} is not a "
                                          f"whole number in [1, {MAX_NEW_TOKENS}]", protocol.ErrorCode.BAD_BODY, **where)
        if not t_sent >= 0.0:  # NaN fails too
            return protocol.ProtocolError(f"device {msg.device}: OPEN stamp lookahead {t_sent!r} is not >= 0",
                                          protocol.ErrorCode.BAD_BODY, **where)
        return Open(msg.device, msg.prompt, msg.temperature, int(t_arrive), t_sent)
    if isinstance(msg, (protocol.Upload, protocol.Flush)):
        if not (_time(t_sent) and _time(t_arrive)):
            return protocol.ProtocolError(f"device {msg.device}: stamp times must be finite and >= 0, got t_sent "
                                          f"{t_sent!r}, t_arrive {t_arrive!r}", protocol.ErrorCode.BAD_BODY, **where)
        final = isinstance(msg, protocol.Flush)
        u = Upload(device=msg.device, seq=msg.seq, token_index=msg.token_index,
                   draft=-1 if final else msg.draft, draft_prob=math.nan if final else msg.draft_prob,
                   piggyback=list(msg.piggyback), piggyback_probs=list(msg.piggyback_probs),
                   payload=b"" if final else msg.payload, llm_samples=False if final else msg.llm_samples,
                   final=final, t_sent=t_sent, t_arrive=t_arrive, retransmissions=retx)
        u.frame_bytes = protocol.upload_frame_size(u)
        return u
    if isinstance(msg, protocol.Verdict):
        v = Verdict(msg.device, msg.seq, msg.token, msg.accepted, msg.resampled, msg.beta,
                    list(msg.shadow_betas), t_sent, llm_logits=logits)
        v.frame_bytes = protocol.verdict_frame_size(v)
        return v
    if isinstance(msg, protocol.Error):
        return protocol.ProtocolError(f"verifier error {msg.code}: {msg.message}")
    return protocol.ProtocolError(f"unexpected {type(msg).__name__} frame")
