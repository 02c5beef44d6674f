"""Quantisers for uploaded probabilities (DESIGN.md section 1, step 5; b_prob = 8 by default).

bits = 8 or 16: uniform quantisation of [0, 1] to L = 2^bits - 1 steps, rounding to
nearest, halves to even (numpy's rint; the same codes agents.protocol produces):
q = rint(p * L), p_hat = q / L, |p_hat - p| <= 1 / (2L). Inputs are clipped to [0, 1] first.

bits = 32 ("none"): the float32 value itself, as its IEEE-754 bit pattern in a uint32 so
every quantiser yields integers of `bits` bits for the codec. |p_hat - p| <= 2^-25 on [0, 1]
(exact for float32 input).

Not sum-preserving: each entry is rounded on its own, so k quantised entries may sum to
up to k / (2L) more or less than the originals. Whoever reconstructs xhat (DESIGN.md step 6)
spreads 1 - sum(p_hat) over the unsent tokens and must clip that remainder at 0. An entry
below 1 / (2L) becomes 0 (even the draft's), which the verifier must also tolerate.
"""
from __future__ import annotations

import numpy as np

PROB_BITS = (8, 16, 32)
_DTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32}


def _check_bits(bits: int) -> None:
    if bits not in _DTYPES:
        raise ValueError(f"prob_bits must be one of {PROB_BITS} (32 = no quantisation), got {bits!r}")


def quantise(probs, bits: int = 8) -> np.ndarray:
    """Probabilities in [0, 1] -> unsigned integers of `bits` bits (uint8/uint16/uint32)."""
    _check_bits(bits)
    p = np.asarray(probs, dtype=np.float64)
    if np.isnan(p).any():
        raise ValueError("cannot quantise NaN probabilities")
    p = np.clip(p, 0.0, 1.0)
    if bits == 32:
        return p.astype(np.float32).view(np.uint32)
    levels = (1 << bits) - 1
    return np.rint(p * levels).astype(_DTYPES[bits])


def dequantise(q, bits: int = 8) -> np.ndarray:
    """Integers from `quantise` -> probabilities (float64)."""
    _check_bits(bits)
    q = np.asarray(q)
    if bits == 32:
        return q.astype(np.uint32).view(np.float32).astype(np.float64)
    return q.astype(np.float64) / ((1 << bits) - 1)


def max_error(bits: int) -> float:
    """Largest |dequantise(quantise(p)) - p| over p in [0, 1]."""
    _check_bits(bits)
    return 2.0**-25 if bits == 32 else 0.5 / ((1 << bits) - 1)
