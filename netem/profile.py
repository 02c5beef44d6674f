"""Link profiles: what one direction of a link does to messages, in SI units.

Meanings mirror Linux netem (tc-netem(8)) where they overlap, with probabilities as
fractions 0..1 instead of percents:

- `rate_bps`: serialisation rate of the bottleneck, counting each packet's payload plus
  `overhead_bytes` (netem's `rate RATE PACKETOVERHEAD`). inf = no serialisation delay.
- `delay_s`, `jitter_s`, `jitter_dist`, `jitter_correlation`: netem's `delay TIME JITTER CORR
  distribution DIST`. Uniform (netem's default without a table) spreads delay uniformly over
  delay +- jitter; normal has standard deviation `jitter_s`; pareto is a Pareto tail (shape 3,
  like netem's table) shifted and scaled to mean 0 and standard deviation `jitter_s`.
  Correlation is the lag-1 correlation of an underlying Gaussian AR(1) process mapped onto the
  chosen distribution (a Gaussian copula), so the distribution itself is exact for any
  correlation (netem's own correlation formula narrows it). Total delay is clamped at >= 0.
- `loss`, `loss_correlation`: netem's `loss random P CORR`, kept exact: with probability CORR a
  packet repeats the previous packet's fate, otherwise it is lost with probability P. The
  long-run loss rate stays P (netem's correlated form drifts away from P).
- `ge_p`, `ge_r`, `ge_loss_bad`, `ge_loss_good`: netem's `loss gemodel p r 1-h 1-k`
  (Gilbert-Elliott): p = P(good -> bad), r = P(bad -> good), 1-h = loss probability in the bad
  state, 1-k = loss probability in the good state; defaults r = 1, 1-h = 1, 1-k = 0 as in tc.
  Enabled when ge_p > 0; one loss model per link, as in netem.
- `duplicate`: probability that a packet is sent twice (the copy also uses the link).
- `queue_bytes`: tail-drop limit on the bytes waiting for or in serialisation (like bfifo's
  `limit`); None = unbounded.
- `mtu`: largest payload per packet; a message of n bytes is ceil(n / mtu) packets (at least 1).
- `channel` (netem.channel.ChannelProfile): the rate follows a wireless channel instead of
  `rate_bps`. `trace` (netem.trace.Trace): rate, delay and/or loss follow a trace over time.
  A quantity may come from one place only: giving it both statically and from a channel or
  trace is an error.

`LinkProfile.from_dict` takes scenario-friendly units (`rate_mbps`, `delay_ms`, `jitter_ms`,
...) and raises ValueError naming the offending key; `to_dict` writes the same form back.
`DuplexProfile(uplink, downlink)`: uplink = device -> verifier, downlink = verifier -> device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from netem.channel import ChannelProfile, unit_field
from netem.trace import Trace, load_trace

JITTER_DISTS = ("uniform", "normal", "pareto")

# Scenario-friendly keys with units -> (field, scale to SI). Tables, laid out by hand: one quantity a line.
# fmt: off
_UNIT_KEYS = {
    "rate_bps": ("rate_bps", 1.0), "rate_kbps": ("rate_bps", 1e3),
    "rate_mbps": ("rate_bps", 1e6), "rate_gbps": ("rate_bps", 1e9),
    "delay_s": ("delay_s", 1.0), "delay_ms": ("delay_s", 1e-3),
    "jitter_s": ("jitter_s", 1.0), "jitter_ms": ("jitter_s", 1e-3),
}
_PROBABILITIES = ("jitter_correlation", "loss", "loss_correlation", "ge_p", "ge_r", "ge_loss_bad",
                  "ge_loss_good", "duplicate")
_PLAIN_KEYS = (*_PROBABILITIES, "jitter_dist", "queue_bytes", "mtu", "overhead_bytes", "channel", "trace")
# fmt: on


def _check_number(key: str, value: object, *, positive: bool = False, allow_inf: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok and isinstance(value, (int, float)) and math.isinf(value):
        ok = allow_inf and value > 0
    if not ok or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        want = "a number > 0" if positive else "a number >= 0"
        raise ValueError(f"{key}: expected {want}, got {value!r}")


def _check_probability(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{key}: expected a probability in [0, 1], got {value!r}")


def _check_int(key: str, value: object, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}: expected an integer >= {minimum}{' or null' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class LinkProfile:
    """One direction of a link. See the module docstring for each field's meaning."""

    rate_bps: float = math.inf
    delay_s: float = 0.0
    jitter_s: float = 0.0
    jitter_dist: str = "uniform"
    jitter_correlation: float = 0.0
    loss: float = 0.0
    loss_correlation: float = 0.0
    ge_p: float = 0.0
    ge_r: float = 1.0
    ge_loss_bad: float = 1.0
    ge_loss_good: float = 0.0
    duplicate: float = 0.0
    queue_bytes: int | None = None
    mtu: int = 1500
    overhead_bytes: int = 0
    channel: ChannelProfile | None = None
    trace: Trace | None = None

    def __post_init__(self) -> None:
        _check_number("rate_bps", self.rate_bps, positive=True, allow_inf=True)
        _check_number("delay_s", self.delay_s)
        _check_number("jitter_s", self.jitter_s)
        for key in _PROBABILITIES:
            _check_probability(key, getattr(self, key))
        if self.jitter_dist not in JITTER_DISTS:
            raise ValueError(f"jitter_dist: expected one of {', '.join(JITTER_DISTS)}, got {self.jitter_dist!r}")
        _check_int("mtu", self.mtu, 1)
        _check_int("overhead_bytes", self.overhead_bytes, 0)
        _check_int("queue_bytes", self.queue_bytes, 1, optional=True)
        if self.queue_bytes is not None and self.queue_bytes < self.mtu + self.overhead_bytes:
            raise ValueError(
                f"queue_bytes: {self.queue_bytes} cannot hold one full packet "
                f"(mtu {self.mtu} + overhead_bytes {self.overhead_bytes})"
            )
        if self.channel is not None and not isinstance(self.channel, ChannelProfile):
            raise ValueError(f"channel: expected a netem.channel.ChannelProfile, got {type(self.channel).__name__}")
        if self.trace is not None and not isinstance(self.trace, Trace):
            raise ValueError(f"trace: expected a netem.trace.Trace, got {type(self.trace).__name__}")
        if self.ge_p > 0 and self.loss > 0:
            raise ValueError("loss and ge_p (Gilbert-Elliott) both set; a link has one loss model, as in netem")
        if self.channel is not None and self.trace is not None:
            raise ValueError("channel and trace both set; the rate can follow only one of them")
        if self.channel is not None and math.isfinite(self.rate_bps):
            raise ValueError("rate_bps and channel both set; with a channel the rate comes from the channel")
        if self.trace is not None:
            cols = self.trace.columns()
            for col, static in (
                ("rate_bps", math.isfinite(self.rate_bps)),
                ("delay_s", self.delay_s > 0),
                ("loss", self.loss > 0),
            ):
                if col in cols and static:
                    raise ValueError(f"{col} is set and trace {self.trace.source!r} also gives {col}; use one")
            if "loss" in cols and self.ge_p > 0:
                raise ValueError(f"ge_p is set and trace {self.trace.source!r} gives loss; a link has one loss model")

    @property
    def varies(self) -> bool:
        """True when conditions change over time (channel or trace)."""
        return self.channel is not None or self.trace is not None

    @classmethod
    def from_dict(cls, d: object, where: str = "") -> LinkProfile:
        """Build from scenario units; ValueError names the offending key (prefixed by `where`)."""
        pre = f"{where}." if where else ""
        if not isinstance(d, dict):
            raise ValueError(f"{where or 'link profile'}: expected a mapping of link parameters, got {d!r}")
        kw: dict[str, Any] = {}
        given: dict[str, str] = {}
        for key, value in d.items():
            if key in _UNIT_KEYS:
                field, scale = unit_field(key, _UNIT_KEYS, given, pre)
                if field == "rate_bps" and value is None:  # null rate = unlimited
                    kw[field] = math.inf
                    continue
                _check_number(pre + key, value, positive=field == "rate_bps")
                kw[field] = float(value) * scale
            elif key in _PROBABILITIES:
                _check_probability(pre + key, value)
                kw[key] = float(value)
            elif key == "jitter_dist":
                if value not in JITTER_DISTS:
                    raise ValueError(f"{pre}jitter_dist: expected one of {', '.join(JITTER_DISTS)}, got {value!r}")
                kw[key] = value
            elif key in ("mtu", "overhead_bytes", "queue_bytes"):
                _check_int(pre + key, value, 1 if key != "overhead_bytes" else 0, optional=key == "queue_bytes")
                kw[key] = value
            elif key == "channel":
                kw[key] = ChannelProfile.from_dict(value, where=pre + "channel")
            elif key == "trace":
                kw[key] = _trace_from(value, pre + "trace")
            else:
                known = ", ".join(sorted(set(_UNIT_KEYS) | set(_PLAIN_KEYS)))
                raise ValueError(f"{pre}{key}: unknown link parameter; expected one of {known}")
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{pre}{e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Scenario units; only fields that differ from the defaults (from_dict reads it back)."""
        default = LinkProfile()
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v == getattr(default, f.name):
                continue
            if f.name == "rate_bps":
                out["rate_mbps"] = v / 1e6
            elif f.name in ("delay_s", "jitter_s"):
                out[f.name[:-2] + "_ms"] = v * 1e3
            elif f.name == "channel":
                out["channel"] = v.to_dict()
            elif f.name == "trace":
                out["trace"] = {"name": v.source, "loop": v.loop, "random_start": v.random_start}
            else:
                out[f.name] = v
        return out

    def summary(self) -> str:
        """One line for tables."""
        parts = []
        if self.channel is not None:
            c = self.channel
            parts.append(
                f"channel {c.bandwidth_hz / 1e6:g} MHz, SNR {c.mean_snr_db():.1f} dB, {c.fading} "
                f"(~{c.awgn_rate_bps() / 1e6:.3g} Mbit/s unfaded)"
            )
        elif self.trace is not None and "rate_bps" in self.trace.columns():
            parts.append(f"trace {self.trace.source}")
        else:
            parts.append("unlimited" if math.isinf(self.rate_bps) else f"{self.rate_bps / 1e6:g} Mbit/s")
        cols = self.trace.columns() if self.trace is not None else []
        parts.append("delay from trace" if "delay_s" in cols else f"delay {self.delay_s * 1e3:g} ms")
        if "loss" in cols:
            parts.append("loss from trace")
        if self.jitter_s:
            parts.append(f"jitter {self.jitter_s * 1e3:g} ms {self.jitter_dist}")
        if self.loss:
            parts.append(f"loss {self.loss:.3g}")
        if self.ge_p:
            parts.append(f"GE loss ~{gilbert_elliott_loss(self):.3g}")
        if self.duplicate:
            parts.append(f"dup {self.duplicate:g}")
        if self.queue_bytes:
            parts.append(f"queue {self.queue_bytes} B")
        return ", ".join(parts)


def gilbert_elliott_loss(p: LinkProfile) -> float:
    """Stationary loss of the Gilbert-Elliott chain: pi_G (1-k) + pi_B (1-h)."""
    if p.ge_p == 0:
        return 0.0
    bad = p.ge_p / (p.ge_p + p.ge_r)
    return (1 - bad) * p.ge_loss_good + bad * p.ge_loss_bad


def _trace_from(value: object, where: str) -> Trace:
    """`trace: NAME_OR_PATH` or `trace: {name: NAME_OR_PATH, loop: bool, random_start: bool}`."""
    if isinstance(value, str):
        return load_trace(value)
    if isinstance(value, dict):
        unknown = set(value) - {"name", "loop", "random_start"}
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}; expected name, loop, random_start")
        if not isinstance(value.get("name"), str):
            raise ValueError(f"{where}.name: expected a bundled trace name or a CSV path, got {value.get('name')!r}")
        for k in ("loop", "random_start"):
            if k in value and not isinstance(value[k], bool):
                raise ValueError(f"{where}.{k}: expected true or false, got {value[k]!r}")
        try:
            trace = load_trace(value["name"])
        except ValueError as e:
            raise ValueError(f"{where}.name: {e}") from None
        return trace.with_options(loop=value.get("loop"), random_start=value.get("random_start"))
    raise ValueError(f"{where}: expected a trace name, a CSV path or a mapping with 'name', got {value!r}")


@dataclass(frozen=True)
class DuplexProfile:
    """Both directions: uplink = device -> verifier, downlink = verifier -> device."""

    uplink: LinkProfile
    downlink: LinkProfile
    description: str = ""

    def __post_init__(self) -> None:
        for name in ("uplink", "downlink"):
            if not isinstance(getattr(self, name), LinkProfile):
                raise ValueError(f"{name}: expected a LinkProfile, got {type(getattr(self, name)).__name__}")

    @classmethod
    def from_dict(cls, d: object) -> DuplexProfile:
        if not isinstance(d, dict):
            raise ValueError(f"link profile: expected a mapping with 'uplink' and 'downlink', got {d!r}")
        unknown = set(d) - {"uplink", "downlink", "description"}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown key; expected uplink, downlink, description")
        for name in ("uplink", "downlink"):
            if name not in d:
                raise ValueError(f"{name}: missing; a duplex profile needs both uplink and downlink")
        return cls(
            LinkProfile.from_dict(d["uplink"], where="uplink"),
            LinkProfile.from_dict(d["downlink"], where="downlink"),
            str(d.get("description", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uplink": self.uplink.to_dict(), "downlink": self.downlink.to_dict()}
        if self.description:
            out["description"] = self.description
        return out

    def direction(self, name: str) -> LinkProfile:
        if name not in ("uplink", "downlink"):
            raise ValueError(f"direction: expected 'uplink' or 'downlink', got {name!r}")
        return self.uplink if name == "uplink" else self.downlink
