"""Where the real time of a run goes: named wall-clock totals (seconds, calls, items) per actor.

Cheap enough to stay on (one perf_counter pair per use). Names are "<role>.<phase>", e.g.
"slm.prefill", "slm.decode", "llm.prefill", "llm.verify_forward", "policy", "codec", "verify_math",
"transport"; `items` counts tokens (forwards) or requests, so rates come out of the same record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class Timings:
    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}  # name -> [seconds, calls, items]

    def add(self, name: str, seconds: float, items: int = 0) -> None:
        t = self.totals.setdefault(name, [0.0, 0, 0])
        t[0] += seconds
        t[1] += 1
        t[2] += items

    @contextmanager
    def __call__(self, name: str, items: int = 0) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0, items)

    def snapshot(self) -> dict[str, dict]:
        return {k: {"seconds": v[0], "calls": int(v[1]), "items": int(v[2])} for k, v in sorted(self.totals.items())}


def merge(*snapshots: Mapping[str, Mapping]) -> dict[str, dict]:
    """Sum snapshots of several actors (e.g. every device group) name by name."""
    out: dict[str, dict] = {}
    for snap in snapshots:
        for name, v in snap.items():
            o = out.setdefault(name, {"seconds": 0.0, "calls": 0, "items": 0})
            for key in o:
                o[key] += v[key]
    return out
