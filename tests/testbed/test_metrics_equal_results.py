"""Metrics equal results, always: after a lossy run, every counter the exporter serves equals the sum
computed from tokens.parquet (both come from the same events: the Collector counts them, the results
writer turns them into rows). Under loss the downlink, loss and retransmission counters are non-zero.

Tiny random models; a few seconds of a wall-clock run on Ray (the groups emit every event) and the
virtual clock on the local engine (the replay emits the timed events)."""

from __future__ import annotations

import urllib.request

import pandas as pd
from prometheus_client.parser import text_string_to_metric_families

from testbed.metrics import Collector
from testbed.results import read_tokens
from testbed.run import RunOptions, run_scenario
from testbed.scenario import load_scenario, override

LOSSY = {
    "uplink": {"rate_mbps": 5.0, "delay_ms": 10.0, "loss": 0.2},
    "downlink": {"rate_mbps": 20.0, "delay_ms": 10.0, "loss": 0.2},
}


def lossy(**changes):
    # laptops on slm-only: every token skipped, sent only in the final flush (for the shadow betas)
    return override(
        load_scenario("smoke"),
        {"generation.max_new_tokens": 12, "link": LOSSY, "tiers.laptop.policy": "slm-only", **changes},
    )


def scrape(url: str) -> dict[str, dict[str, float]]:
    """metric sample name -> tier -> value, from the exporter's /metrics text."""
    out: dict[str, dict[str, float]] = {}
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            tier = sample.labels.get("tier", "")
            out.setdefault(sample.name, {})[tier] = out.get(sample.name, {}).get(tier, 0.0) + sample.value
    return out


def from_results(df: pd.DataFrame) -> dict[str, pd.Series]:
    """Each counter as tokens.parquet defines it, per tier."""
    flushes = df["flush_bytes"] > 0  # a device's final flush (its skipped drafts, for the shadow betas)
    uploads = df["transmitted"] & (df["draft_id"] >= 0)
    by = df.assign(
        one=1,
        skip=~df["transmitted"],
        upload=uploads,
        k_sent=df["k"].where(uploads, 0),
        messages=df["transmitted"].astype(int) + flushes.astype(int),
        wire_up=df["uplink_bytes"] + df["flush_bytes"],
        lost=df["uplink_lost"] + df["downlink_lost"],
        retx=df["retransmissions"] + df["flush_retransmissions"],
    ).groupby("tier")
    return {
        "hlm_tokens_committed_total": by["one"].sum(),
        "hlm_skips_total": by["skip"].sum(),
        "hlm_uploads_total": by["upload"].sum(),
        "hlm_vocab_entries_sent_total": by["k_sent"].sum(),
        "hlm_payload_bytes_total": by["payload_bytes"].sum(),
        "hlm_uplink_bytes_total": by["uplink_bytes"].sum(),
        "hlm_link_uplink_messages_total": by["messages"].sum(),
        "hlm_link_downlink_messages_total": by["messages"].sum(),  # one verdict per upload
        "hlm_link_uplink_bytes_total": by["wire_up"].sum(),
        "hlm_link_downlink_bytes_total": by["downlink_bytes"].sum(),
        "hlm_link_lost_messages_total": by["lost"].sum(),
        "hlm_link_retransmissions_total": by["retx"].sum(),
    }


def run_and_compare(s, out, **opts) -> dict[str, float]:
    c = Collector(s.name)
    c.serve(-1)
    try:
        run_scenario(s, RunOptions(out_dir=out, progress=False, report=False, accuracy=False, collector=c, **opts))
        got = scrape(c.url)
    finally:
        c.close()
    df = read_tokens(out / "tokens.parquet")
    assert len(df) == s.n_devices * s.generation.max_new_tokens
    mismatches = {}
    for name, want in from_results(df).items():
        have = {t: v for t, v in got.get(name, {}).items() if t}
        if {t: float(v) for t, v in want.items()} != have:
            mismatches[name] = (dict(want), have)
    assert not mismatches, mismatches
    totals = {name: float(v.sum()) for name, v in from_results(df).items()}
    # Under loss the downlink, loss and retransmission panels have data.
    for name in ("hlm_link_downlink_bytes_total", "hlm_link_lost_messages_total", "hlm_link_retransmissions_total"):
        assert totals[name] > 0, name
    # slm-only devices end with a final flush: wire bytes a token's uplink_bytes does not bill
    assert totals["hlm_link_uplink_bytes_total"] > totals["hlm_uplink_bytes_total"]
    print({k.removeprefix("hlm_"): v for k, v in totals.items()})
    return totals


def test_lossy_wall_clock_run_metrics_equal_results(ray_session, tmp_path):
    run_and_compare(lossy(clock="wall", time_scale=1.0), tmp_path / "wall", engine="ray")


def test_lossy_virtual_clock_metrics_equal_results(tmp_path):
    run_and_compare(lossy(), tmp_path / "virtual", engine="local")
