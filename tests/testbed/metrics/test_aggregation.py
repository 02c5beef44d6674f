"""The collector (testbed.metrics.aggregation): it folds the run's events (agents.events) into the
exported counters, histograms and gauges, and into the snapshot the progress display reads."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from agents.events import MessageLost, ShadowResolved, TokenCommitted, UploadSent, VerdictReceived, VerifierBatch
from testbed.figures import jain
from testbed.metrics import Collector

S = "unit"


def tok(
    device=0,
    tier="phone",
    policy="cu-hlm",
    u=0.5,
    tx=True,
    k=32,
    acc=True,
    lat=0.1,
    t=1.0,
    drafted=True,
    payload=None,
    uplink=None,
    fidelity=math.nan,
) -> TokenCommitted:
    """A committed token: uploaded (tx) or skipped, accepted or resampled, `lat` emulated seconds from its
    draft start to its commit at `t`."""
    return TokenCommitted(
        dict(
            device=device,
            tier=tier,
            policy=policy,
            token_index=0,
            draft_id=5 if drafted else -1,
            uncertainty=u,
            transmitted=tx,
            k=k if tx else 0,
            payload_bytes=(104 if tx else 0) if payload is None else payload,
            uplink_bytes=(130 if tx else 0) if uplink is None else uplink,
            accepted=acc,
            resampled=tx and not acc,
            t_draft_start=t - lat,
            t_commit=t,
            fidelity_tv=fidelity,
        )
    )


def link(tier="phone", policy="cu-hlm", up=(), down=(), lost_up=0, lost_down=0, retransmissions=0) -> list:
    """One UploadSent per uplink byte count in `up` (the first with `retransmissions`), one VerdictReceived
    per downlink byte count in `down`, and the losses."""
    base = (0, tier, policy, 0, 0, False)  # device, tier, policy, step, seq, final
    out: list = [
        UploadSent(*base, frame_bytes=b, copies=1 + (retransmissions if i == 0 else 0), t_sent=0.0, wire_bytes=b)
        for i, b in enumerate(up)
    ]
    out += [VerdictReceived(*base, frame_bytes=b, copies=1, t_arrive=0.0) for b in down]
    out += [MessageLost(*base, direction="uplink", count=lost_up)] if lost_up else []
    out += [MessageLost(*base, direction="downlink", count=lost_down)] if lost_down else []
    return out


def value(c: Collector, name: str, tier: str | None = "phone", policy: str = "cu-hlm", **labels) -> float | None:
    lbl = {"scenario": c.scenario, **labels}
    if tier is not None:
        lbl.update(tier=tier, policy=policy)
    return c.registry.get_sample_value(name, lbl)


def test_counters_and_histograms_count_each_token_once() -> None:
    c = Collector(S, tiers={"phone": "cu-hlm", "laptop": "u-hlm"}, vocab_size=1000)
    c.ingest_events(
        [
            tok(device=0, u=0.05, tx=False, t=0.1),  # skipped
            tok(device=0, u=0.6, tx=True, k=40, acc=True, t=0.3),  # accepted upload
            tok(device=1, u=0.9, tx=True, k=60, acc=False, t=0.35),  # rejected, resampled
            tok(
                device=2,
                tier="laptop",
                policy="u-hlm",
                u=math.nan,
                tx=True,
                k=1000,
                acc=True,
                t=0.2,
                payload=3250,
                uplink=3300,
            ),
        ]
    )
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
    assert value(c, "hlm_upload_vocab_entries_count") == 2  # skipped token not observed
    assert value(c, "hlm_token_latency_seconds_count") == 3
    # NaN uncertainty is not observed, the token still counts
    assert value(c, "hlm_token_uncertainty_count", "laptop", "u-hlm") == 0
    assert value(c, "hlm_uploads_total", "laptop", "u-hlm") == 1
    snap = c.snapshot()
    assert snap.totals.committed == 4 and snap.skip_rate == pytest.approx(1 / 4)
    assert snap.acceptance_rate == pytest.approx(2 / 3)
    # llm-only: a request without a draft is neither an upload nor a skip
    c.ingest_events(
        [tok(device=7, tier="cloud", policy="llm-only", u=math.nan, tx=True, k=0, acc=False, drafted=False)]
    )
    assert value(c, "hlm_uploads_total", "cloud", "llm-only") == 0
    assert value(c, "hlm_skips_total", "cloud", "llm-only") == 0
    assert value(c, "hlm_tokens_drafted_total", "cloud", "llm-only") == 0
    assert value(c, "hlm_tokens_committed_total", "cloud", "llm-only") == 1
    # pre-created series exist at 0 before any data
    c2 = Collector(S, tiers={"phone": "cu-hlm"})
    assert value(c2, "hlm_tokens_committed_total") == 0
    assert value(c2, "hlm_verifier_batch_size_count", tier=None, verifier="verifier") == 0


def test_fidelity_at_the_commit_and_from_a_shadow_verdict() -> None:
    # a transmitted token has its fidelity at the commit; a skipped one gets it with its shadow beta
    c = Collector(S, tiers={"phone": "cu-hlm"})
    c.ingest_events([tok(device=0, fidelity=0.25, t=0.1), tok(device=1, tx=False, t=0.2)])
    assert value(c, "hlm_fidelity_tv_count") == 1
    c.ingest_events(
        [
            ShadowResolved(device=1, token_index=0, step=1, beta=0.1, fidelity_tv=0.5),
            ShadowResolved(device=1, token_index=0, step=1, beta=0.1),  # NaN: unchanged, not observed
            ShadowResolved(device=9, token_index=0, step=1, beta=0.1, fidelity_tv=0.5),
        ]
    )  # never committed
    assert value(c, "hlm_fidelity_tv_count") == 2 and value(c, "hlm_fidelity_tv_sum") == pytest.approx(0.75)


def test_verifier_link_clock_and_error_events() -> None:
    c = Collector(S, tiers={"phone": "cu-hlm"}, vocab_size=1000)
    c.ingest_events(
        [
            VerifierBatch(2.0, 2.04, 3, 9, (0.0, 0.002, 0.01)),
            VerifierBatch(0.5, 0.52, 1, 1),
            *link(up=(400, 300, 200, 100), down=(32, 32, 32, 32), lost_up=1, retransmissions=1),
        ]
    )
    c.clock("group-0", 1.5, 0.7, 0.0, {"phone": 2})
    c.clock("group-1", 1.2, 0.9, 0.25, {"phone": 3})
    c.clock("group-0", 1.8, 0.8, 0.1, {"phone": 1})  # replaces group-0's earlier report
    c.protocol_errors("malformed")
    assert value(c, "hlm_verifier_batch_size_count", tier=None, verifier="verifier") == 2
    assert value(c, "hlm_verifier_batch_size_sum", tier=None, verifier="verifier") == 4
    assert value(c, "hlm_verifier_tokens_total", tier=None, verifier="verifier") == 10
    assert value(c, "hlm_verifier_queue_wait_seconds_count", tier=None, verifier="verifier") == 3
    assert value(c, "hlm_verifier_verify_seconds_sum", tier=None, verifier="verifier") == pytest.approx(0.06)
    assert value(c, "hlm_link_uplink_messages_total") == 4
    assert value(c, "hlm_link_uplink_bytes_total") == 1000
    assert value(c, "hlm_link_downlink_messages_total") == 4
    assert value(c, "hlm_link_downlink_bytes_total") == 128
    assert value(c, "hlm_link_lost_messages_total") == 1
    assert value(c, "hlm_link_retransmissions_total") == 1
    assert value(c, "hlm_protocol_errors_total", tier=None, reason="malformed") == 1
    assert value(c, "hlm_active_devices") == 4
    assert value(c, "hlm_emulated_time_seconds", tier=None) == pytest.approx(2.04)  # batch end is the latest event
    assert value(c, "hlm_wall_time_seconds", tier=None) == 0.9
    assert value(c, "hlm_lag_seconds", tier=None) == 0.25
    assert value(c, "hlm_vocabulary_size", tier=None) == 1000
    snap = c.snapshot()
    assert snap.protocol_errors == {"malformed": 1}
    assert snap.verifier_batches == 2 and snap.verifier_batch_size_mean == 2.0


def test_throughput_and_fairness_gauges() -> None:
    # phone devices 0,1 commit every 0.1 s for 20 s; laptop device 2 every 0.05 s but only for the last 5 s
    c = Collector(S, tiers={"phone": "cu-hlm", "laptop": "u-hlm"}, window_s=4.0)
    events = [tok(device=d, tx=False, lat=0.1, t=i * 0.1) for i in range(1, 201) for d in (0, 1)]
    events += [tok(device=2, tier="laptop", policy="u-hlm", tx=False, lat=0.05, t=15 + i * 0.05) for i in range(1, 101)]
    c.ingest_events(events)
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
    c.clock("runner", 20.0, 5.0, 0.0, {"phone": 3, "laptop": 1})
    assert value(c, "hlm_jain_fairness_ratio", tier=None) == pytest.approx(jain([10, 10, 20], n=4))
    snap = c.snapshot()
    assert snap.throughput == pytest.approx(500 / 20) and snap.totals.committed == 500
    assert snap.tier_throughput[("laptop", "u-hlm")] == pytest.approx(20.0)


def test_content_pass_counts_for_progress_only() -> None:
    # The virtual clock's content pass: its tokens (no times) count in the content totals, no metric moves.
    c = Collector(S, tiers={"phone": "cu-hlm"})
    nan = math.nan
    content = [
        tok(device=0, tx=False, t=nan, lat=nan),
        tok(device=1, acc=False, t=nan, lat=nan),
        ShadowResolved(device=0, token_index=0, step=1, beta=0.2),
    ]
    c.ingest_content(content)
    snap = c.snapshot()
    assert snap.content[("phone", "cu-hlm")].committed == 2 and snap.content[("phone", "cu-hlm")].skips == 1
    assert snap.totals.committed == 0 and snap.emulated_s == 0.0
    assert value(c, "hlm_tokens_committed_total") == 0 and value(c, "hlm_token_latency_seconds_count") == 0
    c.ingest_events([tok(device=0, t=0.5)])  # the replay: timed, apart from the content totals
    snap = c.snapshot()
    assert snap.totals.committed == 1 and snap.content[("phone", "cu-hlm")].committed == 2


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
        c.ingest_events([tok(device=d, t=i * 0.1 + d * 0.001) for d in range(10)])
    stop.set()
    th.join()
    assert not errors and value(c, "hlm_tokens_committed_total") == 2000


def test_events_of_several_tiers_in_one_call() -> None:
    c = Collector(S)
    c.ingest_events(
        [tok(device=g, tier=["phone", "laptop", "phone"][g], policy=["cu-hlm", "u-hlm", "cu-hlm"][g]) for g in range(3)]
    )
    assert value(c, "hlm_tokens_committed_total") == 2
    assert value(c, "hlm_tokens_committed_total", "laptop", "u-hlm") == 1


def test_ingest_is_fast_enough_for_fleets() -> None:
    import time

    c = Collector(S, tiers={"phone": "cu-hlm"}, vocab_size=151936)
    events = [
        tok(device=i % 1000, u=(i % 21) / 20, tx=bool(i % 3), k=64, acc=bool(i % 5), t=i * 0.001) for i in range(20_000)
    ]
    t0 = time.perf_counter()
    c.ingest_events(events)
    c.exposition()
    dt = time.perf_counter() - t0
    assert dt < 5.0, dt  # ~0.2 s here; a 64k-token fleet run costs well under its runtime


def test_ingest_token_records_matches_summary_definitions() -> None:
    """Rows in the tokens.parquet schema feed the collector; its figures equal summary.json's."""
    import numpy as np

    from testbed import results

    rng = np.random.default_rng(3)
    rows = []
    for dev, (tier, policy, step) in enumerate([("phone", "cu-hlm", 0.03)] * 3 + [("laptop", "u-hlm", 0.012)] * 2):
        t = float(rng.uniform(0, 0.2))
        for i in range(40):
            u = float(rng.integers(0, 21) / 20)
            tx = u > 0.1
            acc = (not tx) or bool(rng.random() > u * 0.8)
            lat = step + (0.08 if tx else 0.0)
            rows.append(
                dict(
                    device=dev,
                    tier=tier,
                    policy=policy,
                    prompt_index=0,
                    token_index=i,
                    token_id=5,
                    draft_id=5,
                    uncertainty=u,
                    transmitted=tx,
                    k=50 if tx else 0,
                    prob_bits=8,
                    payload_bytes=163 if tx else 0,
                    uplink_bytes=190 if tx else 0,
                    accepted=acc,
                    resampled=tx and not acc,
                    beta=0.1,
                    beta_is_shadow=not tx,
                    retransmissions=0,
                    t_draft_start=t,
                    t_upload_sent=math.nan,
                    t_verdict=math.nan,
                    t_commit=t + lat,
                )
            )
            t += lat
    end = max(r["t_commit"] for r in rows)
    summary = results.summarize(rows, emulated_seconds=end, wall_seconds=1.0, vocab_size=1000, verifier_batches=[1])
    c = Collector(S, vocab_size=1000)
    c.ingest_token_records(results.tokens_frame(rows).itertuples(index=False))  # records by attribute, too
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


def test_observe_all_equals_observe_one_by_one():
    """The batched observe leaves a histogram exactly as observing each value in order: buckets, count, sum."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from testbed.metrics.aggregation import observe_all

    rng = np.random.default_rng(0)
    values = [*rng.exponential(0.3, 500).tolist(), 0.005, 0.0, -1.0, math.inf, math.nan, 2, 7]
    buckets = (0.005, 0.01, 0.1, 0.5, 1.0, 5.0)
    regs = CollectorRegistry(), CollectorRegistry()
    one, batched = (Histogram("h", "h", ["a"], registry=r, buckets=buckets).labels("x") for r in regs)
    for chunk in (values[:100], values[100:]):
        for v in chunk:
            one.observe(v)
        observe_all(batched, chunk)
    observe_all(batched, [])

    def text(r):
        return [line for line in generate_latest(r).decode().splitlines() if "_created" not in line]

    assert text(regs[0]) == text(regs[1])
