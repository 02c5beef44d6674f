"""Traces: CSV parsing with clear errors, replay of rate/delay/loss over time."""

from __future__ import annotations

import pytest

from netem import Link, LinkProfile, list_traces, load_trace, parse_trace
from netem.trace import trace_from_rows

STEPS = "time_s,rate_mbps,delay_ms,loss\n0,8,10,0\n1,2,50,0.5\n"


def saturate(link: Link, until: float, size: int = 1000) -> list[float]:
    """Offer back-to-back packets at t=0 until arrivals pass `until`; return arrivals."""
    out = []
    while not out or out[-1] is None or out[-1] < until:
        out.append(link.send(size, 0.0))
    return out


def test_parse_and_step_semantics():
    tr = parse_trace(STEPS, "steps")
    assert tr.times == (0.0, 1.0)
    assert tr.rate_bps == (8e6, 2e6) and tr.delay_s == (0.01, 0.05) and tr.loss == (0.0, 0.5)
    assert tr.duration_s == 2.0  # last row lasts as long as the step before it
    assert tr.value_at("rate_bps", 0.999) == 8e6 and tr.value_at("rate_bps", 1.0) == 2e6
    assert tr.value_at("rate_bps", 2.5) == 8e6  # loops
    assert tr.with_options(loop=False).value_at("rate_bps", 50.0) == 2e6  # holds the last row


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty trace"),
        ("rate_mbps,loss\n1,0\n", "time column"),
        ("time_s,speed\n0,1\n", "unknown column 'speed'"),
        ("time_s\n0\n", "no value column"),
        ("time_s,rate_mbps\n", "no rows"),
        ("time_s,rate_mbps\n0.5,1\n", ":2: the first row must start at time 0"),
        ("time_s,rate_mbps\n0,1\n1,2\n1,3\n", ":4: times must strictly increase"),
        ("time_s,rate_mbps\n0,1\n1,fast\n", ":3: column 'rate_mbps' expected a number, got 'fast'"),
        ("time_s,rate_mbps\n0,-1\n", ":2: column 'rate_mbps' expected a finite number >= 0"),
        ("time_s,loss\n0,1.5\n", ":2: column 'loss' expected a probability"),
        ("time_s,rate_mbps\n0,1,2\n", ":2: expected 2 values"),
        ("time_s,rate_mbps,rate_kbps\n0,1,2\n", "both give rate_bps"),
    ],
)
def test_bad_csv_errors_name_line_and_column(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as e:
        parse_trace(text, "my.csv")
    assert str(e.value).startswith("my.csv")


def test_comments_blank_lines_and_ms_times():
    tr = parse_trace("# a comment\n\ntime_ms,rate_kbps\n0,500\n# mid\n250,1000\n", "c")
    assert tr.times == (0.0, 0.25) and tr.rate_bps == (5e5, 1e6)


def test_link_rate_follows_the_trace():
    link = Link(LinkProfile(trace=parse_trace("time_s,rate_mbps\n0,8\n1,2\n", "r")), seed=1)
    arrivals = saturate(link, 4.0)
    count = lambda a, b: sum(a <= x < b for x in arrivals)  # noqa: E731
    # 1000-byte packets: 1000 per second at 8 Mbit/s, 250 at 2 Mbit/s; then it loops.
    assert count(0, 1) == pytest.approx(1000, abs=1)
    assert count(1, 2) == pytest.approx(250, abs=1)
    assert count(2, 3) == pytest.approx(1000, abs=1)


def test_serialisation_integrates_the_rate_across_a_step():
    link = Link(LinkProfile(trace=parse_trace("time_s,rate_mbps\n0,8\n1,2\n", "r")), seed=1)
    # 12,000 bits from t = 0.999: 8,000 bits in the last ms at 8 Mbit/s, 4,000 at 2 Mbit/s.
    assert link.send(1500, 0.999) == pytest.approx(1.002)


def test_outage_holds_packets_until_the_rate_returns():
    link = Link(LinkProfile(trace=parse_trace("time_s,rate_mbps\n0,1\n1,0\n2,1\n", "o")), seed=1)
    assert link.send(125, 1.5) == pytest.approx(2.001)  # waits out the 1-2 s outage, then 1 ms at 1 Mbit/s
    no_loop = parse_trace("time_s,rate_mbps\n0,1\n1,0\n", "o").with_options(loop=False)
    assert Link(LinkProfile(trace=no_loop), seed=1).send(125, 1.5) is None  # never again: dropped


def test_single_row_trace_is_constant_even_when_told_to_loop():
    tr = parse_trace("time_s,rate_mbps\n0,1\n", "one").with_options(loop=True)
    assert Link(LinkProfile(trace=tr), seed=1).send(1250, 0.5) == pytest.approx(0.51)


def test_trace_delay_and_loss_apply_at_departure():
    tr = parse_trace(STEPS, "steps")
    link = Link(LinkProfile(trace=tr, jitter_s=0.0), seed=3)
    early = [link.send(10, 0.1 + i * 1e-4) for i in range(5000)]  # rate 8 Mbit/s, delay 10 ms, no loss
    assert all(a is not None for a in early)
    assert early[0] == pytest.approx(0.1 + 80 / 8e6 + 0.01)
    late = [link.send(10, 1.2 + i * 1e-4) for i in range(5000)]
    got = [(a, 1.2 + i * 1e-4) for i, a in enumerate(late) if a is not None]
    assert len(got) / len(late) == pytest.approx(0.5, rel=0.05)
    assert got[0][0] - got[0][1] == pytest.approx(80 / 2e6 + 0.05)


def test_random_start_gives_each_link_its_own_offset():
    tr = load_trace("lte-drive-up").with_options(random_start=True)
    a = Link(LinkProfile(trace=tr), seed=1).conditions_at(0.0)
    b = Link(LinkProfile(trace=tr), seed=2).conditions_at(0.0)
    assert a != b
    assert a == Link(LinkProfile(trace=tr), seed=1).conditions_at(0.0)
    fixed = load_trace("lte-drive-up")
    assert Link(LinkProfile(trace=fixed), seed=1).conditions_at(0.0)[0] == fixed.rate_bps[0]


def test_bundled_traces_load_and_profile_keys_reference_them():
    assert {"wifi-walk-up", "wifi-walk-down", "lte-drive-up", "lte-drive-down"} <= set(list_traces())
    for name in list_traces():
        tr = load_trace(name)
        assert tr.duration_s > 10 and set(tr.columns()) == {"rate_bps", "delay_s", "loss"}
    p = LinkProfile.from_dict({"trace": {"name": "wifi-walk-up", "loop": False}, "jitter_ms": 1})
    assert p.trace.source == "wifi-walk-up" and not p.trace.loop
    with pytest.raises(ValueError, match="trace.name: unknown trace 'nope'"):
        LinkProfile.from_dict({"trace": {"name": "nope"}})
    with pytest.raises(ValueError, match="delay_s is set and trace 'wifi-walk-up' also gives delay_s"):
        LinkProfile.from_dict({"trace": "wifi-walk-up", "delay_ms": 5})


def test_trace_file_by_path(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("time_s,rate_mbps\n0,3\n")
    p = LinkProfile.from_dict({"trace": str(path)})
    assert p.trace.rate_bps == (3e6,) and not p.trace.loop
    with pytest.raises(ValueError, match="does not exist"):
        LinkProfile.from_dict({"trace": str(tmp_path / "missing.csv")})
    bad = tmp_path / "bad.csv"
    bad.write_text("time_s,rate_mbps\n0,3\n0,4\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: times must strictly increase"):
        LinkProfile.from_dict({"trace": str(bad)})


def test_trace_from_rows():
    tr = trace_from_rows([(0, 1, 5, 0), (1, 2, 6, 0.1)])
    assert tr.rate_bps == (1e6, 2e6) and tr.delay_s == (0.005, 0.006)
