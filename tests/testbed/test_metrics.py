"""Stat records (agents.stats) and the collector/exporter (testbed.metrics)."""
from __future__ import annotations

import ast
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

import agents.stats as stats_mod
from agents.stats import ClockStat, LinkStat, ProtocolErrorStat, StatBatch, TokenStat, VerifierBatchStat
from testbed.figures import jain
from testbed.metrics import DERIVED, METRICS, Collector, Sel

REQUIRE = os.environ.get("HLM_REQUIRE_PROMETHEUS") == "1"
S = "unit"


def tok(device=0, tier="phone", policy="cu-hlm", u=0.5, tx=True, k=32, acc=True, lat=0.1, t=1.0, **kw) -> TokenStat:
    return TokenStat(device=device, tier=tier, policy=policy, uncertainty=u, transmitted=tx, k=k if tx else 0,
                     payload_bytes=kw.pop("payload", 104 if tx else 0), uplink_bytes=kw.pop("uplink", 130 if tx else 0),
                     accepted=acc, resampled=tx and not acc, latency_s=lat, t_commit=t, **kw)


def value(c: Collector, name: str, tier: str | None = "phone", policy: str = "cu-hlm", **labels) -> float | None:
    lbl = {"scenario": c.scenario, **labels}
    if tier is not None:
        lbl.update(tier=tier, policy=policy)
    return c.registry.get_sample_value(name, lbl)


