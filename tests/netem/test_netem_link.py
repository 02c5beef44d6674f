"""The link model against theory: rate, delay/jitter statistics, loss models, queue limit,
packetisation, duplication, determinism."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from netem import Link, LinkProfile, link_seed
from netem.profile import gilbert_elliott_loss


def delays(profile: LinkProfile, n: int, seed: int = 7, nbytes: int = 100, gap: float = 1e-3) -> np.ndarray:
    """One-way delays of n single-packet messages (NaN = lost)."""
    link = Link(profile, seed)
    out = np.empty(n)
    for i in range(n):
        t = i * gap
        a = link.send(nbytes, t)
        out[i] = np.nan if a is None else a - t
    return out


# -- rate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("jitter_ms", [0.0, 3.0])
def test_long_saturating_stream_delivers_the_rate_within_1pct(jitter_ms):
    """Goodput of a saturated link = R x payload / (payload + per-packet overhead)."""
    rate, mtu, overhead = 8e6, 1500, 40
    link = Link(
        LinkProfile(
            rate_bps=rate,
            delay_s=0.02,
            jitter_s=jitter_ms / 1e3,
            jitter_dist="normal",
            mtu=mtu,
            overhead_bytes=overhead,
        ),
        seed=3,
    )
    rng = random.Random(1)
    sizes = [rng.randint(1, 5000) for _ in range(20_000)]
    arrivals = [link.send(n, i * 1e-4) for i, n in enumerate(sizes)]  # offered ~200 Mbit/s
    payload = sum(sizes)
    wire = sum(n + overhead * max(1, math.ceil(n / mtu)) for n in sizes)
    # Everything is delivered; measure from the first to the last arrival.
    span = max(arrivals) - min(arrivals)
    goodput = (payload - sizes[int(np.argmin(arrivals))]) * 8 / span
    assert goodput == pytest.approx(rate * payload / wire, rel=0.01)


def test_lost_packets_still_use_airtime_so_goodput_is_rate_times_1_minus_p():
    p, rate = 0.1, 4e6
    link = Link(LinkProfile(rate_bps=rate, loss=p), seed=5)
    n = 100_000
    arrivals = [link.send(1000, i * 1e-5) for i in range(n)]
    got = [a for a in arrivals if a is not None]
    goodput = len(got) * 1000 * 8 / (max(got) - 0.0)
    assert goodput == pytest.approx(rate * (1 - p), rel=0.01)


def test_unsaturated_stream_keeps_its_offered_rate_and_sees_pure_serialisation():
    link = Link(LinkProfile(rate_bps=10e6, delay_s=0.005), seed=1)
    for i in range(1000):
        t = i * 0.01  # 800 bit/ms offered, far below the rate: no queueing
        assert link.send(1000, t) == pytest.approx(t + 1000 * 8 / 10e6 + 0.005, abs=1e-12)


# -- delay and jitter ---------------------------------------------------------------------


@pytest.mark.parametrize("dist, sd_factor", [("normal", 1.0), ("uniform", 1 / math.sqrt(3))])
def test_delay_mean_and_jitter_std_within_5pct(dist, sd_factor):
    d, j = 0.05, 0.008
    x = delays(LinkProfile(delay_s=d, jitter_s=j, jitter_dist=dist), 100_000)
    assert x.mean() == pytest.approx(d, rel=0.05)
    assert x.std() == pytest.approx(j * sd_factor, rel=0.05)  # uniform: +-j has sd j/sqrt(3)
    if dist == "uniform":
        assert x.min() >= d - j and x.max() <= d + j


def test_pareto_jitter_mean_and_quantiles_match_shifted_pareto_shape_3():
    d, j = 0.05, 0.004
    x = delays(LinkProfile(delay_s=d, jitter_s=j, jitter_dist="pareto"), 200_000)
    assert x.mean() == pytest.approx(d, rel=0.05)
    # jitter / j = X - E[X], X ~ Pareto(x_m, 3) with sd 1: x_m = 2 / sqrt(3), E[X] = sqrt(3).
    xm, mean = 2 / math.sqrt(3), math.sqrt(3)
    sample = (x - d) / j + mean
    for q in (0.1, 0.5, 0.9, 0.99):
        assert np.quantile(sample, q) == pytest.approx(xm * (1 - q) ** (-1 / 3), rel=0.03)
    assert sample.min() >= xm * 0.999  # bounded below, heavy tail above


def test_jitter_correlation_is_the_lag1_correlation_of_the_gaussian_and_arcsine_law_for_uniform():
    rho = 0.7
    xn = delays(LinkProfile(delay_s=0.1, jitter_s=0.01, jitter_dist="normal", jitter_correlation=rho), 100_000)
    assert np.corrcoef(xn[:-1], xn[1:])[0, 1] == pytest.approx(rho, abs=0.02)
    assert xn.std() == pytest.approx(0.01, rel=0.05)  # the marginal is unchanged by correlation
    xu = delays(LinkProfile(delay_s=0.1, jitter_s=0.01, jitter_dist="uniform", jitter_correlation=rho), 100_000)
    # Gaussian copula: Pearson correlation of the uniforms is (6 / pi) asin(rho / 2).
    assert np.corrcoef(xu[:-1], xu[1:])[0, 1] == pytest.approx(6 / math.pi * math.asin(rho / 2), abs=0.02)
    assert xu.std() == pytest.approx(0.01 / math.sqrt(3), rel=0.05)


def test_delay_is_never_negative():
    x = delays(LinkProfile(delay_s=0.001, jitter_s=0.01, jitter_dist="normal"), 10_000)
    assert x.min() >= 0


# -- loss -----------------------------------------------------------------------------------


def test_random_loss_rate_and_correlation():
    p, rho = 0.05, 0.5
    lost = np.isnan(delays(LinkProfile(loss=p, loss_correlation=rho), 300_000))
    assert lost.mean() == pytest.approx(p, rel=0.05)
    after_loss = lost[1:][lost[:-1]]
    assert after_loss.mean() == pytest.approx(rho + (1 - rho) * p, rel=0.05)


def test_gilbert_elliott_long_run_loss_within_10pct_of_stationary_value():
    prof = LinkProfile(ge_p=0.02, ge_r=0.25, ge_loss_bad=0.6, ge_loss_good=0.01)
    bad = 0.02 / (0.02 + 0.25)
    theory = (1 - bad) * 0.01 + bad * 0.6
    assert gilbert_elliott_loss(prof) == pytest.approx(theory)
    lost = np.isnan(delays(prof, 300_000))
    assert lost.mean() == pytest.approx(theory, rel=0.10)


def test_simple_gilbert_bursts_last_1_over_r_packets():
    p, r = 0.01, 0.2  # defaults 1-h = 1, 1-k = 0: lost exactly while in the bad state
    lost = np.isnan(delays(LinkProfile(ge_p=p, ge_r=r), 300_000))
    assert lost.mean() == pytest.approx(p / (p + r), rel=0.10)
    edges = np.diff(np.concatenate([[0], lost.astype(int), [0]]))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    assert runs.mean() == pytest.approx(1 / r, rel=0.10)


def test_message_is_lost_when_any_packet_is():
    p = 0.05
    link = Link(LinkProfile(loss=p, mtu=1000), seed=2)
    n = 100_000
    lost = sum(link.send(2500, i * 1e-3) is None for i in range(n)) / n  # 3 packets
    assert lost == pytest.approx(1 - (1 - p) ** 3, rel=0.05)
    assert link.stats.messages_lost == round(lost * n)


# -- queue --------------------------------------------------------------------------------


def test_queue_limit_burst_accepts_exactly_what_fits():
    rate, q, size = 1e6, 10_000, 1000
    link = Link(LinkProfile(rate_bps=rate, queue_bytes=q), seed=1)
    burst = [link.send(size, 0.0) for _ in range(25)]
    assert [a is not None for a in burst] == [True] * 10 + [False] * 15
    assert link.stats.packets_dropped == 15
    # After exactly 3 packet times, 3 packets have left: 3 more fit, the 4th does not.
    t = 3 * size * 8 / rate
    assert [link.send(size, t) is not None for _ in range(4)] == [True, True, True, False]


def test_queue_limit_drops_exactly_what_overflows_a_fifo_of_that_size():
    """Random overload; check every verdict against an independent FIFO tail-drop queue."""
    rate, q = 2e6, 20_000
    link = Link(LinkProfile(rate_bps=rate, queue_bytes=q, mtu=1500), seed=1)
    rng = random.Random(4)
    t, busy, in_queue = 0.0, 0.0, []  # (departure, bytes) of accepted packets
    accepted_bytes = offered_bytes = 0
    for _ in range(20_000):
        t += rng.expovariate(1 / 0.003)  # ~2.4x overload with mean 900 B packets
        size = rng.randint(100, 1500)
        in_queue = [(d, b) for d, b in in_queue if d > t]
        fits = sum(b for _, b in in_queue) + size <= q
        a = link.send(size, t)
        assert (a is not None) == fits
        offered_bytes += size
        if fits:
            busy = max(t, busy) + size * 8 / rate  # Lindley recursion
            assert a == pytest.approx(busy, abs=1e-9)
            in_queue.append((busy, size))
            accepted_bytes += size
    # Fluid view: an always-busy server carries R; the rest overflowed.
    assert accepted_bytes * 8 / t == pytest.approx(rate, rel=0.02)


# -- packetisation, duplication -----------------------------------------------------------


def test_multi_packet_message_arrives_with_its_last_packet():
    rate, d = 1e6, 0.01
    link = Link(LinkProfile(rate_bps=rate, delay_s=d, mtu=1500, overhead_bytes=40), seed=1)
    assert link.send(4000, 1.0) == pytest.approx(1.0 + (4000 + 3 * 40) * 8 / rate + d)
    assert link.send(0, 2.0) == pytest.approx(2.0 + 40 * 8 / rate + d)  # empty message: one packet


def test_duplication_rates():
    dup = 0.2
    link = Link(LinkProfile(duplicate=dup), seed=3)
    n = 100_000
    twice = sum(len(link.transmit(100, i * 1e-3)) == 2 for i in range(n)) / n
    assert twice == pytest.approx(dup, rel=0.05)
    link = Link(LinkProfile(duplicate=dup, mtu=100), seed=3)
    twice3 = sum(len(link.transmit(300, i * 1e-3)) == 2 for i in range(n)) / n  # every packet twice
    assert twice3 == pytest.approx(dup**3, rel=0.15)


def test_duplicate_copy_can_save_a_lost_packet():
    p, dup = 0.3, 0.5
    link = Link(LinkProfile(loss=p, duplicate=dup), seed=8)
    n = 100_000
    lost = sum(link.send(100, i * 1e-3) is None for i in range(n)) / n
    assert lost == pytest.approx(p * (1 - dup) + p * dup * p, rel=0.05)


def test_duplicates_use_the_link():
    link = Link(LinkProfile(rate_bps=1e6, duplicate=1.0), seed=1)
    first, second = link.transmit(1000, 0.0)
    assert (first, second) == pytest.approx((0.008, 0.016))


# -- profile changes, determinism, contracts ----------------------------------------------


def test_set_profile_applies_to_later_sends_and_keeps_the_backlog():
    link = Link(LinkProfile(rate_bps=1e6), seed=1)
    assert link.send(1000, 0.0) == pytest.approx(0.008)
    link.set_profile(LinkProfile(rate_bps=2e6, delay_s=0.1))
    # Queued behind the first packet (busy until 8 ms), then 4 ms at the new rate, plus delay.
    assert link.send(1000, 0.001) == pytest.approx(0.008 + 0.004 + 0.1)


def test_same_seed_same_results_and_links_are_independent():
    prof = LinkProfile(rate_bps=5e6, delay_s=0.02, jitter_s=0.005, jitter_dist="normal", loss=0.1)
    a = delays(prof, 5000, seed=11)
    assert np.array_equal(a, delays(prof, 5000, seed=11), equal_nan=True)
    up = delays(prof, 20_000, seed=link_seed(1, 0, "uplink"))
    down = delays(prof, 20_000, seed=link_seed(1, 0, "downlink"))
    other = delays(prof, 20_000, seed=link_seed(1, 1, "uplink"))
    assert not np.array_equal(up, down, equal_nan=True)
    for x in (down, other):
        both = ~np.isnan(up) & ~np.isnan(x)
        assert abs(np.corrcoef(up[both], x[both])[0, 1]) < 0.05
        assert abs(np.corrcoef(np.isnan(up), np.isnan(x))[0, 1]) < 0.05


def test_link_seed_is_stable_and_distinct():
    assert link_seed(1, 0, "uplink") == link_seed(1, 0, "uplink")
    seeds = {link_seed(s, d, r) for s in (0, 1) for d in range(50) for r in ("uplink", "downlink")}
    assert len(seeds) == 200
    with pytest.raises(ValueError, match="direction"):
        link_seed(1, 0, "sideways")


def test_turning_on_jitter_does_not_change_which_packets_are_lost():
    """Each purpose (loss, jitter, duplication, ...) has its own random stream."""
    base = np.isnan(delays(LinkProfile(loss=0.2), 2000, seed=4))
    link = Link(LinkProfile(loss=0.2, jitter_s=0.001), seed=4)
    with_jitter = np.array([link.send(100, i * 1e-3) is None for i in range(2000)])
    assert np.array_equal(base, with_jitter)


def test_sending_back_in_time_or_negative_sizes_is_an_error():
    link = Link(LinkProfile(), seed=1)
    link.send(10, 1.0)
    with pytest.raises(ValueError, match="backwards"):
        link.send(10, 0.5)
    with pytest.raises(ValueError, match="nbytes"):
        link.send(-1, 2.0)


# -- reliable delivery (selective repeat) --------------------------------------------------


def test_a_one_packet_delivery_round_is_a_send():
    # Same seed, same calls: every round of a one-packet message is the datagram `send` at that time.
    prof = LinkProfile(rate_bps=2e6, delay_s=0.01, jitter_s=0.002, loss=0.3, duplicate=0.1)
    a, b = Link(prof, seed=5), Link(prof, seed=5)
    for i in range(2000):
        t = 0.05 * i
        d = b.message(900)
        assert d.round(t) == a.send(900, t)
        assert d.wire_bytes == 900 and d.rounds == 1
    # a reliable transport hands its receiver one copy: duplicates are not messages there
    assert a.stats.messages_duplicated > 0 and b.stats.messages_duplicated == 0
    assert dataclasses.replace(a.stats, messages_duplicated=0) == b.stats


def test_the_first_round_is_a_transmit_and_later_rounds_resend_only_the_lost_packets():
    prof = LinkProfile(rate_bps=8e6, delay_s=0.005, jitter_s=0.001, loss=0.2, mtu=1000)
    for seed in range(300):  # the whole message once: a datagram's fate
        got = Link(prof, seed).transmit(4500, 1.0)
        assert Link(prof, seed).message(4500).round(1.0) == (got[0] if got else None)
    link = Link(prof, seed=9)
    rounds, resent = [], 0
    for i in range(3000):
        t = 2.0 * i
        d = link.message(4500)  # packets of 1000, 1000, 1000, 1000, 500 bytes
        first, r = d.round(t), 0
        while first is None:
            r += 1
            lost = set(d.missing)
            before = d.wire_bytes
            first = d.round(t + 0.2 * r)
            resent += d.wire_bytes - before
            assert lost and d.wire_bytes - before == sum(d.sizes[j] for j in lost)  # only what had no copy through
        rounds.append(d.rounds)
    rounds = np.array(rounds)
    # P(a round-1 message needs another round) = 1 - 0.8^5; packets resent ~ geometric with mean 0.2/0.8 each
    assert (rounds > 1).mean() == pytest.approx(1 - 0.8**5, abs=0.03)
    assert resent / (3000 * 4500) == pytest.approx(0.2 / 0.8, rel=0.1)


def test_a_large_message_gets_through_a_lossy_link_in_a_few_rounds():
    # 608 KB (the Qwen vocabulary in float32, about 405 packets) at 1% packet loss: 1.7% of whole
    # copies arrive, so resending whole copies fails 33 times in a row more often than not; resending
    # the lost packets needs about log(405) / log(100) + 1 = 2.3 rounds.
    link = Link(LinkProfile(rate_bps=6e6, delay_s=0.005, loss=0.01), seed=3)
    rounds = []
    for i in range(200):
        d, t = link.message(607_744), 10.0 * i
        while d.round(t + 0.2 * (d.rounds)) is None:
            assert d.rounds < 10
        rounds.append(d.rounds)
        assert 607_744 <= d.wire_bytes < 1.1 * 607_744
    assert 1.5 < np.mean(rounds) < 3.5
    whole = Link(LinkProfile(rate_bps=6e6, delay_s=0.005, loss=0.01), seed=3)
    assert sum(whole.send(607_744, 10.0 * i) is not None for i in range(200)) < 12  # ~1.7%: the old way
