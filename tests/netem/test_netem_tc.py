"""Kernel backend: the tc plan (pure), capability probing, and real shaping between two
namespaces this test creates (root only; skipped with the reason elsewhere)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from netem import LinkProfile, tc

NO_NETEM = tc.Capabilities(True, {"tbf": True, "htb": True, "netem": False, "bfifo": True})


def test_plan_rate_only_uses_tbf_or_htb():
    p = LinkProfile(rate_bps=10e6, queue_bytes=30_000)
    (cmd,) = tc.plan(p, "v0", caps=NO_NETEM)
    assert cmd[:4] == ["qdisc", "add", "dev", "v0"] and "tbf" in cmd
    assert cmd[cmd.index("rate") + 1] == "10000000bit" and cmd[cmd.index("limit") + 1] == "30000"
    htb = tc.plan(p, "v0", rate_qdisc="htb", caps=NO_NETEM)
    assert [c[0] for c in htb] == ["qdisc", "class", "qdisc"]
    assert htb[1][htb[1].index("ceil") + 1] == "10000000bit" and "bfifo" in htb[2]


def test_plan_maps_delay_and_loss_to_netem_like_tc_netem_8():
    p = LinkProfile(
        rate_bps=1e6,
        delay_s=0.04,
        jitter_s=0.01,
        jitter_dist="normal",
        jitter_correlation=0.25,
        ge_p=0.01,
        ge_r=0.3,
        ge_loss_bad=0.5,
        duplicate=0.001,
        overhead_bytes=20,
    )
    cmds = tc.plan(p, "v0")
    assert cmds[0] == [
        "qdisc",
        "add",
        "dev",
        "v0",
        "root",
        "handle",
        "1:",
        "stab",
        "overhead",
        "20",
        "netem",
        "delay",
        "40000us",
        "10000us",
        "25%",
        "distribution",
        "normal",
        "loss",
        "gemodel",
        "1%",
        "30%",
        "50%",
        "0%",
        "duplicate",
        "0.1%",
    ]
    assert cmds[1][4:6] == ["parent", "1:1"] and "tbf" in cmds[1]


def test_asking_for_a_qdisc_the_kernel_lacks_says_so():
    with pytest.raises(tc.QdiscUnavailable, match="does not offer the 'netem' qdisc for delay.*offered: tbf, htb"):
        tc.plan(LinkProfile(delay_s=0.01), "v0", caps=NO_NETEM)
    with pytest.raises(ValueError, match="needs the model"):
        tc.plan(LinkProfile.from_dict({"trace": "wifi-walk-up"}), "v0", caps=NO_NETEM)


def test_capabilities_without_root_gives_a_reason(monkeypatch):
    tc.capabilities.cache_clear()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    try:
        caps = tc.capabilities()
        assert not caps.root and "needs root" in caps.reason and not caps.has("tbf")
        with pytest.raises(tc.QdiscUnavailable, match="needs root"):
            caps.require("tbf")
    finally:
        tc.capabilities.cache_clear()


def _kernel_or_skip() -> tc.Capabilities:
    if os.geteuid() != 0:
        pytest.skip("kernel backend needs root (network namespaces and qdiscs)")
    caps = tc.capabilities()
    if caps.reason:
        pytest.skip(f"kernel backend unavailable: {caps.reason}")
    return caps


# UDP keeps the queue full (TCP's own loss recovery under-fills a tbf), paced at 1.5x the rate.
_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5201))
print("ready", flush=True)
while True:
    s.recv(65536)
"""
_SENDER = """
import socket, sys, time
dst, rate, seconds = (sys.argv[1], 5201), float(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"x" * 1400
start = time.monotonic(); sent = 0
while time.monotonic() - start < seconds:
    while sent * 1400 * 8 < (time.monotonic() - start) * rate:
        try:
            s.sendto(payload, dst)
        except OSError:
            pass
        sent += 1
    time.sleep(0.0005)
"""


def _measure_wire_rate(pair: tc.NetnsPair, rate: float, seconds: float = 2.0) -> float:
    """Bytes per second leaving side a's veth (what tbf/htb count) over a steady window."""
    rx = pair.popen("b", [sys.executable, "-c", _RECEIVER, pair.ip_b], stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    pair.popen("a", [sys.executable, "-c", _SENDER, pair.ip_b, str(1.5 * rate), str(seconds + 1.5)])
    time.sleep(0.7)  # the queue fills, the initial burst passes
    c0, t0 = pair.counters("a"), time.monotonic()
    time.sleep(seconds)
    c1, t1 = pair.counters("a"), time.monotonic()
    return (c1["tx_bytes"] - c0["tx_bytes"]) * 8 / (t1 - t0)


@pytest.mark.root
@pytest.mark.parametrize("rate_qdisc", ["tbf", "htb"])
def test_kernel_shaping_at_10_mbit_measures_within_10pct(rate_qdisc):
    caps = _kernel_or_skip()
    if not caps.has(rate_qdisc):
        pytest.skip(f"this kernel lacks {rate_qdisc}")
    with tc.NetnsPair() as pair:
        pair.shape(LinkProfile(rate_bps=10e6), side="a", rate_qdisc=rate_qdisc)
        assert rate_qdisc in pair.qdiscs("a")
        measured = _measure_wire_rate(pair, 10e6)
        names = (pair.ns_a, pair.ns_b)
    assert measured == pytest.approx(10e6, rel=0.10)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in left for n in names)  # our namespaces are gone


@pytest.mark.root
def test_kernel_without_netem_refuses_delay_with_a_clear_message():
    caps = _kernel_or_skip()
    assert caps.has("tbf") and caps.has("htb")
    if caps.has("netem"):
        pytest.skip("this kernel has netem")
    with tc.NetnsPair() as pair:
        with pytest.raises(tc.QdiscUnavailable, match="does not offer the 'netem' qdisc"):
            pair.shape(LinkProfile(rate_bps=10e6, delay_s=0.02))