# ---------------------------------------------------------------------------------------------
# agents.stats
# ---------------------------------------------------------------------------------------------
def test_stats_module_imports_only_stdlib() -> None:
    tree = ast.parse(Path(stats_mod.__file__).read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add((node.module or "").split(".")[0])
    assert mods <= set(sys.stdlib_module_names) | {"__future__"}, mods


def test_batch_round_trips_every_record_kind_through_pickle() -> None:
    records = [
        tok(device=3, u=0.25, tx=True, acc=False),
        tok(device=4, tier="laptop", policy="u-hlm", u=math.nan, tx=False, lat=0.012, t=0.5, drafted=True),
        tok(device=5, tier="laptop", policy="u-hlm", drafted=False),
        VerifierBatchStat(2, 7, 0.03, (0.001, 0.0), t_start=0.9),
        LinkStat("phone", "cu-hlm", "uplink", messages=1, bytes=130, lost=1, retransmissions=1),
        ClockStat("runner", 1.0, 0.4, 0.0, {"phone": 1, "laptop": 2}),
        ProtocolErrorStat("oversized", 2),
    ]
    b = StatBatch("g1")
    b.extend(records)
    assert len(b) == 7 and b.n_tokens == 3 and bool(b)
    back = pickle.loads(pickle.dumps(b))
    got = list(back.stats())
    assert got[1].uncertainty != got[1].uncertainty  # NaN survives
    assert [r for i, r in enumerate(got) if i != 1] == [r for i, r in enumerate(records) if i != 1]
    assert back.source == "g1"
    back.add(tok(device=9, tier="phone"))  # label table usable after unpickling
    assert back.token_columns().labels == [("phone", "cu-hlm"), ("laptop", "u-hlm")]


def test_batch_is_compact_when_pickled() -> None:
    b = StatBatch("g")
    for i in range(10_000):
        b.add_token(device=i % 100, tier=f"tier{i % 3}", policy="cu-hlm", uncertainty=0.3, transmitted=bool(i % 2),
                    k=64, payload_bytes=208, uplink_bytes=240, accepted=True, resampled=False, latency_s=0.1, t_commit=i * 0.01)
    size = len(pickle.dumps(b))
    assert size < 70 * 10_000, size  # ~61 bytes per token, no per-token objects


def test_drain_and_merge() -> None:
    a, b = StatBatch("a"), StatBatch("b")
    a.add(tok(device=1, tier="phone"))
    b.add(tok(device=2, tier="laptop", policy="u-hlm"))
    b.add(tok(device=3, tier="phone"))
    b.add(ClockStat("b", 2.0, 1.0))
    a.merge(b)
    assert [(t.device, t.tier) for t in a.tokens()] == [(1, "phone"), (2, "laptop"), (3, "phone")]
    assert len(a.clocks) == 1
    out = a.drain()
    assert len(a) == 0 and len(out) == 4 and out.source == "a"


def test_records_validate() -> None:
    with pytest.raises(ValueError):
        LinkStat("phone", "cu-hlm", "sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LinkStat("phone", "cu-hlm", "uplink", bytes=-1)
    with pytest.raises(ValueError):
        VerifierBatchStat(2, 2, 0.01, (0.0,))
    with pytest.raises(TypeError):
        StatBatch().add("token")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# metric definitions
# ---------------------------------------------------------------------------------------------
def test_metric_names_follow_prometheus_rules() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"hlm_[a-z0-9_]+", m.name), m.name
        # actor: verifier | group (hlm_actor_restarts_total), reason: an ErrorCode name
        # (hlm_protocol_errors_total), bounded like tier and policy
        assert set(m.labels) <= {"scenario", "tier", "policy", "actor", "reason"} and m.labels[0] == "scenario", m
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert m.help.strip(), m.name
        if m.kind == "histogram":
            assert list(m.buckets) == sorted(m.buckets) and m.buckets, m.name
        for bad in ("_ms", "milliseconds", "_kb", "_mb"):
            assert bad not in m.name, m.name
        if "latency" in m.name or "wait" in m.name or "time" in m.name:
            assert m.name.endswith(("_seconds", "_seconds_total")), m.name


def test_derived_promql_builds_for_every_figure() -> None:
    for d in DERIVED.values():
        for sel in (Sel(), Sel(by=("tier", "policy")), Sel(window=None, by=("policy",))):
            expr = d.expr(sel)
            assert "hlm_" in expr and expr.count("(") == expr.count(")"), (d.name, expr)
            assert not re.search(r"\bdevice\b", expr)


# ---------------------------------------------------------------------------------------------
# the collector
# ---------------------------------------------------------------------------------------------
def test_counters_and_histograms_count_each_token_once() -> None:
    c = Collector(S, tiers={"phone": "cu-hlm", "laptop": "u-hlm"}, vocab_size=1000)
    b = StatBatch()
    b.add(tok(device=0, u=0.05, tx=False, t=0.1))                    # skipped
    b.add(tok(device=0, u=0.6, tx=True, k=40, acc=True, t=0.3))      # accepted upload
    b.add(tok(device=1, u=0.9, tx=True, k=60, acc=False, t=0.35))    # rejected, resampled
    b.add(tok(device=2, tier="laptop", policy="u-hlm", u=math.nan, tx=True, k=1000, acc=True, t=0.2, payload=3250, uplink=3300))
    c.ingest(b)
    assert value(c, "hlm_tokens_committed_total") == 3
    assert value(c, "hlm_tokens_drafted_total") == 3
    assert value(c, "hlm_skips_total") == 1
    assert value(c, "hlm_uploads_total") == 2
    assert value(c, "hlm_drafts_accepted_total") == 1
    assert value(c, "hlm_drafts_resampled_total") == 1
    assert value(c, "hlm_vocab_entries_sent_total") == 100
    assert value(c, "hlm_uplink_bytes_total") == 260
    assert value(c, "hlm_payload_bytes_total") == 208
    assert value(c, "hlm_token_uncertainty_count") == 3
    assert value(c, "hlm_token_uncertainty_bucket", le="0.05") == 1
    assert value(c, "hlm_upload_vocab_entries_count") == 2          # skipped token not observed
    assert value(c, "hlm_token_latency_seconds_count") == 3
    # NaN uncertainty is not observed, the token still counts
    assert value(c, "hlm_token_uncertainty_count", "laptop", "u-hlm") == 0
    assert value(c, "hlm_uploads_total", "laptop", "u-hlm") == 1
    snap = c.snapshot()
    assert snap.totals.committed == 4 and snap.skip_rate == pytest.approx(1 / 4)
    assert snap.acceptance_rate == pytest.approx(2 / 3)
    # llm-only: a request without a draft is neither an upload nor a skip
    c.ingest(tok(device=7, tier="cloud", policy="llm-only", u=math.nan, tx=True, k=0, acc=False, drafted=False))
    assert value(c, "hlm_uploads_total", "cloud", "llm-only") == 0
    assert value(c, "hlm_skips_total", "cloud", "llm-only") == 0
    assert value(c, "hlm_tokens_drafted_total", "cloud", "llm-only") == 0
    assert value(c, "hlm_tokens_committed_total", "cloud", "llm-only") == 1
    # pre-created series exist at 0 before any data
    c2 = Collector(S, tiers={"phone": "cu-hlm"})
    assert value(c2, "hlm_tokens_committed_total") == 0
    assert value(c2, "hlm_verifier_batch_size_count", tier=None) == 0


def test_verifier_link_clock_and_error_records() -> None:
    c = Collector(S, tiers={"phone": "cu-hlm"}, vocab_size=1000)
    c.ingest([
        VerifierBatchStat(3, 9, 0.04, (0.0, 0.002, 0.01), t_start=2.0),
        VerifierBatchStat(1, 1, 0.02),
        LinkStat("phone", "cu-hlm", "uplink", messages=4, bytes=1000, lost=1, retransmissions=1),
        LinkStat("phone", "cu-hlm", "downlink", messages=4, bytes=128),
        ClockStat("group-0", 1.5, 0.7, 0.0, {"phone": 2}),
        ClockStat("group-1", 1.2, 0.9, 0.25, {"phone": 3}),
        ClockStat("group-0", 1.8, 0.8, 0.1, {"phone": 1}),   # replaces group-0's earlier record
        ProtocolErrorStat("malformed"),
    ])
    assert value(c, "hlm_verifier_batch_size_count", tier=None) == 2
    assert value(c, "hlm_verifier_batch_size_sum", tier=None) == 4
    assert value(c, "hlm_verifier_tokens_total", tier=None) == 10
    assert value(c, "hlm_verifier_queue_wait_seconds_count", tier=None) == 3
    assert value(c, "hlm_link_uplink_messages_total") == 4
    assert value(c, "hlm_link_uplink_bytes_total") == 1000
    assert value(c, "hlm_link_downlink_bytes_total") == 128
    assert value(c, "hlm_link_lost_messages_total") == 1
    assert value(c, "hlm_link_retransmissions_total") == 1
    assert value(c, "hlm_protocol_errors_total", tier=None, reason="malformed") == 1
    assert value(c, "hlm_active_devices") == 4
    assert value(c, "hlm_emulated_time_seconds", tier=None) == pytest.approx(2.04)  # batch end is the latest event
    assert value(c, "hlm_wall_time_seconds", tier=None) == 0.9
    assert value(c, "hlm_lag_seconds", tier=None) == 0.25
    assert value(c, "hlm_vocabulary_size", tier=None) == 1000
    assert c.snapshot().protocol_errors == {"malformed": 1}


def test_throughput_and_fairness_gauges() -> None:
    # phone devices 0,1 commit every 0.1 s for 20 s; laptop device 2 every 0.05 s but only for the last 5 s
    c = Collector(S, tiers={"phone": "cu-hlm", "laptop": "u-hlm"}, window_s=4.0)
    b = StatBatch()
    for i in range(1, 201):
        for d in (0, 1):
            b.add(tok(device=d, tx=False, lat=0.1, t=i * 0.1))
    for i in range(1, 101):
        b.add(tok(device=2, tier="laptop", policy="u-hlm", tx=False, lat=0.05, t=15 + i * 0.05))
    c.ingest(b)
    # window (16, 20]: 40 tokens per phone device, 80 for the laptop device
    assert value(c, "hlm_tokens_per_emulated_second") == pytest.approx(80 / 4)
    assert value(c, "hlm_tokens_per_emulated_second", "laptop", "u-hlm") == pytest.approx(80 / 4)
    assert value(c, "hlm_run_tokens_per_emulated_second") == pytest.approx(400 / 20)
    # whole run, over the tier's own span (as summary.json): the laptop tier ran from 15 s to 20 s
    assert value(c, "hlm_run_tokens_per_emulated_second", "laptop", "u-hlm") == pytest.approx(100 / 5)
    assert value(c, "hlm_jain_fairness_ratio", tier=None) == pytest.approx(jain([10, 10, 20]))
    # whole run: each device over its own span: 10, 10 and 20 tokens/s
    assert value(c, "hlm_jain_fairness_run_ratio", tier=None) == pytest.approx(jain([10, 10, 20]))
    # a fourth active device that committed nothing in the window lowers windowed fairness
    c.ingest(ClockStat("runner", 20.0, 5.0, 0.0, {"phone": 3, "laptop": 1}))
    assert value(c, "hlm_jain_fairness_ratio", tier=None) == pytest.approx(jain([10, 10, 20], n=4))
    snap = c.snapshot()
    assert snap.throughput == pytest.approx(500 / 20)
    line = snap.log_line()
    assert "tokens=500" in line and "tok/s=25.0" in line and "laptop:20.0" in line


def test_exposition_has_no_device_label_and_dedicated_registries() -> None:
    a, b = Collector("a", tiers={"phone": "cu-hlm"}), Collector("b", tiers={"phone": "cu-hlm"})
    a.ingest(tok(device=123456))
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for fam in text_string_to_metric_families(a.exposition().decode()) for s in fam.samples]
    assert samples and all(set(s.labels) <= {"scenario", "tier", "policy", "actor", "reason", "le"} for s in samples)
    assert all(s.labels["scenario"] == "a" for s in samples)
    assert not any("123456" in v for s in samples for v in s.labels.values())
    assert value(b, "hlm_tokens_committed_total") == 0


