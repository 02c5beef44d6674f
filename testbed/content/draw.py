"""Which recorded sequence each device of a tier replays (TierContent.draw; docs/design.md section 8).

Every draw is a pure function of the seed and the device ids, vectorised (a million devices take
milliseconds), so a device replays the same sequence in any layout, partition and engine.
"""

from __future__ import annotations

import numpy as np

from testbed.content.library import LibraryError, Pool

DRAWS = ("random", "no-replacement", "recorded")


def _mix(seed: int, ids: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of (seed, salt, id): 64 well-mixed bits per device id."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt) * np.uint64(0xD1B54A32D192ED03)
        z = z + ids.astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def draw(pool: Pool, device_ids: np.ndarray, seed: int, mode: str, tier: str = "") -> np.ndarray:
    """The pool's sequence index for each device of one tier (`device_ids`, increasing).

    random: uniform with replacement, from (seed, device id) alone. no-replacement: the tier's devices
    sorted by (seed, device id) hash take the sequences in order, so each is used once before any is
    used twice (a tier of up to len(pool) devices replays distinct sequences). recorded: the sequence
    that the device of the same id recorded (a run's own recording replays its exact trace)."""
    ids = np.asarray(device_ids, dtype=np.int64)
    n = len(pool)
    if mode == "random":
        return (_mix(seed, ids, 1) % np.uint64(n)).astype(np.int64)
    if mode == "no-replacement":
        order = np.argsort(_mix(seed, ids, 2), kind="stable")
        out = np.empty(len(ids), dtype=np.int64)
        out[order] = np.arange(len(ids)) % n
        return out
    if mode == "recorded":
        recorded = pool.recorded_device
        unique, counts = np.unique(recorded, return_counts=True)
        if (counts > 1).any():
            d, times = int(unique[counts > 1][0]), int(counts[counts > 1][0])
            raise LibraryError(
                f"tier {tier}: draw: recorded needs one recording of each device, but device {d} of policy "
                f"{pool.label} was recorded {times} times (recordings {sorted(set(pool.recording))})"
            )
        where = {int(d): s for s, d in enumerate(recorded)}
        missing = [int(d) for d in ids if int(d) not in where]
        if missing:
            raise LibraryError(
                f"tier {tier}: draw: recorded, but device {missing[0]} "
                f"({len(missing)} of the tier's {len(ids)} devices) "
                f"has no sequence of policy {pool.label} in the library (it holds devices "
                f"{int(recorded.min())}..{int(recorded.max())})"
            )
        return np.array([where[int(d)] for d in ids], dtype=np.int64)
    raise LibraryError(f"unknown draw {mode!r}; expected one of {', '.join(DRAWS)}")
