"""Payload codec: round trips, exact sizes, strict validation, fuzzing (nothing but
PayloadError may come out of a decoder, whatever the bytes)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agents import codec as C
from agents.codec import PayloadError, decode_payload, decode_payload_ex, encode_payload

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- payload: valid inputs ----------------------------------------------------------------------


@st.composite
def payload_inputs(draw):
    """(indices, probs, V, bits) covering all three forms and the edges of V."""
    V = draw(st.one_of(st.integers(2, 40), st.integers(2, 5000), st.sampled_from([151936, 2**20 + 1, 2**32 - 1])))
    k = draw(st.one_of(st.integers(0, min(V, 300)), st.just(V) if V <= 300 else st.just(0)))
    bits = draw(st.sampled_from(C.PROB_BITS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    indices = rng.choice(V, size=k, replace=False) if V <= 10**6 else np.unique(rng.integers(0, V, size=k))
    k = len(indices)
    probs = rng.dirichlet(np.full(k + 1, draw(st.sampled_from([0.05, 1.0]))))[:k] if k else np.zeros(0)
    if k and draw(st.booleans()):
        probs = probs / probs.sum()  # the full mass, as a k = V upload sends
    if k == 1 and draw(st.booleans()):
        probs = np.array([1.0])
    return indices, probs, V, bits


def formula_size(k, V, bits):
    """Independent statement of the size formula: header + where + k probabilities."""
    ib = math.ceil(math.log2(V))
    where = 0 if k == V else min(math.ceil(k * ib / 8), math.ceil(V / 8))
    return 12 + where + k * bits // 8


@FUZZ
@given(payload_inputs())
def test_payload_round_trip(case):
    indices, probs, V, bits = case
    data = encode_payload(indices, probs, V, bits)
    k = len(indices)
    assert len(data) == formula_size(k, V, bits)
    assert len(data) <= C.paper_bits(k, V, bits) / 8 + 16
    out = decode_payload_ex(data)
    assert (out.vocab_size, out.prob_bits, out.k) == (V, bits, k)
    assert out.indices.dtype == np.int64 and out.probs.dtype == np.float64
    if out.form == C.PayloadForm.SPARSE:
        assert out.indices.tolist() == list(indices)  # order kept
        sent = probs
    else:
        order = np.argsort(indices)
        assert out.indices.tolist() == np.asarray(indices)[order].tolist()
        sent = probs[order]
    if bits == 32:
        assert out.probs.tolist() == sent.astype(np.float32).astype(np.float64).tolist()
    else:
        assert np.all(np.abs(out.probs - sent) <= 0.5 / (2**bits - 1) + 1e-15)  # half an LSB
    aligned = dict(zip(np.asarray(indices).tolist(), C.quantise_probs(probs, bits).tolist()))
    assert [aligned[i] for i in out.indices.tolist()] == out.probs.tolist()
    assert encode_payload(out.indices, out.probs, V, bits) == data  # canonical
    indices3, probs3, vocab3 = decode_payload(data)
    assert vocab3 == V and indices3.tolist() == out.indices.tolist()


@pytest.mark.parametrize(
    "V,k,form",
    [
        (151936, 30, "SPARSE"),
        (151936, 8440, "SPARSE"),
        (151936, 8441, "BITMAP"),
        (151936, 151936, "DENSE"),
        (16, 4, "SPARSE"),
        (16, 5, "BITMAP"),
    ],
)
def test_payload_picks_the_smallest_form(V, k, form):
    assert C.payload_form(k, V).name == form
    rng = np.random.default_rng(0)
    indices = rng.choice(V, size=k, replace=False)
    data = encode_payload(indices, np.full(k, 1.0 / V), V)
    assert decode_payload_ex(data).form.name == form
    assert len(data) == formula_size(k, V, 8)


def test_payload_header_is_small_and_documented():
    data = encode_payload([5, 1], [0.5, 0.25], 100, 16)
    assert C.PAYLOAD_HEADER_BYTES == 12 <= 16
    assert data[:4] == bytes([0x48, 1, 16, 0]) and struct.unpack_from("<II", data, 4) == (100, 2)
    # indices at 7 bits MSB first: 0000101 0000001 + 2 pad bits; then u16 probabilities
    assert data[12:14] == bytes([0b00001010, 0b00000100])
    assert struct.unpack_from("<2H", data, 14) == (round(0.5 * 65535), round(0.25 * 65535))


def test_quantisation_rounds_half_to_even_and_keeps_0_and_1_exact():
    assert C.quantise_probs([0.0, 1.0], 8).tolist() == [0.0, 1.0]
    assert C.quantise_probs([0.5 / 255, 1.5 / 255], 8).tolist() == [0.0, 2 / 255]


# --- payload: invalid inputs and data -------------------------------------------------------------


@pytest.mark.parametrize(
    "args,match",
    [
        (([1, 1], [0.1, 0.1], 10), "repeats token 1"),
        (([10], [0.1], 10), r"outside \[0, 10\)"),
        (([-1], [0.1], 10), r"outside \[0, 10\)"),
        (([1], [1.5], 10), r"outside \[0, 1\]"),
        (([1], [-0.1], 10), r"outside \[0, 1\]"),
        (([1, 2], [np.nan, 0.1], 10), r"outside \[0, 1\]"),
        (([1, 2], [0.7, 0.7], 10), "sum to"),
        (([1], [0.1, 0.2], 10), "equally long"),
        (([1.0], [0.1], 10), "integers"),
        (([1], [0.1], 1), "vocab_size"),
        (([1], [0.1], 2**32), "vocab_size"),
        ((list(range(11)), [0.01] * 11, 10), "k=11"),
    ],
)
def test_encode_payload_rejects_bad_input(args, match):
    with pytest.raises(PayloadError, match=match):
        encode_payload(*args)


def test_encode_payload_rejects_bad_bits():
    for bits in (4, 8.0, True, "8"):
        with pytest.raises(PayloadError, match="prob_bits"):
            encode_payload([1], [0.5], 10, bits)


def test_encode_payload_checks_large_inputs_too():
    V = 5000
    idx = np.arange(200)
    with pytest.raises(PayloadError, match="repeats token 0"):
        encode_payload(np.r_[idx, 0], np.full(201, 0.001), V)
    bad = np.full(200, 0.001)
    bad[150] = np.nan
    with pytest.raises(PayloadError, match="probability 150"):
        encode_payload(idx, bad, V)


def _bits7(indices, pad="000") -> bytes:
    """Indices at 7 bits (V = 100), MSB first, then the pad bits: written out by hand."""
    return int("".join(format(i, "07b") for i in indices) + pad, 2).to_bytes(3, "big")


def _payload_with(header_changes: dict, body: bytes | None = None) -> bytes:
    data = bytearray(encode_payload([5, 1, 7], [0.5, 0.25, 0.125], 100, 8))
    for offset, value in header_changes.items():
        data[offset] = value
    return bytes(data) if body is None else bytes(data[:12]) + body


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "shorter than its 12-byte header"),
        (_payload_with({0: 0x49}), "magic"),
        (_payload_with({1: 2}), "version"),
        (_payload_with({2: 12}), "prob_bits"),
        (_payload_with({3: 1}), "form"),
        (_payload_with({8: 4}), "header"),
        (_payload_with({}) + b"\0", "19 bytes, its header .* says 18"),
        (_payload_with({})[:-1], "17 bytes, its header"),
        (_payload_with({}, _bits7([5, 1, 7], pad="111") + bytes(3)), "padding bits in byte 14"),
        (_payload_with({}, _bits7([5, 120, 7]) + bytes(3)), "index 1 .* is 120, outside"),
        (_payload_with({}, _bits7([5, 1, 5]) + bytes(3)), "index 2 .* repeats token 5"),
        (_payload_with({}, _bits7([5, 1, 7]) + bytes([200, 200, 0])), "sum to"),
    ],
)
def test_decode_payload_rejects_bad_data(data, match):
    with pytest.raises(PayloadError, match=match):
        decode_payload(data)


def test_decode_payload_rejects_nan_and_out_of_range_float32():
    good = bytearray(encode_payload([2, 3], [0.5, 0.25], 10, 32))
    for value in (float("nan"), 1.5, -0.25, float("inf")):
        bad = bytearray(good)
        struct.pack_into("<f", bad, len(bad) - 4, value)
        with pytest.raises(PayloadError, match="probability 1"):
            decode_payload(bytes(bad))


def _decodes_consistently(data: bytes) -> None:
    """Either a clear PayloadError, or a payload that satisfies every invariant and re-encodes
    to exactly the same bytes."""
    try:
        out = decode_payload_ex(data)
    except PayloadError:
        return
    V, k = out.vocab_size, out.k
    assert len(set(out.indices.tolist())) == k and (k == 0 or 0 <= out.indices.min() <= out.indices.max() < V)
    assert np.all((out.probs >= 0) & (out.probs <= 1))
    assert out.probs.sum() <= 1 + C.SUM_TOLERANCE + k * 0.5 / (2**out.prob_bits - 1) + 1e-9
    assert encode_payload(out.indices, out.probs, V, out.prob_bits) == data


@FUZZ
@given(st.binary(max_size=300))
def test_decode_payload_fuzz_arbitrary_bytes(data):
    _decodes_consistently(data)


@FUZZ
@given(st.integers(2, 64), st.integers(0, 64), st.sampled_from(C.PROB_BITS), st.data())
def test_decode_payload_fuzz_right_length_random_body(V, k, bits, data):
    """A valid header over random bytes of the right length reaches every body check."""
    k = min(k, V)
    header = struct.pack("<BBBBII", 0x48, 1, bits, C.payload_form(k, V), V, k)
    size = formula_size(k, V, bits) - 12
    body = data.draw(st.binary(min_size=size, max_size=size))
    _decodes_consistently(header + body)


@FUZZ
@given(payload_inputs(), st.data())
def test_decode_payload_fuzz_mutations(case, data):
    valid = encode_payload(*case)
    kind = data.draw(st.sampled_from(["truncate", "extend", "flip", "overwrite"]))
    if kind == "truncate":
        mutated = valid[: data.draw(st.integers(0, len(valid) - 1))]
    elif kind == "extend":
        mutated = valid + data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "flip":
        buf = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 3))):
            bit = data.draw(st.integers(0, len(buf) * 8 - 1))
            buf[bit // 8] ^= 1 << (bit % 8)
        mutated = bytes(buf)
    else:
        pos = data.draw(st.integers(0, len(valid) - 1))
        mutated = valid[:pos] + bytes([data.draw(st.integers(0, 255))]) + valid[pos + 1 :]
    _decodes_consistently(mutated)


@FUZZ
@given(st.integers(0, 64), st.integers(1, 32), st.integers(0, 2**32 - 1))
def test_python_and_numpy_index_packing_agree(k, ib, seed):
    idx = np.random.default_rng(seed).integers(0, 2**ib, size=k)
    assert C._pack_indices(idx, ib, idx.tolist()) == C._pack_indices(idx, ib)


@FUZZ
@given(st.integers(1, 64), st.sampled_from(C.PROB_BITS), st.floats(0.99, 1.1), st.integers(0, 2**32 - 1))
def test_encode_accepts_exactly_what_the_sum_rule_accepts(k, bits, mass, seed):
    """encode skips the exact sum check when the float mass is clearly inside the bound; it
    must accept precisely the payloads the exact rule (the decoder's) accepts."""
    probs = np.random.default_rng(seed).dirichlet(np.ones(k)) * mass
    assume(probs.max() <= 1.0)
    try:
        C._check_sum(C._to_codes(probs, bits), k, bits)
        exact_ok = True
    except PayloadError:
        exact_ok = False
    try:
        encode_payload(np.arange(k), probs, 1000, bits)
        assert exact_ok
    except PayloadError:
        assert not exact_ok
