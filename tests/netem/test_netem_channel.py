"""Wireless channel against theory: Shannon rate, link budget, fading statistics, ergodic
capacity through the link."""

from __future__ import annotations

import math

import numpy as np
import pytest

from netem import ChannelProcess, ChannelProfile, Link, LinkProfile, get_profile, shannon_rate
from netem.channel import coherence_time, fading_gains, free_space_loss_db, noise_dbm


def ergodic_rayleigh(w: float, snr_db: float) -> float:
    """E[W log2(1 + SNR X)], X ~ Exp(1), in closed form: (W / ln 2) e^(1/SNR) E1(1/SNR),
    with the exponential integral E1(x) = -gamma - ln x - sum_k (-x)^k / (k k!)."""
    x = 1 / 10 ** (snr_db / 10)
    e1 = -0.5772156649015329 - math.log(x) - sum((-x) ** k / (k * math.factorial(k)) for k in range(1, 60))
    return w / math.log(2) * math.exp(x) * e1


def test_ergodic_formula_agrees_with_quadrature():
    nodes, weights = np.polynomial.laguerre.laggauss(60)
    quad = float(1e6 * np.sum(weights * np.log2(1 + 10.0 * nodes)))
    assert ergodic_rayleigh(1e6, 10.0) == pytest.approx(quad, rel=1e-3)


def test_shannon_rate_values():
    assert shannon_rate(1e6, 0.0) == pytest.approx(1e6)  # log2(2) = 1
    assert shannon_rate(20e6, 30.0) == pytest.approx(20e6 * math.log2(1001))
    arr = shannon_rate(np.array([1e6, 2e6]), np.array([0.0, 0.0]))
    assert np.allclose(arr, [1e6, 2e6])


def test_link_budget_matches_hand_computation():
    # 3GPP TR 36.814 macro: PL = 128.1 + 37.6 log10(0.3) = 108.44 dB at 300 m;
    # noise = -174 + 10 log10(10 MHz) + 5 dB = -99 dBm; SNR = 23 - 108.44 + 99 = 13.56 dB.
    assert get_profile("cell-rayleigh").uplink.channel.mean_snr_db() == pytest.approx(13.56, abs=0.01)
    assert noise_dbm(10e6, 5.0) == pytest.approx(-99.0)
    assert free_space_loss_db(1.0, 2.4e9) == pytest.approx(40.05, abs=0.01)
    # f_d = 1 m/s * 3 GHz / c ~ 10.007 Hz
    assert coherence_time(1.0, 3e9) == pytest.approx(0.423 / (3e9 / 299_792_458.0))


def test_the_papers_simple_form_gives_a_constant_shannon_rate():
    ch = ChannelProfile(bandwidth_hz=10e6, snr_db=10.0)
    proc = ChannelProcess(ch, seed=1)
    assert proc.rate_segment(123.4) == (pytest.approx(10e6 * math.log2(11)), math.inf)
    link = Link(LinkProfile(channel=ch), seed=1)
    assert link.send(1500, 0.0) == pytest.approx(1500 * 8 / (10e6 * math.log2(11)))


def test_rayleigh_mean_rate_is_the_ergodic_capacity_not_the_awgn_rate():
    ch = ChannelProfile(bandwidth_hz=1e6, snr_db=10.0, fading="rayleigh", coherence_s=0.001)
    proc = ChannelProcess(ch, seed=3)
    rates = np.array([proc.rate_at(k * 0.001 + 0.0005) for k in range(100_000)])
    theory = ergodic_rayleigh(1e6, 10.0)
    assert rates.mean() == pytest.approx(theory, rel=0.01)
    assert theory < 0.9 * shannon_rate(1e6, 10.0)  # Jensen: fading costs capacity


def test_rayleigh_faded_link_delivers_the_ergodic_capacity_within_5pct():
    ch = ChannelProfile(bandwidth_hz=1e6, snr_db=10.0, fading="rayleigh", coherence_s=0.01)
    link = Link(LinkProfile(channel=ch), seed=9)
    # Saturate for ~200 emulated seconds (20,000 coherence blocks).
    t_end, n, last = 200.0, 0, 0.0
    while last < t_end:
        last = link.send(1500, 0.0)
        n += 1
    assert n * 1500 * 8 / last == pytest.approx(ergodic_rayleigh(1e6, 10.0), rel=0.05)


