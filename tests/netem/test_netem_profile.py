"""Profiles: scenario units, clear errors, round trips, bundled named profiles."""

from __future__ import annotations

import math

import pytest

from netem import DuplexProfile, Link, LinkProfile, get_profile, link_seed, list_profiles

REQUIRED = {"5g-good", "lte-edge", "wifi-strong", "wifi-weak", "paper-uplink"}


def test_from_dict_converts_scenario_units_to_si():
    p = LinkProfile.from_dict(
        {
            "rate_mbps": 12.5,
            "delay_ms": 20,
            "jitter_ms": 4,
            "jitter_dist": "normal",
            "jitter_correlation": 0.25,
            "loss": 0.01,
            "loss_correlation": 0.1,
            "duplicate": 0.001,
            "queue_bytes": 64000,
            "mtu": 1400,
            "overhead_bytes": 28,
        }
    )
    assert p.rate_bps == 12.5e6 and p.delay_s == pytest.approx(0.02) and p.jitter_s == pytest.approx(0.004)
    assert (p.jitter_dist, p.jitter_correlation, p.loss, p.loss_correlation) == ("normal", 0.25, 0.01, 0.1)
    assert (p.duplicate, p.queue_bytes, p.mtu, p.overhead_bytes) == (0.001, 64000, 1400, 28)
    assert LinkProfile.from_dict({"rate_kbps": 500}).rate_bps == 5e5
    assert LinkProfile.from_dict({"rate_gbps": 1}).rate_bps == 1e9
    assert LinkProfile.from_dict({"rate_mbps": None}).rate_bps == math.inf
    assert LinkProfile.from_dict({}) == LinkProfile()


@pytest.mark.parametrize(
    "d, message",
    [
        ({"rate": 10}, "rate: unknown link parameter; expected one of"),
        ({"rate_mbps": -3}, "rate_mbps: expected a number > 0, got -3"),
        ({"rate_mbps": 0}, "rate_mbps: expected a number > 0"),
        ({"rate_mbps": "fast"}, "rate_mbps: expected a number > 0, got 'fast'"),
        ({"delay_ms": True}, "delay_ms: expected a number >= 0, got True"),
        ({"delay_ms": -1}, "delay_ms: expected a number >= 0"),
        ({"jitter_ms": float("nan")}, "jitter_ms: expected a number >= 0"),
        ({"loss": 1.5}, "loss: expected a probability in \\[0, 1\\], got 1.5"),
        ({"loss": 5}, "loss: expected a probability"),  # percent by mistake
        ({"ge_p": -0.1}, "ge_p: expected a probability"),
        ({"jitter_dist": "gamma"}, "jitter_dist: expected one of uniform, normal, pareto"),
        ({"mtu": 1500.0}, "mtu: expected an integer >= 1"),
        ({"queue_bytes": 0}, "queue_bytes: expected an integer >= 1 or null"),
        ({"queue_bytes": 1000}, "queue_bytes: 1000 cannot hold one full packet"),
        ({"rate_mbps": 1, "rate_bps": 1e6}, "rate_bps: 'rate_mbps' already gives rate_bps"),
        ({"loss": 0.1, "ge_p": 0.01}, "one loss model"),
        ({"trace": 3}, "trace: expected a trace name"),
        ({"trace": {"name": "wifi-walk-up", "speed": 2}}, "trace: unknown key 'speed'"),
    ],
)
def test_from_dict_errors_name_the_key_and_what_was_expected(d, message):
    with pytest.raises(ValueError, match=message):
        LinkProfile.from_dict(d)


def test_errors_carry_the_direction():
    with pytest.raises(ValueError, match=r"^downlink.loss: expected a probability"):
        DuplexProfile.from_dict({"uplink": {}, "downlink": {"loss": 2}})
    with pytest.raises(ValueError, match="downlink: missing"):
        DuplexProfile.from_dict({"uplink": {}})
    with pytest.raises(ValueError, match="sideways: unknown key"):
        DuplexProfile.from_dict({"uplink": {}, "downlink": {}, "sideways": {}})
    with pytest.raises(ValueError, match="uplink: expected a mapping"):
        DuplexProfile.from_dict({"uplink": 5, "downlink": {}})


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="rate_bps"):
        LinkProfile(rate_bps=-1)
    with pytest.raises(ValueError, match="loss"):
        LinkProfile(loss=2)


@pytest.mark.parametrize("name", sorted(list_profiles()))
def test_bundled_profiles_round_trip_and_run(name):
    p = get_profile(name)
    assert DuplexProfile.from_dict(p.to_dict()) == p
    for direction in ("uplink", "downlink"):
        link = Link(p.direction(direction), link_seed(0, 0, direction))
        arrivals = [link.send(200, i * 0.01) for i in range(500)]
        got = [a - i * 0.01 for i, a in enumerate(arrivals) if a is not None]
        assert len(got) > 400 and min(got) >= 0


def test_required_names_and_unknown_name_lists_known():
    assert REQUIRED <= set(list_profiles())
    with pytest.raises(KeyError, match="known: .*5g-good.*lte-edge"):
        get_profile("carrier-pigeon")


def test_bundled_numbers_are_what_the_docs_say():
    lte = get_profile("lte-edge").uplink
    assert lte.rate_bps == pytest.approx(0.03 * 20e6)  # ITU-R M.2134 cell edge x 20 MHz
    assert get_profile("lte-edge").downlink.rate_bps == pytest.approx(0.06 * 20e6)
    paper = get_profile("paper-uplink").uplink
    assert paper.channel.awgn_rate_bps() == pytest.approx(10e6 * math.log2(1 + 10))
    assert get_profile("5g-good").downlink.rate_bps == 200e6
