"""The payload codec: what an upload says about the device's distribution x (docs/design.md section
1 step 5, section 4), as bytes. The top-k entries of x, as indices bit-packed at
ceil(log2 |V|) bits plus probabilities quantised to b_prob bits. The paper accounts
k * (b_prob + ceil(log2 |V|)) bits; we add a 12-byte header. An UPLOAD frame carries these
bytes as they are (agents.protocol); the verifier decodes them to reconstruct x_hat
(agents.speculative.reconstruct).

    offset  size  field
    0       1     magic 0x48 ('H')
    1       1     payload version (1)
    2       1     prob_bits: 8 | 16 | 32 (32 = float32, unquantised)
    3       1     form: 0 sparse | 1 bitmap | 2 dense (always the smallest, see payload_form)
    4       4     vocab_size V (u32, little-endian)
    8       4     k, the number of entries sent (u32)
    12      ...   sparse: k indices at ceil(log2 V) bits, MSB first, zero-padded to a byte,
                          then k probabilities (in the order sent)
                  bitmap: a V-bit presence mask, MSB first, zero-padded to a byte, then k
                          probabilities in vocabulary order (wins when k*ceil(log2 V) > V)
                  dense:  V probabilities in vocabulary order (k = V: a full upload needs no
                          indices)

Quantisation to b bits (8, 16): code = round_half_even(p * (2^b - 1)), value = code / (2^b - 1),
so 0 and 1 are exact and the error is at most half an LSB, 1 / (2 (2^b - 1)). 32 bits sends
float32 (round to nearest). Rounding to nearest can push the sent mass above 1 by up to k half
LSBs; the server's reconstruction tolerates that (agents.speculative.reconstruct).

Every payload has exactly one encoding: decode rejects anything encode would not produce
(wrong length, padding bits set, non-canonical form, index >= V, duplicates, NaN, a sum
above 1 + tolerance) with a PayloadError, so `encode(decode(b)) == b` whenever decode succeeds.

Anything malformed raises PayloadError (a ValueError) saying what and where; never another
exception type, never garbage. The verifier answers it with an ERROR frame of code BAD_PAYLOAD
(agents.protocol.check_upload).
"""

from __future__ import annotations

import enum
import struct
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from policies.base import PROB_BITS  # the widths a policy may choose: the codec speaks each


class PayloadError(ValueError):
    """A malformed payload, or arguments that would make one."""


PAYLOAD_MAGIC = 0x48
PAYLOAD_VERSION = 1
_PAYLOAD_HEADER = struct.Struct("<BBBBII")
PAYLOAD_HEADER_BYTES = _PAYLOAD_HEADER.size  # 12
MAX_VOCAB = 2**32 - 1
# Slack on the sent mass beyond the rounding bound: softmax outputs sum to 1 only up to
# float error. Its job is to reject garbage, not to police precision.
SUM_TOLERANCE = 1e-3
_CODE_DTYPE: dict[int, np.dtype[Any]] = {8: np.dtype("<u1"), 16: np.dtype("<u2"), 32: np.dtype("<f4")}
# Up to this k, Python ints and lists beat numpy's per-call overhead (the common CU-HLM
# case, k of a few tens); above it numpy's vectorised paths win. Both give the same bytes.
_SMALL_K = 64


class PayloadForm(enum.IntEnum):
    SPARSE = 0
    BITMAP = 1
    DENSE = 2


_FORMS = tuple(PayloadForm)


class Payload(NamedTuple):
    """A decoded payload: what the server reconstructs x_hat from."""

    indices: np.ndarray  # int64; in the order sent (sparse) or increasing (bitmap, dense)
    probs: np.ndarray  # float64, the dequantised probabilities, aligned with indices
    vocab_size: int
    prob_bits: int
    form: PayloadForm

    @property
    def k(self) -> int:
        return int(self.indices.shape[0])


def index_bits(vocab_size: int) -> int:
    """ceil(log2 V): bits per packed index."""
    return (int(vocab_size) - 1).bit_length()


def paper_bits(k: int, vocab_size: int, prob_bits: int = 8) -> int:
    """The paper's payload accounting: k * (b_prob + ceil(log2 |V|)) bits."""
    return k * (prob_bits + index_bits(vocab_size))


