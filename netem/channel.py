"""Wireless channel: Shannon rate from SNR, a link budget for SNR, and block fading.

Two ways to describe a channel (`ChannelProfile`):

- the papers' simple form: bandwidth W and a mean SNR, rate = W * log2(1 + SNR)
  (`ChannelProfile(bandwidth_hz=10e6, snr_db=10)`);
- a link budget: SNR = transmit power - path loss(distance) - noise, with
  path loss PL(d) = PL(d0) + 10 * n * log10(d / d0) (log-distance model) and noise
  N = -174 dBm/Hz + 10 * log10(W) + noise figure (thermal noise at 290 K).

Fading is block fading: the complex gain h is constant for `coherence_s` seconds, then
drawn afresh (Rayleigh, or Rician with K factor), normalised so E|h|^2 = 1. The rate in a
block is efficiency * W * log2(1 + SNR * |h|^2); its long-run mean is the ergodic capacity
E[W log2(1 + SNR |h|^2)], which is below W log2(1 + SNR) (Jensen).

`ChannelProcess(channel, seed)` gives that rate over time. Block k's gain is computed from
(seed, k) alone (counter-based Philox, in chunks of 256 blocks), so any time can be looked up
in O(1) without replaying history or storing it: a link jumping to t = 1 hour never stalls.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, overload

import numpy as np
import numpy.typing as npt

SPEED_OF_LIGHT = 299_792_458.0
THERMAL_NOISE_DBM_HZ = -174.0  # kT at 290 K
FADING_KINDS = ("none", "rayleigh", "rician")
_CHUNK = 256  # fading blocks generated per numpy call


def db_to_linear(db: npt.ArrayLike) -> np.ndarray:
    return 10.0 ** (np.asarray(db, dtype=float) / 10.0)


@overload
def shannon_rate(bandwidth_hz: float, snr_db: float) -> float: ...
@overload
def shannon_rate(bandwidth_hz: npt.ArrayLike, snr_db: npt.ArrayLike) -> np.ndarray | float: ...
def shannon_rate(bandwidth_hz: Any, snr_db: Any) -> np.ndarray | float:  # the overloads type it
    """W * log2(1 + SNR) in bit/s; SNR given in dB. Works on scalars and numpy arrays."""
    if np.ndim(bandwidth_hz) or np.ndim(snr_db):
        return np.asarray(bandwidth_hz, dtype=float) * np.log2(1.0 + db_to_linear(snr_db))
    return float(bandwidth_hz * math.log2(1.0 + 10.0 ** (snr_db / 10.0)))


def free_space_loss_db(distance_m: float, carrier_hz: float) -> float:
    """Friis free-space path loss 20 log10(4 pi d f / c)."""
    return 20.0 * math.log10(4.0 * math.pi * distance_m * carrier_hz / SPEED_OF_LIGHT)


def path_loss_db(distance_m: float, exponent: float, ref_distance_m: float, ref_loss_db: float) -> float:
    """Log-distance path loss: PL(d0) + 10 n log10(d / d0)."""
    return ref_loss_db + 10.0 * exponent * math.log10(distance_m / ref_distance_m)


def noise_dbm(bandwidth_hz: float, noise_figure_db: float = 0.0, psd_dbm_hz: float = THERMAL_NOISE_DBM_HZ) -> float:
    """Receiver noise power over the band."""
    return psd_dbm_hz + 10.0 * math.log10(bandwidth_hz) + noise_figure_db


def coherence_time(speed_mps: float, carrier_hz: float) -> float:
    """Coherence time 0.423 / f_d with Doppler f_d = v f / c (Clarke's model, as in
    Rappaport, Wireless Communications, sec. 5.4)."""
    return 0.423 / (speed_mps * carrier_hz / SPEED_OF_LIGHT)


# Scenario-friendly keys -> (field, scale to SI). Tables, laid out by hand: one quantity a line.
# fmt: off
_UNIT_KEYS = {
    "bandwidth_hz": ("bandwidth_hz", 1.0), "bandwidth_khz": ("bandwidth_hz", 1e3),
    "bandwidth_mhz": ("bandwidth_hz", 1e6),
    "distance_m": ("distance_m", 1.0), "distance_km": ("distance_m", 1e3),
    "carrier_hz": ("carrier_hz", 1.0), "carrier_mhz": ("carrier_hz", 1e6), "carrier_ghz": ("carrier_hz", 1e9),
    "coherence_s": ("coherence_s", 1.0), "coherence_ms": ("coherence_s", 1e-3),
}
_PLAIN_KEYS = ("snr_db", "tx_power_dbm", "path_loss_exponent", "ref_distance_m", "ref_loss_db",
               "noise_psd_dbm_hz", "noise_figure_db", "fading", "rician_k", "rician_k_db", "efficiency")
# fmt: on


def _num(where: str, key: str, value: object, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}{key}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{where}{key}: expected a number > 0, got {value!r}")
    if nonneg and value < 0:
        raise ValueError(f"{where}{key}: expected a number >= 0, got {value!r}")
    return float(value)


def unit_field(key: str, units: dict[str, tuple[str, float]], given: dict[str, str], where: str) -> tuple[str, float]:
    """(field, scale to SI) that a scenario key with a unit sets (`units[key]`); ValueError when
    another key of `given` (field -> key) already set that field. Records this one."""
    field, scale = units[key]
    if field in given:
        raise ValueError(f"{where}{key}: {given[field]!r} already gives {field}; use one")
    given[field] = key
    return field, scale


def _maybe_num(where: str, key: str, value: object, *, positive: bool = False) -> float | None:
    """_num for an optional field: None passes."""
    return None if value is None else _num(where, key, value, positive=positive)


@dataclass(frozen=True)
class ChannelProfile:
    """A wireless channel whose Shannon rate drives a link's rate.

    Give either `snr_db` (mean SNR directly: the papers' form) or a link budget
    (`tx_power_dbm` and `distance_m`, with path-loss exponent, reference loss and noise).
    `ref_loss_db=None` means free-space loss at `ref_distance_m` for `carrier_hz`.
    `efficiency` scales the Shannon rate (real modulation and coding reach a fraction of it).
    """

    bandwidth_hz: float
    snr_db: float | None = None
    tx_power_dbm: float | None = None
    distance_m: float | None = None
    path_loss_exponent: float = 3.0
    ref_distance_m: float = 1.0
    ref_loss_db: float | None = None
    carrier_hz: float = 2e9
    noise_psd_dbm_hz: float = THERMAL_NOISE_DBM_HZ
    noise_figure_db: float = 0.0
    fading: str = "none"
    rician_k: float = 0.0  # linear K factor (LOS power / scattered power); 0 = Rayleigh
    coherence_s: float = 0.01
    efficiency: float = 1.0

    def __post_init__(self) -> None:
        w = "channel."
        _num(w, "bandwidth_hz", self.bandwidth_hz, positive=True)
        _maybe_num(w, "snr_db", self.snr_db)
        _maybe_num(w, "tx_power_dbm", self.tx_power_dbm)
        _maybe_num(w, "distance_m", self.distance_m, positive=True)
        _num(w, "path_loss_exponent", self.path_loss_exponent, positive=True)
        _num(w, "ref_distance_m", self.ref_distance_m, positive=True)
        _maybe_num(w, "ref_loss_db", self.ref_loss_db)
        _num(w, "carrier_hz", self.carrier_hz, positive=True)
        _num(w, "noise_psd_dbm_hz", self.noise_psd_dbm_hz)
        _num(w, "noise_figure_db", self.noise_figure_db, nonneg=True)
        _num(w, "rician_k", self.rician_k, nonneg=True)
        _num(w, "coherence_s", self.coherence_s, positive=True)
        _num(w, "efficiency", self.efficiency, positive=True)
        if self.efficiency > 1:
            raise ValueError(
                f"channel.efficiency: expected a fraction in (0, 1] of the Shannon rate, got {self.efficiency!r}"
            )
        if self.fading not in FADING_KINDS:
            raise ValueError(f"channel.fading: expected one of {', '.join(FADING_KINDS)}, got {self.fading!r}")
        budget = self.tx_power_dbm is not None or self.distance_m is not None
        if self.snr_db is not None and budget:
            raise ValueError("channel: give either snr_db or a link budget (tx_power_dbm, distance_m), not both")
        if self.snr_db is None and (self.tx_power_dbm is None or self.distance_m is None):
            raise ValueError("channel: expected snr_db, or both tx_power_dbm and distance_m for a link budget")

    @classmethod
    def from_dict(cls, d: object, where: str = "channel") -> ChannelProfile:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping of channel parameters, got {d!r}")
        kw: dict[str, Any] = {}
        given: dict[str, str] = {}
        for key, value in d.items():
            if key in _UNIT_KEYS:
                field, scale = unit_field(key, _UNIT_KEYS, given, f"{where}.")
                kw[field] = _num(f"{where}.", key, value, positive=True) * scale  # all such fields are > 0
            elif key == "rician_k_db":
                if "rician_k" in given:
                    raise ValueError(f"{where}: 'rician_k' and 'rician_k_db' both given; use one")
                given["rician_k"] = key
                kw["rician_k"] = 10.0 ** (_num(f"{where}.", key, value) / 10.0)
            elif key in _PLAIN_KEYS:
                if key == "rician_k" and "rician_k" in given:
                    raise ValueError(f"{where}: 'rician_k' and 'rician_k_db' both given; use one")
                given[key] = key
                kw[key] = value
            else:
                known = sorted(set(_UNIT_KEYS) | set(_PLAIN_KEYS))
                raise ValueError(f"{where}: unknown key {key!r}; expected one of {', '.join(known)}")
        if "bandwidth_hz" not in kw:
            raise ValueError(f"{where}: missing the bandwidth (bandwidth_hz, bandwidth_khz or bandwidth_mhz)")
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(str(e).replace("channel", where, 1)) from None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        return d

    def reference_loss_db(self) -> float:
        if self.ref_loss_db is not None:
            return self.ref_loss_db
        return free_space_loss_db(self.ref_distance_m, self.carrier_hz)

    def mean_snr_db(self) -> float:
        """Mean SNR (before fading): given directly, or from the link budget."""
        if self.snr_db is not None:
            return self.snr_db
        assert self.distance_m is not None and self.tx_power_dbm is not None  # __post_init__: a link budget
        pl = path_loss_db(self.distance_m, self.path_loss_exponent, self.ref_distance_m, self.reference_loss_db())
        return self.tx_power_dbm - pl - noise_dbm(self.bandwidth_hz, self.noise_figure_db, self.noise_psd_dbm_hz)

    def awgn_rate_bps(self) -> float:
        """Rate without fading: efficiency * W log2(1 + mean SNR)."""
        return self.efficiency * shannon_rate(self.bandwidth_hz, self.mean_snr_db())


def fading_gains(channel: ChannelProfile, seed: int, chunk: int) -> np.ndarray:
    """|h|^2 for blocks [chunk * 256, (chunk + 1) * 256), from (seed, chunk) alone.

    Uniforms come from the raw Philox stream (stable across numpy versions) and normals by
    Box-Muller, so a seed gives the same channel everywhere.
    """
    bits = np.random.Philox(np.random.SeedSequence([seed & (2**64 - 1), chunk])).random_raw(2 * _CHUNK)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1]
    u1, u2 = u[:_CHUNK], u[_CHUNK:]
    r = np.sqrt(-2.0 * np.log(u1))
    x, y = r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)  # two independent N(0, 1)
    k = channel.rician_k if channel.fading == "rician" else 0.0
    # h = sqrt(K/(K+1)) (LOS) + sqrt(1/(K+1)) CN(0, 1); E|h|^2 = 1.
    los = math.sqrt(k / (k + 1.0))
    s = math.sqrt(1.0 / (2.0 * (k + 1.0)))
    return (los + s * x) ** 2 + (s * y) ** 2


class ChannelProcess:
    """The rate a channel offers over time: piecewise constant over coherence blocks."""

    def __init__(self, channel: ChannelProfile, seed: int = 0):
        self.channel = channel
        self.seed = int(seed)
        self._snr = 10.0 ** (channel.mean_snr_db() / 10.0)
        self._scale = channel.efficiency * channel.bandwidth_hz
        self._fixed = channel.awgn_rate_bps() if channel.fading == "none" else None
        self._chunk = -1
        self._rates: list[float] = []

    def block_rates(self, chunk: int) -> list[float]:
        if chunk != self._chunk:
            g = fading_gains(self.channel, self.seed, chunk)
            self._rates = (self._scale * np.log2(1.0 + self._snr * g)).tolist()
            self._chunk = chunk
        return self._rates

    def rate_segment(self, t: float) -> tuple[float, float]:
        """(rate in bit/s at time t, time when that rate may next change)."""
        if self._fixed is not None:
            return self._fixed, math.inf
        tc = self.channel.coherence_s
        k = int(t // tc)
        end = (k + 1) * tc
        if end <= t:  # float rounding at a block edge
            k += 1
            end = (k + 1) * tc
        return self.block_rates(k // _CHUNK)[k % _CHUNK], end

    def rate_at(self, t: float) -> float:
        return self.rate_segment(t)[0]
