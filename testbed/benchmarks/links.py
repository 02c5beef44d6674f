"""`testbed bench links`: link-model speed and the wall transport's cost, measured in one run.

- model: `Link.send` calls per second for small messages on every bundled profile's uplink
  (goal >= 200,000 in the virtual clock).
- transport: per-message cost of ShapedSender (on the `ideal` profile, so only the machinery
  is measured, not emulated delay) next to raw ZeroMQ in the same process and run:
  one-way streaming cost (PUSH -> PULL over loopback TCP) and ping-pong round trips
  (DEALER -> an echo ROUTER in another process, as the verifier would be), for the
  caller-driven and the background-thread drivers.
  Rounds are interleaved and the median kept, so load on the machine hits all variants alike.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import typer

GOAL_SENDS_PER_S = 200_000


def model_sends_per_s(profile, n: int = 100_000, nbytes: int = 64, interval_s: float = 1e-3) -> float:
    import netem

    link = netem.Link(profile, seed=1)
    send = link.send
    t = 0.0
    start = time.perf_counter()
    for _ in range(n):
        send(nbytes, t)
        t += interval_s
    return n / (time.perf_counter() - start)


def _sender(sock, mode: str):
    """(send function, ShapedSender or None) for a socket: raw ZeroMQ, or shaped through an
    ideal link driven by the caller or by a background thread."""
    import netem
    from netem.transport import ShapedSender, zmq_deliver

    if mode == "raw":
        return sock.send, None
    sender = ShapedSender(zmq_deliver(sock), netem.Link(netem.get_profile("ideal").uplink))
    if mode == "thread":
        sender.start()
    return sender.send, sender


def _stream_us(ctx, n: int, payload: bytes, mode: str) -> float:
    import zmq

    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(b"warm-up")
    pull.recv()
    send, sender = _sender(push, mode)
    start = time.perf_counter()
    for _ in range(n):
        send(payload)
    for _ in range(n):
        pull.recv()
    elapsed = time.perf_counter() - start
    if sender is not None:
        sender.close()
    push.close(linger=0)
    pull.close(linger=0)
    return elapsed / n * 1e6


_ECHO = """
import sys, zmq
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
print(router.bind_to_random_port("tcp://127.0.0.1"), flush=True)
while True:
    frames = router.recv_multipart()
    if frames[-1] == b"stop":
        break
    router.send_multipart(frames)
"""


def _rtt_us(ctx, port: int, n: int, payload: bytes, mode: str) -> float:
    """Mean round trip to an echo server in another process (as the verifier would be)."""
    import zmq

    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"warm-up")
    dealer.recv()
    send, sender = _sender(dealer, mode)
    start = time.perf_counter()
    for _ in range(n):
        send(payload)
        dealer.recv()
    elapsed = time.perf_counter() - start
    if sender is not None:
        sender.close()
    dealer.close(linger=0)
    return elapsed / n * 1e6


def transport_overhead(n: int = 4000, rounds: int = 3, payload_bytes: int = 64) -> dict:
    import zmq

    ctx = zmq.Context()
    payload = b"p" * payload_bytes
    modes = ("raw", "caller", "thread")
    stream = {m: [] for m in modes}
    rtt = {m: [] for m in modes}
    echo = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    try:
        port = int(echo.stdout.readline())
        for _ in range(rounds):
            for m in modes:
                stream[m].append(_stream_us(ctx, n, payload, m))
                rtt[m].append(_rtt_us(ctx, port, max(1, n // 4), payload, m))
        stop = ctx.socket(zmq.DEALER)
        stop.connect(f"tcp://127.0.0.1:{port}")
        stop.send(b"stop")
        echo.wait(timeout=10)
        stop.close(linger=0)
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait()
        ctx.term()
    s = {m: statistics.median(v) for m, v in stream.items()}
    r = {m: statistics.median(v) for m, v in rtt.items()}
    return {
        "messages": n,
        "round_trips": max(1, n // 4),
        "rounds": rounds,
        "payload_bytes": payload_bytes,
        "stream_us_per_msg": {"raw_zmq": s["raw"], "shaped_caller": s["caller"], "shaped_thread": s["thread"]},
        "stream_overhead_us_per_msg": {"caller": s["caller"] - s["raw"], "thread": s["thread"] - s["raw"]},
        "rtt_us": {"raw_zmq": r["raw"], "shaped_caller": r["caller"], "shaped_thread": r["thread"]},
        "rtt_overhead_us": {"caller": r["caller"] - r["raw"], "thread": r["thread"] - r["raw"]},
        "rtt_ratio_to_raw": {"caller": r["caller"] / r["raw"], "thread": r["thread"] / r["raw"]},
    }


def run(model_sends: int = 100_000, transport_messages: int = 4000, rounds: int = 3) -> dict:
    import netem

    speeds = {name: model_sends_per_s(p.uplink, model_sends) for name, p in netem.list_profiles().items()}
    big = model_sends_per_s(netem.get_profile("5g-good").uplink, max(1, model_sends // 10), nbytes=10_000)
    return {
        "model": {
            "message_bytes": 64,
            "sends_per_profile": model_sends,
            "sends_per_s": speeds,
            "min_sends_per_s": min(speeds.values()),
            "goal_sends_per_s": GOAL_SENDS_PER_S,
            "meets_goal": min(speeds.values()) >= GOAL_SENDS_PER_S,
            "sends_per_s_10kB_messages_5g_good": big,
        },
        "transport": transport_overhead(transport_messages, rounds),
    }


def command(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Benchmark: link model sends/s and shaped-transport overhead vs raw ZeroMQ."""
    result = run()
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    m, t = result["model"], result["transport"]
    typer.echo(
        f"model: min {m['min_sends_per_s']:,.0f} sends/s over bundled profiles "
        f"(goal {m['goal_sends_per_s']:,}; {'met' if m['meets_goal'] else 'NOT met'})"
    )
    for name, v in m["sends_per_s"].items():
        typer.echo(f"  {name:14s} {v:12,.0f} sends/s")
    typer.echo(f"transport ({t['payload_bytes']} B messages, median of {t['rounds']} rounds):")
    for key, label in (("stream_us_per_msg", "stream us/msg"), ("rtt_us", "round trip us")):
        v = t[key]
        typer.echo(
            f"  {label:14s} raw {v['raw_zmq']:8.1f}  shaped(caller) {v['shaped_caller']:8.1f}  "
            f"shaped(thread) {v['shaped_thread']:8.1f}"
        )
