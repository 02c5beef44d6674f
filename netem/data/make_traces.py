"""Regenerate the bundled traces: `python netem/data/make_traces.py` (deterministic).

The bundled traces are synthetic: computed here from published models and numbers, not
copies of measured datasets (none can be fetched offline). Each trace is 0.1 s steps of
time_s, rate_mbps, delay_ms, loss.

wifi-walk-{up,down}.csv -- a person walks away from an 802.11n access point in an office,
from 3 m to 45 m at 1 m/s, then back (84 s).
  * Path loss: ITU-R P.1238 site-general indoor model, L = 20 log10 f[MHz] + N log10 d[m] - 28
    with N = 31 (office, 5.2 GHz), same floor; f = 5200 MHz.
  * Shadowing: log-normal, 4 dB standard deviation, correlated over ~5 m (Gudmundson-style
    AR(1) along the walk) -- our choice, milder than P.1238's measured spreads.
  * Transmit power: access point 20 dBm (downlink), phone 15 dBm (uplink) -- typical values,
    our choice.
  * Rate: the highest 802.11n HT20 single-stream MCS whose receiver minimum input sensitivity
    (IEEE 802.11-2020, Table 19-23: MCS0..7 = -82, -79, -77, -74, -70, -66, -65, -64 dBm) the
    received power meets; PHY rates 6.5 .. 65 Mbit/s (800 ns GI), times 0.65 MAC efficiency
    (our choice for an aggregating MAC). Below -82 dBm: outage, rate 0.
  * Delay: 2 ms plus one 1500-byte frame's airtime at that rate (our choice).
  * Loss after MAC retries: 10% at 0 dB margin over the MCS threshold, falling tenfold per
    2 dB of margin, below 1e-4 treated as 0 (our choice); 100% in outage.

lte-drive-{up,down}.csv -- 120 s of an LTE device in a car, as a random but seeded process.
  * Rate: log-normal with an AR(1) log (correlation time 2 s): median 4 Mbit/s up, 15 Mbit/s
    down, sd of ln(rate) 0.8; two handovers (t = 40 s and 95 s) with 0.5 s at 2% of the rate.
    Ranges chosen to resemble public LTE drive measurements (e.g. the 4G dataset of Raca et al.,
    "Beyond Throughput: a 4G LTE Dataset with Channel and Context Metrics", MMSys 2018, and the
    cellular traces of Winstein et al., "Stochastic Forecasts Achieve High Throughput and Low
    Delay over Cellular Networks" (Sprout), NSDI 2013); not a copy of either.
  * Delay: 25 ms one-way plus queueing that grows as the rate drops, 40 ms / rate[Mbit/s],
    capped at 250 ms (our choice).
  * Loss: 0.05% normally, 5% during a handover (our choice).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
STEP = 0.1
MCS_SENSITIVITY_DBM = (-82, -79, -77, -74, -70, -66, -65, -64)
MCS_PHY_MBPS = (6.5, 13.0, 19.5, 26.0, 39.0, 52.0, 58.5, 65.0)
MAC_EFFICIENCY = 0.65


def _ar1(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """Standard-normal AR(1) series with lag-1 correlation corr."""
    out = np.empty(n)
    out[0] = rng.standard_normal()
    e = rng.standard_normal(n)
    for i in range(1, n):
        out[i] = corr * out[i - 1] + math.sqrt(1 - corr * corr) * e[i]
    return out


def wifi_walk(tx_dbm: float, seed: int) -> list[tuple[float, ...]]:
    t = np.arange(0.0, 84.0, STEP)
    distance = np.where(t < 42.0, 3.0 + t, 45.0 - (t - 42.0))
    shadow = 4.0 * _ar1(np.random.default_rng(seed), len(t), math.exp(-STEP * 1.0 / 5.0))  # 1 m/s, 5 m
    loss_db = 20 * math.log10(5200) + 31 * np.log10(distance) - 28 + shadow
    rx = tx_dbm - loss_db
    rows: list[tuple[float, ...]] = []
    for ti, p in zip(t, rx):
        ok = [i for i, s in enumerate(MCS_SENSITIVITY_DBM) if p >= s]
        if not ok:
            rows.append((round(ti, 1), 0.0, 50.0, 1.0))
            continue
        m = ok[-1]
        rate = MCS_PHY_MBPS[m] * MAC_EFFICIENCY
        margin = p - MCS_SENSITIVITY_DBM[m]
        loss = 0.1 * 10 ** (-margin / 2.0)
        rows.append((round(ti, 1), round(rate, 3), round(2.0 + 12.0 / rate, 3), 0.0 if loss < 1e-4 else round(loss, 5)))
    return rows


def lte_drive(median_mbps: float, seed: int) -> list[tuple[float, ...]]:
    t = np.arange(0.0, 120.0, STEP)
    rate = median_mbps * np.exp(0.8 * _ar1(np.random.default_rng(seed), len(t), math.exp(-STEP / 2.0)))
    handover = ((t >= 40.0) & (t < 40.5)) | ((t >= 95.0) & (t < 95.5))
    rate = np.where(handover, rate * 0.02, rate)
    delay = np.minimum(25.0 + 40.0 / rate, 275.0)
    loss = np.where(handover, 0.05, 0.0005)
    return [(round(a, 1), round(b, 3), round(c, 2), d) for a, b, c, d in zip(t, rate, delay, loss)]


def write(name: str, rows: list[tuple[float, ...]], header: str) -> None:
    lines = [
        f"# {header}",
        "# Synthetic; see netem/data/make_traces.py for the model and sources.",
        "time_s,rate_mbps,delay_ms,loss",
    ]
    lines += [",".join(f"{v:g}" for v in row) for row in rows]
    (HERE / f"{name}.csv").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write("wifi-walk-down", wifi_walk(20.0, seed=1), "802.11n walk-away, access point -> phone (20 dBm)")
    write("wifi-walk-up", wifi_walk(15.0, seed=1), "802.11n walk-away, phone -> access point (15 dBm)")
    write("lte-drive-down", lte_drive(15.0, seed=2), "LTE drive, downlink (median 15 Mbit/s)")
    write("lte-drive-up", lte_drive(4.0, seed=3), "LTE drive, uplink (median 4 Mbit/s)")
