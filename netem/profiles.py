"""Bundled named link profiles: `get_profile(name)`, `list_profiles()`.

Numbers are rounded, representative values, not measurements of one network; where a
standard or a paper gives the number it is named, otherwise the value is marked as our
choice. One-way delays are device <-> verifier (radio plus a short path to an edge server).

- ideal: no shaping at all (for tests and for separating compute effects from link effects).
- 5g-good: mid-band 5G NR, good coverage. Down 200 / up 30 Mbit/s: the order of the median 5G
  speeds that Ookla's Speedtest and Opensignal reports give for leading markets (2023-24),
  rounded. One-way 8 ms with 2 ms normal jitter: 3GPP TR 38.913 sets a 4 ms one-way user-plane
  target for eMBB radio; the rest is core and edge transport (our choice). No residual loss
  (HARQ and RLC repair radio errors).
- lte-edge: LTE at the cell edge of a loaded urban macro cell. ITU-R M.2134 requires cell-edge
  (5th percentile) user spectral efficiency of 0.06 bit/s/Hz down and 0.03 up (base coverage
  urban); over 20 MHz that is 1.2 / 0.6 Mbit/s. One-way 40 ms, 15 ms pareto jitter (scheduling
  and retransmissions give a heavy tail; our choice). Bursty residual loss, Gilbert-Elliott
  p = 1%, r = 30%, 1-h = 50% (stationary loss ~1.6%; our choice).
- wifi-strong: 802.11ac, 80 MHz, 2 streams, MCS 9 near the access point: 866.7 Mbit/s PHY
  (IEEE 802.11-2020 VHT MCS table); about half of it as throughput, down 400 / up 300 Mbit/s.
  One-way 1.5 ms, 0.5 ms normal jitter (our choice).
- wifi-weak: 802.11n HT20, one stream, MCS 1-2 (13-19.5 Mbit/s PHY, IEEE 802.11-2020 HT MCS
  table) at the edge of coverage: down 8 / up 6 Mbit/s. One-way 5 ms, 4 ms pareto jitter
  (retries), 1% loss with correlation 0.3 (our choice).
- paper-uplink: the uplink form of the U-HLM / CU-HLM papers (Oh et al., arXiv:2412.12687 and
  arXiv:2505.11788): rate = W log2(1 + SNR), no fading. W = 10 MHz and SNR = 10 dB are our
  choice (34.6 Mbit/s; we could not check the papers' exact values offline) -- override them
  with `channel: {bandwidth_mhz: ..., snr_db: ...}`. Delay 5 ms; downlink the same channel.
- cell-rayleigh: a macro cell with Rayleigh block fading and a 3GPP link budget. Path loss
  128.1 + 37.6 log10(d[km]) dB (3GPP TR 36.814, macro, 2 GHz), 10 MHz, device at 300 m.
  Uplink: 23 dBm (3GPP power class 3 UE), base station noise figure 5 dB -> mean SNR ~13.6 dB.
  Downlink: 46 dBm, UE noise figure 9 dB (TR 36.814) -> ~32.6 dB. Coherence time 75 ms: Doppler
  at 3 km/h and 2 GHz, 0.423 / f_d (Rappaport). Efficiency 0.6 of Shannon (our choice).
  One-way 15 ms.
- wifi-walk: the bundled wifi-walk-up / wifi-walk-down traces (walking away from an 802.11n
  access point and back; see netem/data/make_traces.py).
- lte-drive: the bundled lte-drive-up / lte-drive-down traces (120 s in a car), each link
  starting at its own seeded offset so devices do not fade in lockstep.
"""

from __future__ import annotations

import functools
from typing import Any

from netem.profile import DuplexProfile

