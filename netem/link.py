"""The link model: when does a message sent at t arrive, if at all.

One `Link` is one direction of one device's link. For each message:

1. packetise: ceil(nbytes / mtu) packets (at least one), each carrying `overhead_bytes` more;
2. per packet, in order: tail drop if the queue (bytes not yet fully serialised) would
   exceed `queue_bytes`; serialise FIFO at the link's rate (a packet waits for every packet
   before it, Lindley: depart = max(t, previous depart) + bits / rate, integrating the rate
   when it varies over time); then loss on the wire (a lost packet still used its airtime,
   as on a radio; netem instead drops before its rate stage); then propagation delay + jitter;
3. duplication: a duplicated packet is sent twice (both copies queue, serialise and may be
   lost independently);
4. reassembly: a message arrives when its last packet does (the earliest copy of each
   packet counts); it is lost if any packet has no surviving copy. A second complete copy
   (every packet duplicated and delivered) is a duplicate message, reported by `transmit()`.
5. retransmission (`message()`, a reliable transport as TCP or QUIC give: selective repeat):
   each `Delivery.round(t)` sends again only the packets with no surviving copy yet. `send()`
   and `transmit()` do not retransmit (a datagram); whole-message resending would make a large
   message on a lossy link all but undeliverable (600 KB = 405 packets at 1% packet loss: 1.7%
   of whole copies arrive).

Per-packet jitter means packets, and so messages, can overtake each other, as with netem
(arrival order is not send order); the serialisation queue itself is FIFO.

Conditions (rate, delay, loss) come from the profile, or over time from its channel or trace,
evaluated when each packet leaves the serialiser. `set_profile()` switches profiles between
sends; queued bytes, loss state and jitter state carry over.

Randomness: each purpose (loss, jitter, duplication, trace offset, channel) has its own
stream derived from the link's seed, so e.g. turning on duplication does not change which
packets are lost. `link_seed(seed, device, direction)` keys a link by scenario seed, device
and direction, so links are independent and each is reproducible on its own.
"""

from __future__ import annotations

import collections
import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from netem.channel import ChannelProcess
from netem.profile import LinkProfile
from netem.trace import Trace

DIRECTIONS = ("uplink", "downlink")
_SQRT_HALF = math.sqrt(0.5)
_PARETO_SHAPE = 3.0  # netem's pareto table uses shape 3
# Pareto(x_m, a): mean a x_m / (a - 1), sd x_m sqrt(a / (a - 2)) / (a - 1). Scale so sd = 1.
_PARETO_XM = (_PARETO_SHAPE - 1) / math.sqrt(_PARETO_SHAPE / (_PARETO_SHAPE - 2))
_PARETO_MEAN = _PARETO_SHAPE * _PARETO_XM / (_PARETO_SHAPE - 1)