@lru_cache(maxsize=4096)
def _layout(k: int, vocab_size: int) -> tuple[PayloadForm, int, int]:
    """(form, bits per index, bytes saying which tokens were sent) for k of V tokens: the
    smallest form, ties to sparse. Cached: every token asks it on both sides."""
    ib = index_bits(vocab_size)
    sparse, bitmap = -(-k * ib // 8), -(-vocab_size // 8)
    if k == vocab_size:
        return PayloadForm.DENSE, ib, 0
    if bitmap < sparse:
        return PayloadForm.BITMAP, ib, bitmap
    return PayloadForm.SPARSE, ib, sparse


def payload_form(k: int, vocab_size: int) -> PayloadForm:
    """The form a k-entry payload is always sent in (the smallest)."""
    return _layout(k, vocab_size)[0]


def quantise_probs(probs, prob_bits: int = 8) -> np.ndarray:
    """The probabilities the server will see after a round trip (float64)."""
    prob_bits = _check_prob_bits(prob_bits)
    return _from_codes(_to_codes(np.asarray(probs, dtype=np.float64), prob_bits), prob_bits)


_LEVELS = {8: 255.0, 16: 65535.0}  # 2^b - 1, as floats: numpy is quicker with a float scalar


def _to_codes(probs: np.ndarray, bits: int) -> np.ndarray:
    if bits == 32:
        return probs.astype(_CODE_DTYPE[32])
    return np.rint(probs * _LEVELS[bits]).astype(_CODE_DTYPE[bits])  # round half to even


def _from_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 32:
        return codes.astype(np.float64)
    return codes / _LEVELS[bits]  # float64


def _check_prob_bits(bits) -> int:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or bits not in PROB_BITS:
        raise PayloadError(f"payload prob_bits must be one of {PROB_BITS}, got {bits!r}")
    return int(bits)


def _check_vocab(vocab_size) -> int:
    if (
        not isinstance(vocab_size, (int, np.integer))
        or isinstance(vocab_size, bool)
        or not 2 <= vocab_size <= MAX_VOCAB
    ):
        raise PayloadError(f"payload vocab_size must be an int in [2, {MAX_VOCAB}], got {vocab_size!r}")
    return int(vocab_size)


def _check_sum(codes: np.ndarray, k: int, bits: int) -> None:
    """The sent mass may exceed 1 only by float slack plus k half-LSBs of rounding.
    One rule for encode and decode, computed the same way on both sides."""
    total = sum(codes.tolist()) if k <= _SMALL_K else codes.sum(dtype=np.float64 if bits == 32 else np.int64)
    if bits == 32:
        limit = 1.0 + SUM_TOLERANCE + k * 2.0**-25  # half an ulp of a float32 below 1
        ok, shown = total <= limit, float(total)
    else:
        levels = (1 << bits) - 1  # integer codes: the test is exact
        ok, shown = total <= levels * (1.0 + SUM_TOLERANCE) + k / 2, int(total) / levels
        limit = 1.0 + SUM_TOLERANCE + k / (2 * levels)
    if not ok:
        raise PayloadError(
            f"payload probabilities sum to {shown:.6g} > {limit:.6g} "
            f"(1 + tolerance + k half-LSBs, k={k}, prob_bits={bits})"
        )


def _check_indices(idx: np.ndarray, V: int, where, signed: bool = True) -> list[int] | None:
    """Every index in [0, V) and none twice; `where(pos)` says where entry pos sits.
    signed=False skips the test for negatives (unpacked bit fields cannot be). Returns the
    indices as a Python list when k is small (the packer's fast path reuses it), else None."""
    k = idx.shape[0]
    values: list[int] | None = None
    if k <= _SMALL_K:
        values = idx.tolist()
        bad_range = k and (max(values) >= V or (signed and min(values) < 0))
    else:
        bad_range = idx.view(np.uint64).max() >= V  # a negative int64 viewed unsigned is huge
    if bad_range:
        pos = int(np.flatnonzero((idx < 0) | (idx >= V))[0])
        raise PayloadError(f"payload index {pos} ({where(pos)}) is {int(idx[pos])}, outside [0, {V})")
    if values is not None:  # k <= _SMALL_K
        bad_dup = len(set(values)) != k
    elif V <= 64 * k:  # a presence mask costs O(V), cheaper than sorting many indices
        mask = np.zeros(V, dtype=np.bool_)
        mask[idx] = True
        bad_dup = int(np.count_nonzero(mask)) != k
    else:
        s = np.sort(idx)
        bad_dup = bool((s[1:] == s[:-1]).any())
    if bad_dup:
        seen: set[int] = set()
        for pos, i in enumerate(idx.tolist()):
            if i in seen:
                raise PayloadError(f"payload index {pos} ({where(pos)}) repeats token {i}")
            seen.add(i)
    return values


def _check_unit_interval(p: np.ndarray, where) -> float | None:
    """Every probability in [0, 1] (NaN is not). Returns their sum when it came for free
    (small k), else None."""
    total = None
    if p.shape[0] <= _SMALL_K:
        values = p.tolist()
        total = sum(values)
        ok = not values or (0.0 <= min(values) and max(values) <= 1.0 and total == total)  # NaN != NaN
    else:
        ok = p.min() >= 0.0 and p.max() <= 1.0  # a NaN makes both comparisons fail
    if not ok:
        pos = int(np.flatnonzero(~((p >= 0.0) & (p <= 1.0)))[0])
        raise PayloadError(f"payload probability {pos} ({where(pos)}) is {float(p[pos])!r}, outside [0, 1]")
    return total


@lru_cache(maxsize=64)
def _bit_shifts(ib: int) -> np.ndarray:
    return np.arange(ib - 1, -1, -1, dtype=np.int64)  # MSB first


@lru_cache(maxsize=64)
def _bit_weights(ib: int) -> np.ndarray:
    return np.left_shift(1, _bit_shifts(ib))


def _pack_indices(idx: np.ndarray, ib: int, values: list[int] | None = None) -> bytes:
    """k indices as one big-endian bit string of k*ib bits, zero-padded to whole bytes.
    `values`: the same indices as a list, when small k makes Python ints the faster way."""
    k = idx.shape[0]
    nbytes = -(-k * ib // 8)
    if values is not None:
        acc = 0
        for i in values:
            acc = (acc << ib) | i
        return (acc << (nbytes * 8 - k * ib)).to_bytes(nbytes, "big")
    return np.packbits(((idx[:, None] >> _bit_shifts(ib)) & 1).astype(np.uint8)).tobytes()


def _unpack_indices(region: np.ndarray, k: int, ib: int) -> np.ndarray:
    return np.unpackbits(region, count=k * ib).reshape(k, ib).dot(_bit_weights(ib))  # int64


def encode_payload(indices, probs, vocab_size: int, prob_bits: int = 8) -> bytes:
    """Encode k (index, probability) pairs of a V-token distribution.

    indices: distinct ints in [0, V); probs: floats in [0, 1], same length, summing to at
    most 1 (+ tolerance, see _check_sum). Raises PayloadError otherwise.
    """
    V = _check_vocab(vocab_size)
    prob_bits = _check_prob_bits(prob_bits)
    idx, p = np.asarray(indices), np.asarray(probs, dtype=np.float64)
    if idx.ndim != 1 or p.ndim != 1 or idx.shape[0] != p.shape[0]:
        raise PayloadError(
            f"payload indices and probs must be 1-D and equally long, got shapes {idx.shape} and {p.shape}"
        )
    k = idx.shape[0]
    if k > V:
        raise PayloadError(f"payload has k={k} entries > vocab_size {V}")
    if k and idx.dtype.kind not in "iu":
        raise PayloadError(f"payload indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    values = _check_indices(idx, V, lambda pos: "as given")
    mass = _check_unit_interval(p, lambda pos: "as given")
    codes = _to_codes(p, prob_bits)
    # Each code is within half an LSB (float32: a relative 2^-24) of its probability, so a
    # mass clearly inside the bound stays inside after rounding: the exact check can only pass.
    if mass is None or mass > 1.0 + SUM_TOLERANCE - 1e-6:
        _check_sum(codes, k, prob_bits)
    form, ib, _ = _layout(k, V)
    header = _PAYLOAD_HEADER.pack(PAYLOAD_MAGIC, PAYLOAD_VERSION, prob_bits, form, V, k)
    if form == PayloadForm.SPARSE:
        return b"".join((header, _pack_indices(idx, ib, values), codes.tobytes()))
    if form == PayloadForm.BITMAP:
        mask = np.zeros(V, dtype=np.uint8)
        mask[idx] = 1
        return b"".join((header, np.packbits(mask).tobytes(), codes[np.argsort(idx)].tobytes()))
    dense = np.empty(V, dtype=codes.dtype)
    dense[idx] = codes
    return header + dense.tobytes()


def decode_payload_ex(data) -> Payload:
    """Decode and validate a payload; the full record including prob_bits and form."""
    n = len(data)
    if n < PAYLOAD_HEADER_BYTES:
        raise PayloadError(f"payload is {n} bytes, shorter than its {PAYLOAD_HEADER_BYTES}-byte header")
    magic, version, bits, form, V, k = _PAYLOAD_HEADER.unpack_from(data)
    if magic != PAYLOAD_MAGIC:
        raise PayloadError(f"payload byte 0 (magic) is {magic:#04x}, expected {PAYLOAD_MAGIC:#04x}")
    if version != PAYLOAD_VERSION:
        raise PayloadError(f"payload byte 1 (version) is {version}, this side speaks {PAYLOAD_VERSION}")
    if bits not in PROB_BITS:
        raise PayloadError(f"payload byte 2 (prob_bits) is {bits}, expected one of {PROB_BITS}")
    if V < 2:
        raise PayloadError(f"payload bytes 4-7 (vocab_size) are {V}, expected >= 2")
    if k > V:
        raise PayloadError(f"payload bytes 8-11 (k) are {k} > vocab_size {V}")
    expected_form, ib, where_bytes = _layout(k, V)
    if form != expected_form:
        raise PayloadError(
            f"payload byte 3 (form) is {form}, but k={k} of vocab_size {V} is always sent "
            f"{expected_form.name.lower()} ({expected_form.value})"
        )
    off = PAYLOAD_HEADER_BYTES + where_bytes
    if n != off + k * bits // 8:
        raise PayloadError(
            f"payload is {n} bytes, its header (k={k}, vocab_size={V}, prob_bits={bits}) says {off + k * bits // 8}"
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    region = buf[PAYLOAD_HEADER_BYTES:off]
    if form == PayloadForm.SPARSE:
        _check_padding(data, where_bytes * 8 - k * ib, off - 1, "index")
        idx = _unpack_indices(region, k, ib)
        _check_indices(idx, V, lambda pos: f"bits {PAYLOAD_HEADER_BYTES * 8 + pos * ib}..", signed=False)
    elif form == PayloadForm.BITMAP:
        _check_padding(data, where_bytes * 8 - V, off - 1, "bitmap")
        idx = np.flatnonzero(np.unpackbits(region, count=V))
        if idx.shape[0] != k:
            raise PayloadError(
                f"payload bitmap (bytes {PAYLOAD_HEADER_BYTES}..{off - 1}) marks {idx.shape[0]} tokens, header k is {k}"
            )
    else:
        idx = np.arange(V, dtype=np.int64)
    codes = buf[off:].view(_CODE_DTYPE[bits])
    if bits == 32:
        _check_unit_interval(codes, lambda pos: f"byte {off + 4 * pos}")
    _check_sum(codes, k, bits)
    return Payload(idx, _from_codes(codes, bits), V, bits, _FORMS[form])


def _check_padding(data, pad: int, last: int, what: str) -> None:
    """The pad bits after the last packed bit must be zero: one encoding per payload."""
    if pad and data[last] & ((1 << pad) - 1):
        raise PayloadError(f"payload {what} padding bits in byte {last} are not zero")


def decode_payload(data) -> tuple[np.ndarray, np.ndarray, int]:
    """(indices int64, probs float64, vocab_size); decode_payload_ex also gives prob_bits."""
    p = decode_payload_ex(data)
    return p.indices, p.probs, p.vocab_size