def test_concurrent_ingest_and_scrape() -> None:
    c = Collector(S, tiers={"phone": "cu-hlm"})
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape():
        try:
            while not stop.is_set():
                c.exposition()
        except BaseException as e:  # pragma: no cover - failure path
            errors.append(e)

    th = threading.Thread(target=scrape)
    th.start()
    for i in range(200):
        b = StatBatch()
        for d in range(10):
            b.add(tok(device=d, t=i * 0.1 + d * 0.001))
        c.ingest(b)
    stop.set()
    th.join()
    assert not errors and value(c, "hlm_tokens_committed_total") == 2000


def test_ingest_accepts_a_list_of_batches() -> None:
    c = Collector(S)
    batches = []
    for g in range(3):
        b = StatBatch(f"group-{g}")
        b.add(tok(device=g, tier=["phone", "laptop", "phone"][g], policy=["cu-hlm", "u-hlm", "cu-hlm"][g]))
        batches.append(b)
    c.ingest(batches + [ClockStat("runner", 1.0, 0.5)])
    assert value(c, "hlm_tokens_committed_total") == 2
    assert value(c, "hlm_tokens_committed_total", "laptop", "u-hlm") == 1


def test_serve_port_zero_is_off_and_http_serves_metrics() -> None:
    c = Collector(S, tiers={"phone": "cu-hlm"})
    assert c.serve(0) is None and c.url is None
    port = c.serve(-1)
    try:
        assert port and c.url == f"http://127.0.0.1:{port}/metrics"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(c.url, timeout=5) as r:
            assert b"hlm_tokens_committed_total" in r.read()
        c.linger(0.05)
        wall = c.wall_time()
        assert c.wall_time() == wall  # frozen after finish()
    finally:
        c.close()
    c.close()  # idempotent