# A table, laid out by hand: one direction a line.
# fmt: off
_PROFILES: dict[str, dict[str, Any]] = {
    "ideal": {
        "description": "No shaping: infinite rate, zero delay, no loss.",
        "uplink": {}, "downlink": {},
    },
    "5g-good": {
        "description": "Mid-band 5G NR, good coverage (Ookla/Opensignal medians; 3GPP TR 38.913 latency).",
        "uplink": {"rate_mbps": 30, "delay_ms": 8, "jitter_ms": 2, "jitter_dist": "normal"},
        "downlink": {"rate_mbps": 200, "delay_ms": 8, "jitter_ms": 2, "jitter_dist": "normal"},
    },
    "lte-edge": {
        "description": "LTE cell edge, loaded urban macro (ITU-R M.2134 cell-edge efficiency x 20 MHz).",
        "uplink": {"rate_mbps": 0.6, "delay_ms": 40, "jitter_ms": 15, "jitter_dist": "pareto",
                   "ge_p": 0.01, "ge_r": 0.3, "ge_loss_bad": 0.5},
        "downlink": {"rate_mbps": 1.2, "delay_ms": 40, "jitter_ms": 15, "jitter_dist": "pareto",
                     "ge_p": 0.01, "ge_r": 0.3, "ge_loss_bad": 0.5},
    },
    "wifi-strong": {
        "description": "802.11ac 80 MHz 2x2 near the AP (IEEE 802.11 VHT MCS 9).",
        "uplink": {"rate_mbps": 300, "delay_ms": 1.5, "jitter_ms": 0.5, "jitter_dist": "normal"},
        "downlink": {"rate_mbps": 400, "delay_ms": 1.5, "jitter_ms": 0.5, "jitter_dist": "normal"},
    },
    "wifi-weak": {
        "description": "802.11n HT20 1x1 at the coverage edge (IEEE 802.11 HT MCS 1-2).",
        "uplink": {"rate_mbps": 6, "delay_ms": 5, "jitter_ms": 4, "jitter_dist": "pareto",
                   "loss": 0.01, "loss_correlation": 0.3},
        "downlink": {"rate_mbps": 8, "delay_ms": 5, "jitter_ms": 4, "jitter_dist": "pareto",
                     "loss": 0.01, "loss_correlation": 0.3},
    },
    "paper-uplink": {
        "description": "U-HLM/CU-HLM papers' rate = W log2(1+SNR); W = 10 MHz, SNR = 10 dB (our choice).",
        "uplink": {"channel": {"bandwidth_mhz": 10, "snr_db": 10}, "delay_ms": 5},
        "downlink": {"channel": {"bandwidth_mhz": 10, "snr_db": 10}, "delay_ms": 5},
    },
    "cell-rayleigh": {
        "description": "Macro cell, Rayleigh block fading, 3GPP TR 36.814 link budget at 300 m.",
        "uplink": {"delay_ms": 15, "channel": {
            "bandwidth_mhz": 10, "tx_power_dbm": 23, "distance_m": 300, "path_loss_exponent": 3.76,
            "ref_distance_m": 1000, "ref_loss_db": 128.1, "noise_figure_db": 5, "carrier_ghz": 2,
            "fading": "rayleigh", "coherence_ms": 75, "efficiency": 0.6}},
        "downlink": {"delay_ms": 15, "channel": {
            "bandwidth_mhz": 10, "tx_power_dbm": 46, "distance_m": 300, "path_loss_exponent": 3.76,
            "ref_distance_m": 1000, "ref_loss_db": 128.1, "noise_figure_db": 9, "carrier_ghz": 2,
            "fading": "rayleigh", "coherence_ms": 75, "efficiency": 0.6}},
    },
    "wifi-walk": {
        "description": "Trace: walking away from an 802.11n AP and back (synthetic; ITU-R P.1238).",
        "uplink": {"trace": "wifi-walk-up"},
        "downlink": {"trace": "wifi-walk-down"},
    },
    "lte-drive": {
        "description": "Trace: 120 s LTE drive with two handovers (synthetic), random start per link.",
        "uplink": {"trace": {"name": "lte-drive-up", "random_start": True}},
        "downlink": {"trace": {"name": "lte-drive-down", "random_start": True}},
    },
}
# fmt: on


@functools.cache
def get_profile(name: str) -> DuplexProfile:
    """The bundled profile `name`; KeyError listing the known names otherwise."""
    if name not in _PROFILES:
        raise KeyError(f"unknown link profile {name!r}; known: {', '.join(_PROFILES)}")
    return DuplexProfile.from_dict(_PROFILES[name])


def list_profiles() -> dict[str, DuplexProfile]:
    """Every bundled profile by name, in a stable order."""
    return {name: get_profile(name) for name in _PROFILES}
