"""Wall-clock shaped transport: real sends that really wait for the link model.

    sender = ShapedSender(deliver, link, time_scale=1.0)
    sender.send(msg)           # -> real due time (clock seconds), or None if the link lost it

`deliver(msg)` is what really sends, e.g. `zmq_deliver(socket)`. The message size the link
sees is `size(msg)` (default: total bytes of a bytes object or a list of frames). Each message
goes through `Link.send(size, t_emulated)` at the moment `send()` is called and is delivered
when the model says it arrives: rate, queueing, delay and jitter are real waiting; a lost
message is never delivered (the runtime's retransmission handles it); a duplicated one is
delivered twice. Messages due at the same time go out in the order they were sent.

Emulated time: t = (clock() - epoch) / time_scale, i.e. `time_scale` real seconds per emulated
second (2.0 = everything twice as slow as in reality); a message due at emulated time a is
delivered at real time epoch + a * time_scale. Give several senders the same `epoch` so
traces and channels line up across devices.

One sender may serve many links: `send(msg, link=other)` (e.g. a verifier's ROUTER socket with
one downlink Link per device). Nothing ever blocks waiting for a link; the caller picks who runs
`deliver`, which matters because ZeroMQ sockets must not be used from two threads at once:

- caller-driven (default): `send()` delivers whatever is already due, then returns; call
  `flush()` when `timeout()` seconds have passed (e.g. `poller.poll(timeout * 1000)`).
- `attach(loop)`: asyncio. Each pending message gets a `loop.call_at` timer that runs
  `flush()` on the loop; `send()` must be called on the loop's thread. The loop never sleeps
  in here, so other tasks and sends keep running while messages wait.
- `start()`: a background thread runs `flush()` at each due time; `deliver` runs on that
  thread, so give it a socket only this sender uses.

`set_profile(profile, link=None)` changes a link's profile from now on (O(1), thread-safe);
messages already scheduled keep their times. `stats()` reports counts and lateness: how far
behind their due times messages were delivered (the wall clock's lag when this machine
cannot keep up). `close()` stops the thread/timers and drops what is still pending;
`drain(timeout)` first waits (blocking; not for use on an event loop) until nothing is pending.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from netem.link import Link
from netem.profile import LinkProfile

if TYPE_CHECKING:
    import zmq

log = logging.getLogger(__name__)
_EPS = 1e-9  # due within a nanosecond counts as due (float rounding of epoch + t * scale)
# What is shaped: bytes-like, or a list/tuple of frames (a multipart message). Anything works that
# the deliver function takes and `size` measures, hence Any.
Message = Any


def message_size(msg: Message) -> int:
    """Bytes of a bytes-like message or of a list/tuple of frames."""
    if isinstance(msg, (list, tuple)):
        return sum(len(f) for f in msg)
    return len(msg)


def zmq_deliver(socket: zmq.Socket[Any], flags: int = 0, copy: bool = True) -> Callable[[Message], None]:
    """A deliver function for a pyzmq socket: lists/tuples go as multipart messages.
    (copy=True is faster for small messages; pass copy=False for large zero-copy buffers.)"""

    def deliver(msg: Message) -> None:
        if isinstance(msg, (list, tuple)):
            socket.send_multipart(msg, flags=flags, copy=copy)
        else:
            socket.send(msg, flags=flags, copy=copy)

    return deliver


class ShapedSender:
    """Deliver messages when their Link says they arrive. See the module docstring."""

    def __init__(
        self,
        deliver: Callable[[Message], None],
        link: Link | None = None,
        *,
        time_scale: float = 1.0,
        epoch: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        size: Callable[[Message], int] = message_size,
    ):
        if not time_scale > 0:
            raise ValueError(f"time_scale: expected real seconds per emulated second > 0, got {time_scale!r}")
        self.link = link
        self.time_scale = float(time_scale)
        self.clock = clock
        self.epoch = clock() if epoch is None else float(epoch)
        self._deliver = deliver
        self._size = size
        self._heap: list[tuple[float, int, Message]] = []  # (due real time, sequence, message)
        self._seq = itertools.count()
        self._cv = threading.Condition(threading.Lock())  # never re-entered; a plain lock is cheaper
        self._mode = "caller"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._counts: dict[str, int] = {
            "sent": 0,
            "dropped": 0,
            "delivered": 0,
            "duplicates": 0,
            "deliver_errors": 0,
            "late_over_1ms": 0,
        }
        self._late_max = 0.0
        self._late_sum = 0.0

    # -- time ---------------------------------------------------------------------------

    def now(self) -> float:
        """Emulated time now."""
        return (self.clock() - self.epoch) / self.time_scale

    # -- sending ------------------------------------------------------------------------

    def send(self, msg: Message, link: Link | None = None) -> float | None:
        """Schedule msg through `link` (default: the sender's link). Returns its real due time
        (first copy), or None when the link model lost it."""
        link = link or self.link
        if link is None:
            raise ValueError("send: no link given and the sender has no default link")
        with self._cv:
            arrivals = link.transmit(self._size(msg), (self.clock() - self.epoch) / self.time_scale)
        return self.schedule(msg, arrivals)

    def schedule(self, msg: Message, arrivals: Sequence[float]) -> float | None:
        """Deliver msg at each emulated arrival time given (a caller that already ran the link
        model, e.g. the runtime, whose devices compute arrivals in both clocks). An empty list
        is a lost message. Returns the real due time of the first copy, or None."""
        counts = self._counts
        with self._cv:
            if self._closed:
                raise RuntimeError("send on a closed ShapedSender")
            now = self.clock()
            counts["sent"] += 1
            if not arrivals:
                counts["dropped"] += 1
                return None
            first = self.epoch + arrivals[0] * self.time_scale
            # Already due, nothing queued before it, and we may deliver on this thread: send now.
            direct = self._mode != "thread" and not self._heap and len(arrivals) == 1 and first <= now + _EPS
            if not direct:
                counts["duplicates"] += len(arrivals) - 1
                earliest_before = self._heap[0][0] if self._heap else None
                for a in arrivals:
                    due = self.epoch + a * self.time_scale
                    heapq.heappush(self._heap, (due, next(self._seq), msg))
                    if self._mode == "loop":
                        self._schedule_timer(due)
                if self._mode == "thread" and (earliest_before is None or first < earliest_before):
                    self._cv.notify()
        if direct:
            self._deliver_all([(first, msg)], now)
        elif self._mode != "thread":
            self.flush()
        return first

    def set_profile(self, profile: LinkProfile, link: Link | None = None) -> None:
        """Switch a link's profile for every later send."""
        link = link or self.link
        if link is None:
            raise ValueError("set_profile: no link given and the sender has no default link")
        with self._cv:
            link.set_profile(profile)

    def timeout(self) -> float | None:
        """Seconds until the next message is due (0 if overdue), None when nothing is pending."""
        with self._cv:
            if not self._heap:
                return None
            return max(0.0, self._heap[0][0] - self.clock())

    @property
    def pending(self) -> int:
        return len(self._heap)

    def flush(self) -> int:
        """Deliver every message due by now; returns how many were delivered."""
        with self._cv:
            now = self.clock()
            due = self._pop_due(now)
        return self._deliver_all(due, now) if due else 0

    # -- drivers ------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> ShapedSender:
        """Drive delivery from an asyncio loop (send() must then run on the loop's thread)."""
        with self._cv:
            self._mode, self._loop = "loop", loop
            for due, _, _ in self._heap:
                self._schedule_timer(due)
        return self

    def start(self) -> ShapedSender:
        """Drive delivery from a background thread."""
        with self._cv:
            if self._thread is not None:
                return self
            self._mode = "thread"
            self._thread = threading.Thread(target=self._run, name="netem-shaped-sender", daemon=True)
            self._thread.start()
        return self

    def drain(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending (True) or `timeout` seconds passed (False)."""
        end = None if timeout is None else self.clock() + timeout
        while True:
            wait = self.timeout()
            if wait is None:
                return True
            if end is not None and self.clock() >= end:
                return False
            if self._mode == "thread":
                time.sleep(min(wait, 0.01) or 0.0005)
            else:
                time.sleep(wait)
                self.flush()

    def close(self) -> None:
        """Stop the driver and drop anything still pending."""
        with self._cv:
            self._closed = True
            self._heap.clear()  # timers still set on a loop find nothing to do
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def stats(self) -> dict[str, float]:
        """Counts, pending messages and delivery lateness (seconds behind the due time)."""
        with self._cv:
            out: dict[str, float] = dict(self._counts)
            out["pending"] = len(self._heap)
            out["late_max_s"] = self._late_max
            out["late_mean_s"] = self._late_sum / out["delivered"] if out["delivered"] else 0.0
        return out

    # -- internals ----------------------------------------------------------------------

    def _pop_due(self, now: float) -> list[tuple[float, Message]]:
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now + _EPS:
            due, _, msg = heapq.heappop(heap)
            out.append((due, msg))
        return out

    def _deliver_all(self, items: list[tuple[float, Message]], now: float) -> int:
        # Runs on the one delivering thread (caller, loop or worker), so the delivery counters
        # have a single writer and need no lock.
        counts = self._counts
        n = 0
        for due, msg in items:
            try:
                self._deliver(msg)
            except Exception as e:  # a failing socket must not kill the driver; count and log it
                counts["deliver_errors"] += 1
                log.warning("shaped send failed: %r", e)
                continue
            n += 1
            late = now - due
            self._late_sum += late
            if late > self._late_max:
                self._late_max = late
            if late > 1e-3:
                counts["late_over_1ms"] += 1
        counts["delivered"] += n
        return n

    def _schedule_timer(self, due: float) -> None:
        # loop.time() and our clock may differ by an offset; convert through "now".
        loop = self._loop
        assert loop is not None, "timers run only once attach() gave a loop"
        loop.call_at(loop.time() + (due - self.clock()), self._on_timer, due)

    def _on_timer(self, due: float) -> None:
        self.flush()
        with self._cv:  # asyncio may fire a timer a hair early: then try again for that message
            early = not self._closed and bool(self._heap) and self._heap[0][0] <= due
        if early and self._loop is not None:
            self._loop.call_later(max(0.0, due - self.clock()), self._on_timer, due)

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                if not self._heap:
                    self._cv.wait()
                    continue
                wait = self._heap[0][0] - self.clock()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                now = self.clock()
                items = self._pop_due(now)
                self._cv.release()
                try:
                    self._deliver_all(items, now)
                finally:
                    self._cv.acquire()