def test_ingest_is_fast_enough_for_fleets() -> None:
    import time

    c = Collector(S, tiers={"phone": "cu-hlm"}, vocab_size=151936)
    b = StatBatch()
    for i in range(20_000):
        b.add_token(device=i % 1000, tier="phone", policy="cu-hlm", uncertainty=(i % 21) / 20, transmitted=bool(i % 3),
                    k=64, payload_bytes=208, uplink_bytes=240, accepted=bool(i % 5), resampled=not i % 5,
                    latency_s=0.1, t_commit=i * 0.001)
    t0 = time.perf_counter()
    c.ingest(b)
    c.exposition()
    dt = time.perf_counter() - t0
    assert dt < 5.0, dt  # ~0.2 s here; a 64k-token fleet run costs well under its runtime


@pytest.mark.parametrize("with_data", [False, True])
def test_promtool_check_metrics(with_data: bool) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if REQUIRE:
            pytest.fail("promtool missing and HLM_REQUIRE_PROMETHEUS=1")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    c = Collector(S, tiers={"phone": "cu-hlm", "laptop": "u-hlm"}, vocab_size=151936)
    if with_data:
        c.ingest([tok(device=d, t=0.1 * d + 0.1) for d in range(5)]
                 + [VerifierBatchStat(2, 3, 0.02, (0.0, 0.001)), LinkStat("phone", "cu-hlm", "uplink", 1, 100),
                    ClockStat("runner", 1.0, 1.0, 0.0, {"phone": 5}), ProtocolErrorStat("malformed")])
    out = subprocess.run([promtool, "check", "metrics"], input=c.exposition(), capture_output=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (out.stdout, out.stderr)


def test_ingest_token_records_matches_summary_definitions() -> None:
    """Rows in the tokens.parquet schema feed the collector; its figures equal summary.json's."""
    results = pytest.importorskip("testbed.results")
    import numpy as np

    rng = np.random.default_rng(3)
    rows = []
    for dev, (tier, policy, step) in enumerate([("phone", "cu-hlm", 0.03)] * 3 + [("laptop", "u-hlm", 0.012)] * 2):
        t = float(rng.uniform(0, 0.2))
        for i in range(40):
            u = float(rng.integers(0, 21) / 20)
            tx = u > 0.1
            acc = (not tx) or bool(rng.random() > u * 0.8)
            lat = step + (0.08 if tx else 0.0)
            rows.append(dict(device=dev, tier=tier, policy=policy, prompt_index=0, token_index=i, token_id=5, draft_id=5,
                             uncertainty=u, transmitted=tx, k=50 if tx else 0, prob_bits=8, payload_bytes=163 if tx else 0,
                             uplink_bytes=190 if tx else 0, accepted=acc, resampled=tx and not acc, beta=0.1,
                             beta_is_shadow=not tx, retransmissions=0, t_draft_start=t, t_upload_sent=math.nan,
                             t_verdict=math.nan, t_commit=t + lat))
            t += lat
    end = max(r["t_commit"] for r in rows)
    summary = results.summarize(rows, emulated_seconds=end, wall_seconds=1.0, vocab_size=1000, verifier_batches=[1])
    c = Collector(S, vocab_size=1000)
    c.ingest_token_records(rows)
    snap = c.snapshot()
    assert snap.emulated_s == pytest.approx(summary["emulated_seconds"])
    assert snap.throughput == pytest.approx(summary["throughput_tokens_per_s"]["system"])
    assert snap.skip_rate == pytest.approx(summary["skip_rate"])
    assert snap.acceptance_rate == pytest.approx(summary["acceptance_rate"])
    assert snap.jain_run == pytest.approx(summary["jain_fairness"])
    assert snap.totals.uplink_bytes == summary["uplink_bytes"]
    assert 1 - snap.totals.vocab_entries / (1000 * snap.totals.uploads) == pytest.approx(summary["vocab_compression"])
    for (tier, _), x in snap.tier_throughput.items():
        assert x == pytest.approx(summary["throughput_tokens_per_s"]["tiers"][tier])
