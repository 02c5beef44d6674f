"""The actors' clocks (docs/design.md section 2), one code path:

- virtual: uploads carry the emulated arrival the link model computed; the verifier releases a
  batch only when no earlier arrival can still come (VerifierCore.next_batch).
- wall: emulated time = (real time - t0) * time_scale. Groups sleep until a device's emulated time
  before drafting and hold each message until its emulated arrival; the verifier stamps arrivals
  with the real clock, releases batches when the clock reaches their start, and holds verdicts
  until the emulated verification ends.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

POLL_MS = 50  # the longest a serving loop blocks on its socket


def poll_ms(seconds: float | None) -> int:
    """A poll timeout (ms) for `seconds` from now, at most POLL_MS."""
    return POLL_MS if seconds is None else min(POLL_MS, math.ceil(seconds * 1000))


@dataclass(frozen=True)
class ClockParams:
    kind: str = "virtual"  # virtual | wall
    time_scale: float = 1.0  # emulated seconds per real second (wall only)
    t0: float = 0.0  # real time (time.time()) of emulated zero (wall only)

    def now(self) -> float:
        return (time.time() - self.t0) * self.time_scale

    def ms_until(self, t: float, cap: int = POLL_MS) -> int:
        """Real milliseconds until emulated time t (0 if past, at most `cap`)."""
        if math.isinf(t):
            return cap
        return max(0, min(cap, math.ceil((self.t0 + t / self.time_scale - time.time()) * 1000)))

    def shaped(self, sock):
        """The wall clock's delivery schedule for a socket (netem's shaped transport, fed
        with arrival times the devices' link models already computed)."""
        from netem.transport import ShapedSender, zmq_deliver

        return ShapedSender(zmq_deliver(sock), time_scale=1.0 / self.time_scale, epoch=self.t0, clock=time.time)
