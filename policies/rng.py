"""Random draws keyed by (seed, device, token index, purpose).

Token content must not depend on timing or placement (docs/design.md section 2): every draw
comes from a generator derived from these four numbers alone, so the same scenario and
seed give the same tokens however devices are spread over actors.
"""

from __future__ import annotations

import zlib

import numpy as np

# Stable small integers per purpose; a new purpose gets a new name, never a reused one.
PURPOSES = ("draft", "uncertainty", "skip", "verify", "llm_sample", "link", "prompt")


def purpose_id(purpose: str) -> int:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown rng purpose {purpose!r}; known: {', '.join(PURPOSES)}")
    return zlib.crc32(purpose.encode())


def keyed_rng(seed: int, device: int, token_index: int, purpose: str) -> np.random.Generator:
    """A generator that depends only on (seed, device, token_index, purpose)."""
    # Philox is counter-based: keying it is cheap and streams for distinct keys are independent.
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(device), int(token_index), purpose_id(purpose)])
    return np.random.Generator(np.random.Philox(ss))
