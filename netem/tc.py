"""Kernel backend: shape a veth pair between two network namespaces with Linux tc.

    caps = capabilities()              # which qdiscs this kernel offers (probed once, needs root)
    with NetnsPair() as pair:          # namespaces <pair.ns_a>, <pair.ns_b>, veth between them
        pair.shape(profile, side="a")  # egress of side a (a -> b) follows the profile
        pair.popen("b", [sys.executable, "server.py"])  # runs inside namespace b

Mapping of a LinkProfile (commands from `plan()`, a pure function):
- rate -> `tbf` (token bucket; burst = max(4 ms at the rate, 2 full frames)) or `htb`
  (`rate_qdisc="htb"`: one class at rate = ceil, with a bfifo leaf when queue_bytes is set);
- queue_bytes -> tbf `limit` / bfifo `limit` (bytes); otherwise tbf holds 100 ms worth;
- overhead_bytes -> a size table (`stab overhead N`);
- mtu -> the veth MTU (note: the kernel's MTU counts IP headers, the model's counts payload);
- delay, jitter, loss (random or Gilbert-Elliott), duplicate -> `netem` at the root with the rate
  qdisc under it, as in tc-netem(8). Kernels without sch_netem cannot do this: `plan()` raises
  `QdiscUnavailable` saying so;
- channel or trace (conditions that change over time) are not mapped: use the model.

Only namespaces this module creates are touched (names start with `hlm`, plus the pid), and
only traffic between them is shaped. Everything needs root; `capabilities().reason` says why
probing was impossible otherwise.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from netem.profile import LinkProfile

QDISCS = ("tbf", "htb", "netem", "bfifo", "pfifo", "fq_codel", "sfq")
_PROBE_ARGS = {
    "tbf": ["rate", "1mbit", "burst", "10k", "latency", "50ms"],
    "htb": ["default", "1"],
    "netem": ["delay", "10ms"],
}
_ETH_HEADER = 14  # tc's packet length on a veth includes the Ethernet header
_counter = itertools.count()


class QdiscUnavailable(RuntimeError):
    """The running kernel (or this process) cannot provide a qdisc that was asked for."""


@dataclass(frozen=True)
class Capabilities:
    root: bool
    qdiscs: dict[str, bool] = field(default_factory=dict)  # kind -> offered by this kernel
    reason: str = ""  # why nothing could be probed (empty when probing worked)

    def has(self, kind: str) -> bool:
        return self.qdiscs.get(kind, False)

    def offered(self) -> list[str]:
        return [k for k, ok in self.qdiscs.items() if ok]

    def require(self, kind: str, why: str = "") -> None:
        if self.reason:
            raise QdiscUnavailable(f"cannot use qdisc {kind!r}{why}: {self.reason}")
        if not self.has(kind):
            raise QdiscUnavailable(
                f"this kernel does not offer the {kind!r} qdisc{why} (offered: {', '.join(self.offered()) or 'none'})"
            )


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


@functools.cache
def capabilities() -> Capabilities:
    """Which qdiscs the kernel offers, probed in a throwaway namespace (cached)."""
    if os.geteuid() != 0:
        return Capabilities(False, reason=f"needs root (creating namespaces and qdiscs); running as uid {os.geteuid()}")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return Capabilities(True, reason=f"the {tool!r} command (iproute2) is not installed")
    ns = f"hlmprobe{os.getpid()}{secrets.token_hex(2)}"
    found: dict[str, bool] = {}
    try:
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        for kind in QDISCS:
            p = _run(
                ["tc", "-n", ns, "qdisc", "replace", "dev", "p0", "root", kind, *_PROBE_ARGS.get(kind, [])], check=False
            )
            found[kind] = p.returncode == 0
    except RuntimeError as e:
        return Capabilities(True, reason=f"could not create a probe namespace: {e}")
    finally:
        _run(["ip", "netns", "del", ns], check=False)
    return Capabilities(True, found)


def _netem_args(p: LinkProfile) -> list[str]:
    args: list[str] = []
    if p.delay_s or p.jitter_s:
        args += ["delay", f"{p.delay_s * 1e6:.0f}us"]
        if p.jitter_s:
            args += [f"{p.jitter_s * 1e6:.0f}us"]
            if p.jitter_correlation:
                args += [f"{p.jitter_correlation * 100:.6g}%"]
            if p.jitter_dist != "uniform":
                args += ["distribution", p.jitter_dist]
    if p.loss:
        args += ["loss", "random", f"{p.loss * 100:.6g}%"]
        if p.loss_correlation:
            args += [f"{p.loss_correlation * 100:.6g}%"]
    if p.ge_p:
        args += ["loss", "gemodel"] + [f"{v * 100:.6g}%" for v in (p.ge_p, p.ge_r, p.ge_loss_bad, p.ge_loss_good)]
    if p.duplicate:
        args += ["duplicate", f"{p.duplicate * 100:.6g}%"]
    return args


def plan(profile: LinkProfile, dev: str, rate_qdisc: str = "tbf", caps: Capabilities | None = None) -> list[list[str]]:
    """tc command lines (without `tc -n NS`) that make `dev`'s egress follow `profile`.

    Raises QdiscUnavailable when the profile needs a qdisc `caps` lacks (pass caps=None to
    plan without checking), ValueError for what the kernel backend cannot express.
    """
    p = profile
    if p.varies:
        raise ValueError(
            "the kernel backend shapes fixed conditions only; a channel or trace "
            "(conditions over time) needs the model (netem.Link)"
        )
    if rate_qdisc not in ("tbf", "htb"):
        raise ValueError(f"rate_qdisc: expected 'tbf' or 'htb', got {rate_qdisc!r}")
    netem = _netem_args(p)
    if caps is not None:
        if netem:
            caps.require("netem", " for delay, jitter, loss or duplication")
        if math.isfinite(p.rate_bps):
            caps.require(rate_qdisc, " for the rate")
            if rate_qdisc == "htb" and p.queue_bytes:
                caps.require("bfifo", " for the queue limit under htb")
    stab = ["stab", "overhead", str(p.overhead_bytes)] if p.overhead_bytes else []
    cmds: list[list[str]] = []
    parent = ["root"]
    if netem:
        cmds.append(["qdisc", "add", "dev", dev, "root", "handle", "1:", *stab, "netem", *netem])
        parent, stab = ["parent", "1:1"], []
    if math.isfinite(p.rate_bps):
        rate = f"{p.rate_bps:.0f}bit"
        frame = p.mtu + p.overhead_bytes + _ETH_HEADER
        burst = max(int(p.rate_bps / 8 * 0.004), 2 * frame)
        if rate_qdisc == "tbf":
            limit = p.queue_bytes or int(p.rate_bps / 8 * 0.1) + burst
            cmds.append(
                [
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    *parent,
                    "handle",
                    "10:",
                    *stab,
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    str(burst),
                    "limit",
                    str(limit),
                ]
            )
        else:
            cmds.append(["qdisc", "add", "dev", dev, *parent, "handle", "10:", *stab, "htb", "default", "1"])
            cmds.append(
                [
                    "class",
                    "add",
                    "dev",
                    dev,
                    "parent",
                    "10:",
                    "classid",
                    "10:1",
                    "htb",
                    "rate",
                    rate,
                    "ceil",
                    rate,
                    "burst",
                    str(burst),
                    "cburst",
                    str(burst),
                ]
            )
            if p.queue_bytes:
                cmds.append(
                    [
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "parent",
                        "10:1",
                        "handle",
                        "20:",
                        "bfifo",
                        "limit",
                        str(p.queue_bytes),
                    ]
                )
    return cmds


class NetnsPair:
    """Two fresh network namespaces joined by a veth pair (10.213.N.1 <-> 10.213.N.2).

    A context manager: the namespaces (and with them the veth) are deleted on exit.
    """

    def __init__(self) -> None:
        n = next(_counter) % 250
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.ns_a, self.ns_b = f"hlm{tag}a", f"hlm{tag}b"
        self.dev_a, self.dev_b = f"hlm{n}a{tag[-4:]}"[:15], f"hlm{n}b{tag[-4:]}"[:15]
        self.ip_a, self.ip_b = f"10.213.{n}.1", f"10.213.{n}.2"
        self._procs: list[subprocess.Popen[Any]] = []
        self._up = False

    def __enter__(self) -> NetnsPair:
        caps = capabilities()
        if caps.reason:
            raise QdiscUnavailable(f"cannot create namespaces: {caps.reason}")
        self._up = True  # from here on, close() deletes whatever was created
        try:
            _run(["ip", "netns", "add", self.ns_a])
            _run(["ip", "netns", "add", self.ns_b])
            _run(
                [
                    "ip",
                    "-n",
                    self.ns_a,
                    "link",
                    "add",
                    self.dev_a,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    self.dev_b,
                    "netns",
                    self.ns_b,
                ]
            )
            for ns, dev, ip in ((self.ns_a, self.dev_a, self.ip_a), (self.ns_b, self.dev_b, self.ip_b)):
                _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
                _run(["ip", "-n", ns, "link", "set", dev, "up"])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _side(self, side: str) -> tuple[str, str]:
        if side not in ("a", "b"):
            raise ValueError(f"side: expected 'a' or 'b', got {side!r}")
        return (self.ns_a, self.dev_a) if side == "a" else (self.ns_b, self.dev_b)

    def shape(self, profile: LinkProfile, side: str = "a", rate_qdisc: str = "tbf") -> list[list[str]]:
        """Make the egress of `side` (a: a -> b, b: b -> a) follow `profile`; returns the commands."""
        ns, dev = self._side(side)
        cmds = plan(profile, dev, rate_qdisc, caps=capabilities())
        if profile.mtu != 1500:
            for n, d in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
                _run(["ip", "-n", n, "link", "set", d, "mtu", str(profile.mtu)])
        _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
        for c in cmds:
            _run(["tc", "-n", ns, *c])
        return cmds

    def qdiscs(self, side: str = "a") -> str:
        ns, dev = self._side(side)
        return _run(["tc", "-n", ns, "qdisc", "show", "dev", dev]).stdout

    def counters(self, side: str) -> dict[str, int]:
        """Byte and packet counters of side's veth end: tx_bytes, rx_bytes, tx_packets, rx_packets."""
        ns, dev = self._side(side)
        info = json.loads(_run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev]).stdout)[0]["stats64"]
        return {
            "tx_bytes": info["tx"]["bytes"],
            "rx_bytes": info["rx"]["bytes"],
            "tx_packets": info["tx"]["packets"],
            "rx_packets": info["rx"]["packets"],
        }

    def popen(self, side: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process inside side's namespace (ended when the pair closes)."""
        ns, _ = self._side(side)
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self._procs.append(p)
        return p

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self._procs.clear()
        if self._up:
            for ns in (self.ns_a, self.ns_b):
                _run(["ip", "netns", "del", ns], check=False)
            self._up = False