def test_fading_gain_statistics():
    ray = np.concatenate(
        [fading_gains(ChannelProfile(bandwidth_hz=1, snr_db=0, fading="rayleigh"), 1, c) for c in range(400)]
    )
    assert ray.mean() == pytest.approx(1.0, rel=0.02)
    assert ray.var() == pytest.approx(1.0, rel=0.05)  # |h|^2 ~ Exp(1)
    assert np.mean(ray < 0.1) == pytest.approx(1 - math.exp(-0.1), rel=0.05)
    k = 10.0
    ric = np.concatenate(
        [fading_gains(ChannelProfile(bandwidth_hz=1, snr_db=0, fading="rician", rician_k=k), 1, c) for c in range(400)]
    )
    assert ric.mean() == pytest.approx(1.0, rel=0.01)
    assert ric.var() == pytest.approx((1 + 2 * k) / (1 + k) ** 2, rel=0.05)


def test_block_fading_is_constant_within_a_block_and_independent_across_blocks():
    tc = 0.02
    proc = ChannelProcess(ChannelProfile(bandwidth_hz=1e6, snr_db=5, fading="rayleigh", coherence_s=tc), seed=5)
    for k in (0, 7, 1000):
        inside = {proc.rate_at(k * tc + f * tc) for f in (0.0, 0.3, 0.99)}
        assert len(inside) == 1
        assert proc.rate_segment(k * tc + 0.5 * tc)[1] == pytest.approx((k + 1) * tc)
    r = np.array([proc.rate_at((k + 0.5) * tc) for k in range(50_000)])
    assert abs(np.corrcoef(r[:-1], r[1:])[0, 1]) < 0.02


def test_channel_is_deterministic_and_random_access():
    ch = ChannelProfile(bandwidth_hz=1e6, snr_db=5, fading="rician", rician_k=3, coherence_s=0.01)
    a, b = ChannelProcess(ch, seed=1), ChannelProcess(ch, seed=1)
    times = [3600.0, 0.5, 1e5, 0.5]
    assert [a.rate_at(t) for t in times] == [b.rate_at(t) for t in reversed(times)][::-1]
    assert ChannelProcess(ch, seed=2).rate_at(0.5) != a.rate_at(0.5)


def test_link_follows_the_channel_rate_in_each_block():
    ch = ChannelProfile(bandwidth_hz=1e6, snr_db=10, fading="rayleigh", coherence_s=0.5)
    link = Link(LinkProfile(channel=ch), seed=4)
    proc = ChannelProcess(ch, seed=0)  # only for its formula; the link has its own realisation
    for k in range(5):
        t = k * 0.5 + 0.1
        rate = link.conditions_at(t)[0]
        assert link.send(100, t) == pytest.approx(t + 800 / rate)
    assert proc.channel == ch


def test_channel_profile_validation():
    with pytest.raises(ValueError, match="snr_db or a link budget"):
        ChannelProfile(bandwidth_hz=1e6, snr_db=3, tx_power_dbm=20, distance_m=10)
    with pytest.raises(ValueError, match="expected snr_db"):
        ChannelProfile(bandwidth_hz=1e6)
    with pytest.raises(ValueError, match="fading"):
        ChannelProfile(bandwidth_hz=1e6, snr_db=3, fading="nakagami")
    with pytest.raises(ValueError, match="uplink.channel.bandwidth_mhz"):
        LinkProfile.from_dict({"channel": {"bandwidth_mhz": -1, "snr_db": 3}}, where="uplink")
    with pytest.raises(ValueError, match="uplink.channel: unknown key 'snr'"):
        LinkProfile.from_dict({"channel": {"bandwidth_mhz": 1, "snr": 3}}, where="uplink")
    with pytest.raises(ValueError, match="rate comes from the channel"):
        LinkProfile.from_dict({"rate_mbps": 5, "channel": {"bandwidth_mhz": 1, "snr_db": 3}})
    ch = LinkProfile.from_dict(
        {"channel": {"bandwidth_khz": 500, "snr_db": 3, "rician_k_db": 10, "fading": "rician", "coherence_ms": 5}}
    ).channel
    assert (ch.bandwidth_hz, ch.rician_k, ch.coherence_s) == pytest.approx((5e5, 10.0, 0.005))