def _derive(seed: int, *parts: object) -> int:
    """A 63-bit integer from a seed and labels (stable across runs and platforms)."""
    text = ":".join(str(p) for p in (int(seed), *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def link_seed(seed: int, device: object, direction: str) -> int:
    """The seed of device `device`'s link in `direction` ('uplink' or 'downlink')."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected 'uplink' or 'downlink', got {direction!r}")
    return _derive(seed, "link", device, direction)


@dataclass
class LinkStats:
    messages: int = 0
    messages_lost: int = 0
    messages_duplicated: int = 0
    packets: int = 0  # packets offered to the queue (copies included)
    packets_dropped: int = 0  # tail drops at the queue (and packets facing zero rate for ever)
    packets_lost: int = 0  # lost on the wire
    bytes_offered: int = 0  # message payload bytes offered


class _Static:
    """Constant conditions."""

    rate_varies = delay_varies = False

    def __init__(self, p: LinkProfile):
        self.rate, self.delay, self.loss = p.rate_bps, p.delay_s, p.loss

    def rate_segment(self, t: float) -> tuple[float, float]:
        return self.rate, math.inf

    def delay_at(self, t: float) -> float:
        return self.delay

    def loss_at(self, t: float) -> float:
        return self.loss


class _TraceRows:
    """A trace's rows by emulated time, shifted by the link's random start `offset`."""

    def __init__(self, trace: Trace, offset: float):
        self.trace, self.offset = trace, offset
        self.rate, self.delay, self.loss = trace.rate_bps or (), trace.delay_s or (), trace.loss or ()
        self._i, self._lo, self._hi = 0, math.inf, -math.inf  # empty row cache

    def row(self, t: float) -> tuple[int, float]:
        """(trace row in force at t, when it ends), cached: sends mostly stay within one row."""
        if self._lo <= t < self._hi:
            return self._i, self._hi
        i, end = self.trace.index(t + self.offset)
        self._i, self._lo, self._hi = i, t, end - self.offset  # row i holds on [t, end)
        return i, self._hi

    def rate_segment(self, t: float) -> tuple[float, float]:
        i, end = self.row(t)
        return self.rate[i], end

    def delay_at(self, t: float) -> float:
        return self.delay[self.row(t)[0]]

    def loss_at(self, t: float) -> float:
        return self.loss[self.row(t)[0]]


class _Varying:
    """Conditions from a channel or a trace; static profile values fill what they lack."""

    def __init__(self, p: LinkProfile, seed: int):
        static = _Static(p)
        self.channel = ChannelProcess(p.channel, _derive(seed, "channel")) if p.channel else None
        offset = 0.0
        if p.trace is not None and p.trace.random_start and p.trace.duration_s > 0:
            offset = random.Random(_derive(seed, "trace")).random() * p.trace.duration_s
        rows = _TraceRows(p.trace, offset) if p.trace is not None else None
        cols = p.trace.columns() if p.trace else []
        self.rate_varies = self.channel is not None or "rate_bps" in cols
        self.delay_varies = "delay_s" in cols
        self.rate_segment: Callable[[float], tuple[float, float]] = static.rate_segment
        if self.channel is not None:
            self.rate_segment = self.channel.rate_segment
        elif rows is not None and "rate_bps" in cols:
            self.rate_segment = rows.rate_segment
        self.delay_at = rows.delay_at if rows is not None and self.delay_varies else static.delay_at
        self.loss_at = rows.loss_at if rows is not None and "loss" in cols else static.loss_at


class _Uniform:
    """random.Random(seed).random, the generator made at the first draw: a Random holds 2.5 kB of
    state, a link has three and a device two links, and a link that never loses, jitters or
    duplicates never draws (tens of thousands of devices in one replay: agents.engine)."""

    __slots__ = ("seed", "draw")

    def __init__(self, seed: int):
        self.seed = seed
        self.draw: Callable[[], float] | None = None

    def __call__(self) -> float:
        if self.draw is None:
            self.draw = random.Random(self.seed).random
        return self.draw()


class Link:
    """One direction of one link. `send(nbytes, t_send)` -> arrival time or None (lost).

    Calls must come in non-decreasing t_send order (the serialisation queue depends on
    history). Deterministic for a given profile sequence and seed.
    """

    def __init__(self, profile: LinkProfile, seed: int = 0):
        if not isinstance(profile, LinkProfile):
            raise TypeError(f"profile: expected a LinkProfile, got {type(profile).__name__}")
        self.seed = int(seed)
        self._loss_u = _Uniform(_derive(seed, "loss"))
        self._jitter_u = _Uniform(_derive(seed, "jitter"))
        self._dup_u = _Uniform(_derive(seed, "duplicate"))
        self._busy = -math.inf  # when the serialiser has sent everything queued so far
        self._last_t = -math.inf
        self._queue: collections.deque[tuple[float, int]] = collections.deque()  # (depart, wire bytes) unsent
        self._queued_bytes = 0
        self._lost_last = False  # previous packet's fate (correlated loss)
        self._ge_bad = False  # Gilbert-Elliott state
        self._z: float | None = None  # jitter AR(1) state; the first draw comes from the stationary N(0, 1)
        self._spare: float | None = None  # second Box-Muller normal
        self.stats = LinkStats()
        self.set_profile(profile)

    @property
    def profile(self) -> LinkProfile:
        return self._profile

    @property
    def busy_until(self) -> float:
        """When the serialiser will have sent everything queued so far."""
        return self._busy

    def set_profile(self, profile: LinkProfile) -> None:
        """Use `profile` for every later send (O(1); nothing queued is recomputed)."""
        p = profile
        self._profile = p
        self._cond = _Varying(p, self.seed) if p.varies else _Static(p)
        # Constant rate and delay take a fast path: seconds per byte, no segment walk.
        rate_varies = p.varies and self._cond.rate_varies
        self._sec_per_byte = None if rate_varies else (0.0 if math.isinf(p.rate_bps) else 8.0 / p.rate_bps)
        self._fixed_delay = None if p.varies and self._cond.delay_varies else p.delay_s
        trace_loss = p.trace is not None and p.trace.loss is not None
        self._random_loss = p.loss > 0 or trace_loss
        self._lossy = self._random_loss or p.ge_p > 0
        self._mtu, self._overhead, self._limit = p.mtu, p.overhead_bytes, p.queue_bytes
        self._dup = p.duplicate
        j = p.jitter_s
        self._jitter = j > 0
        self._rho = p.jitter_correlation
        self._innov = math.sqrt(1.0 - self._rho * self._rho)
        self._jdist = p.jitter_dist
        self._jscale = j

    # -- public API ---------------------------------------------------------------------

    def send(self, nbytes: int, t_send: float) -> float | None:
        """Arrival time (s) of the message sent at t_send, or None when it is lost."""
        if nbytes <= self._mtu and not self._dup:  # fast path: one packet, no copies
            self._start(nbytes, t_send)
            a = self._packet(nbytes + self._overhead, t_send)
            if a is None:
                self.stats.messages_lost += 1
            return a
        arrivals = self.transmit(nbytes, t_send)
        return arrivals[0] if arrivals else None

    def message(self, nbytes: int) -> Delivery:
        """A message of `nbytes` to deliver reliably: its rounds (Delivery.round) go in time order."""
        return Delivery(self, nbytes)

    def transmit(self, nbytes: int, t_send: float) -> tuple[float, ...]:
        """Arrival times of every complete copy of the message: () if lost, two if duplicated."""
        self._start(nbytes, t_send)
        mtu, over = self._mtu, self._overhead
        npk = max(1, -(-nbytes // mtu))
        first = second = -math.inf
        complete, twice = True, True
        for i in range(npk):
            a, b = self._copies((mtu if i < npk - 1 else nbytes - mtu * (npk - 1)) + over, t_send)
            if a is None:
                if b is None:
                    complete = False
                    continue
                twice, early = False, b
            elif b is None:
                twice, early = False, a
            else:
                early, late = (a, b) if a <= b else (b, a)
                second = max(second, late)
            first = max(first, early)
        if not complete:
            self.stats.messages_lost += 1
            return ()
        if twice:
            self.stats.messages_duplicated += 1
            return (first, max(first, second))
        return (first,)

    def _copies(self, wire: int, t: float) -> tuple[float | None, float | None]:
        """One packet and, when the link duplicates it, its copy: both arrivals (None: lost, or no copy)."""
        a = self._packet(wire, t)
        b = self._packet(wire, t) if self._dup and self._dup_u() < self._dup else None
        return a, b

    def _copy(self, wire: int, t: float) -> float | None:
        """The earliest arrival of a packet and its copy (_copies), or None when neither arrives."""
        if not self._dup:  # no copy (most links): the packet itself, one call for every packet of a Delivery
            return self._packet(wire, t)
        a, b = self._copies(wire, t)
        if a is None or b is None:
            return a if b is None else b
        return a if a <= b else b

    def conditions_at(self, t: float) -> tuple[float, float, float]:
        """(rate bit/s, base delay s, random loss probability) in force at time t, for plots."""
        c = self._cond
        return c.rate_segment(t)[0], c.delay_at(t), c.loss_at(t)

    # -- internals ----------------------------------------------------------------------

    def _start(self, nbytes: int, t: float) -> None:
        if t < self._last_t:
            raise ValueError(f"t_send went backwards ({t!r} after {self._last_t!r}); send in time order per link")
        if nbytes < 0:
            raise ValueError(f"nbytes: expected an integer >= 0, got {nbytes!r}")
        self._last_t = t
        st = self.stats
        st.messages += 1
        st.bytes_offered += nbytes

    def _packet(self, wire: int, t: float) -> float | None:
        """One packet of `wire` bytes offered at t: its arrival time, or None."""
        self.stats.packets += 1
        if self._limit is not None:
            q = self._queue
            while q and q[0][0] <= t:
                self._queued_bytes -= q.popleft()[1]
            if self._queued_bytes + wire > self._limit:
                self.stats.packets_dropped += 1
                return None
        start = t if t > self._busy else self._busy
        if self._sec_per_byte is not None:
            depart = start + wire * self._sec_per_byte
        else:
            depart = self._serialise(start, wire * 8.0)
            if depart == math.inf:  # zero rate for ever: the packet never leaves
                self.stats.packets_dropped += 1
                return None
        self._busy = depart
        if self._limit is not None:
            self._queue.append((depart, wire))
            self._queued_bytes += wire
        if self._lossy and self._lost(depart):
            self.stats.packets_lost += 1
            return None
        delay = self._fixed_delay if self._fixed_delay is not None else self._cond.delay_at(depart)
        if self._jitter:
            delay += self._jitter_sample()
            if delay < 0:
                delay = 0.0
        return depart + delay

    def _serialise(self, start: float, bits: float) -> float:
        """When `bits` started at `start` finish, integrating a piecewise-constant rate."""
        t = start
        segment = self._cond.rate_segment
        while True:
            rate, end = segment(t)
            if rate == math.inf:
                return t
            if rate > 0:
                done = t + bits / rate
                if done <= end:
                    return done
                bits -= rate * (end - t)
            if end == math.inf:
                return math.inf
            t = end

    def _lost(self, t: float) -> bool:
        u = self._loss_u()
        p = self._profile
        if p.ge_p > 0:  # Gilbert-Elliott, in the kernel's order: transition, then loss
            if self._ge_bad:
                if u < p.ge_r:
                    self._ge_bad = False
            elif u < p.ge_p:
                self._ge_bad = True
            lost = self._loss_u() < (p.ge_loss_bad if self._ge_bad else p.ge_loss_good)
        else:
            q = self._cond.loss_at(t) if self._random_loss else 0.0
            rho = p.loss_correlation
            # Markov chain with marginal q and lag-1 correlation rho.
            lost = u < (rho + (1 - rho) * q if self._lost_last else (1 - rho) * q)
        self._lost_last = lost
        return lost

    def _normal(self) -> float:
        if self._spare is not None:
            z, self._spare = self._spare, None
            return z
        r = math.sqrt(-2.0 * math.log(1.0 - self._jitter_u()))  # 1 - u in (0, 1]
        a = 2.0 * math.pi * self._jitter_u()
        self._spare = r * math.sin(a)
        return r * math.cos(a)

    def _jitter_sample(self) -> float:
        e = self._normal()
        self._z = z = e if self._z is None else self._rho * self._z + self._innov * e  # AR(1), N(0, 1)
        if self._jdist == "normal":
            return self._jscale * z
        if self._jdist == "uniform":
            return self._jscale * math.erf(z * _SQRT_HALF)  # 2 Phi(z) - 1: uniform on (-1, 1)
        tail = 0.5 * math.erfc(z * _SQRT_HALF)  # 1 - Phi(z), > 0 even far in the tail
        root = float(tail ** (-1.0 / _PARETO_SHAPE))  # float ** float is typed Any: say it is a float
        return self._jscale * (_PARETO_XM * root - _PARETO_MEAN)


class Delivery:
    """One message over a reliable transport (selective repeat, as TCP retransmits segments).
    `round(t)` sends at t every packet with no surviving copy yet (all of them the first time)
    and returns the message's arrival once every packet is through, else None. A one-packet
    message's round is exactly `Link.send`. `wire_bytes`: the message bytes every round offered
    (per-packet overhead aside, as `send` counts them); `rounds`: the rounds so far."""

    def __init__(self, link: Link, nbytes: int):
        if nbytes < 0:
            raise ValueError(f"nbytes: expected an integer >= 0, got {nbytes!r}")
        mtu = link._mtu
        n = max(1, -(-nbytes // mtu))
        self.link = link
        self.sizes = [mtu] * (n - 1) + [nbytes - mtu * (n - 1)]
        self.missing = list(range(n))
        self.arrival = -math.inf
        self.wire_bytes = 0
        self.rounds = 0

    def round(self, t: float) -> float | None:
        link, over = self.link, self.link._overhead
        offered = sum(self.sizes[i] for i in self.missing)
        link._start(offered, t)
        self.wire_bytes += offered
        self.rounds += 1
        still = []
        for i in self.missing:
            a = link._copy(self.sizes[i] + over, t)
            if a is None:
                still.append(i)
            elif a > self.arrival:
                self.arrival = a
        self.missing = still
        if still:
            link.stats.messages_lost += 1
            return None
        return self.arrival
