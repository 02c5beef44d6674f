"""Shaped transport: scheduling logic on a fake clock, then real ZeroMQ on loopback."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import numpy as np
import pytest
import zmq

from netem import Link, LinkProfile
from netem.transport import ShapedSender, zmq_deliver


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(profile: LinkProfile, **kw):
    clock, out = FakeClock(), []
    sender = ShapedSender(lambda m: out.append((clock.t, m)), Link(profile, seed=1), clock=clock, **kw)
    return sender, clock, out


# -- scheduling on a fake clock --------------------------------------------------------------


def test_messages_wait_for_their_arrival_time():
    sender, clock, out = make(LinkProfile(rate_bps=1e6, delay_s=0.05))
    assert sender.send(b"x" * 1000) == pytest.approx(100.058)
    assert out == [] and sender.timeout() == pytest.approx(0.058)
    clock.t = 100.057
    assert sender.flush() == 0
    clock.t = 100.06
    assert sender.flush() == 1 and out == [(100.06, b"x" * 1000)]
    assert sender.timeout() is None
    assert sender.stats()["late_max_s"] == pytest.approx(0.002)


def test_zero_delay_link_delivers_inside_send():
    sender, clock, out = make(LinkProfile())
    sender.send([b"a", b"bc"])
    assert out == [(100.0, [b"a", b"bc"])]


def test_lost_messages_are_never_delivered_and_duplicates_twice():
    sender, clock, out = make(LinkProfile(loss=1.0))
    assert sender.send(b"gone") is None
    clock.t += 10
    sender.flush()
    assert out == [] and sender.stats()["dropped"] == 1
    sender, clock, out = make(LinkProfile(duplicate=1.0, rate_bps=8e3))
    sender.send(b"x" * 10)  # 10 ms per copy
    clock.t += 1
    sender.flush()
    assert [t for t, _ in out] == [pytest.approx(101.0)] * 2 and sender.stats()["duplicates"] == 1


def test_time_scale_stretches_emulated_time():
    sender, clock, out = make(LinkProfile(delay_s=0.1), time_scale=2.0)
    assert sender.send(b"m") == pytest.approx(100.2)  # 0.1 emulated s = 0.2 real s
    clock.t = 101.0
    assert sender.now() == pytest.approx(0.5)


def test_messages_due_together_keep_send_order_and_one_sender_serves_many_links():
    sender, clock, out = make(LinkProfile(delay_s=0.01))
    other = Link(LinkProfile(delay_s=0.005), seed=2)
    for i in range(5):
        sender.send(b"%d" % i)
    sender.send(b"fast", link=other)
    clock.t += 1
    sender.flush()
    assert [m for _, m in out] == [b"fast", b"0", b"1", b"2", b"3", b"4"]


def test_set_profile_affects_only_later_messages():
    sender, clock, out = make(LinkProfile(delay_s=1.0))
    sender.send(b"slow")
    sender.set_profile(LinkProfile(delay_s=0.1))
    sender.send(b"quick")
    clock.t += 0.5
    sender.flush()
    assert [m for _, m in out] == [b"quick"]
    clock.t += 1
    sender.flush()
    assert [m for _, m in out] == [b"quick", b"slow"]


def test_a_failing_deliver_is_counted_not_raised():
    def deliver(m):
        raise zmq.Again()

    sender = ShapedSender(deliver, Link(LinkProfile()))
    sender.send(b"x")
    assert sender.stats()["deliver_errors"] == 1


# -- real ZeroMQ on loopback ---------------------------------------------------------------


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def push_pull(ctx):
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(b"hello")
    pull.recv()
    return push, pull


def test_shaped_stream_at_10_mbit_measures_10_mbit_within_5pct(ctx):
    push, pull = push_pull(ctx)
    sender = ShapedSender(zmq_deliver(push), Link(LinkProfile(rate_bps=10e6), seed=1)).start()
    size, n = 1250, 1600  # 1 ms per message at 10 Mbit/s: 1.6 s of traffic
    received = []

    def receive():
        for _ in range(n):
            pull.recv()
            received.append(time.monotonic())

    rx = threading.Thread(target=receive)
    rx.start()
    for _ in range(n):  # offered all at once: the link paces them
        sender.send(b"x" * size)
    rx.join(timeout=30)
    sender.close()
    assert len(received) == n
    # Slope of bytes received over time (least squares: robust to a few late wake-ups).
    t = np.array(received)
    slope = np.polyfit(t - t[0], np.arange(n) * size * 8.0, 1)[0]
    assert slope == pytest.approx(10e6, rel=0.05)
    assert (n - 1) * size * 8 / (t[-1] - t[0]) == pytest.approx(10e6, rel=0.05)


def _echo_server(ctx, shaped_delay: float | None):
    """A ROUTER that echoes, optionally through a shaped downlink. Returns (port, stop)."""
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve():
        down = None
        if shaped_delay is not None:
            down = ShapedSender(zmq_deliver(router), Link(LinkProfile(delay_s=shaped_delay), seed=2))
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            timeout = down.timeout() if down else None
            wait_ms = 20 if timeout is None else min(20, timeout * 1000)
            if poller.poll(wait_ms):
                frames = router.recv_multipart()
                (down.send if down else router.send_multipart)(frames)
            if down:
                down.flush()
        router.close(linger=0)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return port, stop, th


def _rtts(ctx, port, sender_delay: float | None, n: int = 15) -> list[float]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    send = dealer.send
    up = None
    if sender_delay is not None:
        up = ShapedSender(zmq_deliver(dealer), Link(LinkProfile(delay_s=sender_delay), seed=1)).start()
        send = up.send
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        send(b"ping")
        dealer.recv()
        out.append(time.monotonic() - t0)
    if up:
        up.close()
    dealer.close(linger=0)
    return out


def test_added_delay_shows_in_round_trips(ctx):
    port, stop, th = _echo_server(ctx, shaped_delay=0.030)  # downlink 30 ms, caller-driven
    raw_port, raw_stop, raw_th = _echo_server(ctx, shaped_delay=None)
    try:
        raw = statistics.median(_rtts(ctx, raw_port, None))
        shaped = _rtts(ctx, port, sender_delay=0.020)  # uplink 20 ms, thread-driven
    finally:
        stop.set()
        raw_stop.set()
        th.join()
        raw_th.join()
    assert min(shaped) >= 0.050  # never early
    assert statistics.median(shaped) - raw == pytest.approx(0.050, abs=0.010)


def test_asyncio_driver_never_blocks_the_loop_and_profile_changes_apply_at_once(ctx):
    push, pull = push_pull(ctx)

    async def scenario():
        loop = asyncio.get_running_loop()
        sender = ShapedSender(zmq_deliver(push), Link(LinkProfile(delay_s=0.3), seed=1)).attach(loop)
        gaps, stop = [], False

        async def ticker():
            last = time.monotonic()
            while not stop:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        t0 = time.monotonic()
        sender.send(b"A")  # waits 300 ms
        sender.set_profile(LinkProfile(delay_s=0.01))  # link gets better while A is in flight
        sender.send(b"B")
        got = []
        while len(got) < 2:
            await asyncio.sleep(0.002)
            while True:
                try:
                    got.append((pull.recv(zmq.NOBLOCK), time.monotonic() - t0))
                except zmq.Again:
                    break
        stop = True
        await tick
        sender.close()
        return got, gaps

    got, gaps = asyncio.run(scenario())
    assert [m for m, _ in got] == [b"B", b"A"]  # B is not held behind A
    assert got[0][1] >= 0.01 and got[1][1] >= 0.3
    assert got[0][1] < 0.2
    assert max(gaps) < 0.1  # the loop kept running while A waited
