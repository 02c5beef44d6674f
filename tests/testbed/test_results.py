"""Tokens table schema and parquet round trip; summary figures against hand-computed values."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from testbed.results import (
    TOKEN_COLUMNS,
    TOKENS_SCHEMA,
    ResultsWriter,
    TokenRecord,
    comparison_table,
    read_tokens,
    summarize,
    summary_table,
    tokens_frame,
    write_summary,
    write_tokens,
)

NAN = math.nan
V = 100


def records() -> list[TokenRecord]:
    """Three devices, five tokens. Tier a: devices 0 and 1 (cu-hlm); tier b: device 2 (llm-only)."""
    R = TokenRecord
    return [
        # device 0: an accepted upload of 10 entries, then a skipped token (shadow beta 0.4)
        R(
            0,
            "a",
            "cu-hlm",
            0,
            0,
            5,
            draft_id=5,
            uncertainty=0.3,
            transmitted=True,
            k=10,
            prob_bits=8,
            payload_bytes=30,
            uplink_bytes=50,
            accepted=True,
            beta=0.2,
            t_draft_start=0.0,
            t_upload_sent=0.03,
            t_verdict=0.1,
            t_commit=0.1,
        ),
        R(
            0,
            "a",
            "cu-hlm",
            0,
            1,
            6,
            draft_id=6,
            uncertainty=0.0,
            accepted=True,
            beta=0.4,
            beta_is_shadow=True,
            t_draft_start=0.1,
            t_commit=0.25,
        ),
        # device 1: a full-distribution upload rejected and resampled (1 retransmission), then k = 20 accepted
        R(
            1,
            "a",
            "cu-hlm",
            1,
            0,
            9,
            draft_id=7,
            uncertainty=0.9,
            transmitted=True,
            k=V,
            prob_bits=8,
            payload_bytes=280,
            uplink_bytes=300,
            resampled=True,
            beta=0.9,
            retransmissions=1,
            t_draft_start=0.0,
            t_upload_sent=0.03,
            t_verdict=0.4,
            t_commit=0.4,
        ),
        R(
            1,
            "a",
            "cu-hlm",
            1,
            1,
            8,
            draft_id=8,
            uncertainty=0.5,
            transmitted=True,
            k=20,
            prob_bits=8,
            payload_bytes=40,
            uplink_bytes=60,
            accepted=True,
            t_draft_start=0.4,
            t_upload_sent=0.43,
            t_verdict=0.5,
            t_commit=0.5,
        ),
        # device 2: llm-only, no draft
        R(
            2,
            "b",
            "llm-only",
            0,
            0,
            3,
            transmitted=True,
            uplink_bytes=10,
            t_draft_start=0.0,
            t_upload_sent=0.0,
            t_verdict=0.2,
            t_commit=0.2,
        ),
    ]


def summary() -> dict:
    return summarize(
        records(),
        emulated_seconds=1.0,
        wall_seconds=12.5,
        vocab_size=V,
        verifier_batches=[1, 2, 3, 2],
        extra={"scenario": "synthetic"},
    )


# ------------------------------------------------------------------ schema and parquet


def test_schema_matches_record():
    assert [f.name for f in dataclasses.fields(TokenRecord)] == list(TOKEN_COLUMNS) == TOKENS_SCHEMA.names
    types = {f.name: str(f.type) for f in TOKENS_SCHEMA}
    assert (types["device"], types["tier"], types["uncertainty"], types["transmitted"]) == (
        "int32",
        "string",
        "double",
        "bool",
    )
    assert types["payload_bytes"] == types["uplink_bytes"] == "int64"  # summed over fleets
    assert not any(f.nullable for f in TOKENS_SCHEMA)


def test_device_token_row_has_the_record_fields():
    """agents.device builds the rows the runner writes: the same columns, in the same order."""
    from agents.device import token_row

    spec = SimpleNamespace(device=3, tier="phone", policy_name="cu-hlm", prompt_index=1)
    assert list(token_row(spec, 0)) == [f.name for f in dataclasses.fields(TokenRecord)]
    for col in (
        "device",
        "tier",
        "policy",
        "prompt_index",
        "token_index",
        "token_id",
        "draft_id",
        "uncertainty",
        "transmitted",
        "k",
        "prob_bits",
        "payload_bytes",
        "uplink_bytes",
        "accepted",
        "resampled",
        "beta",
        "beta_is_shadow",
        "retransmissions",
        "t_draft_start",
        "t_upload_sent",
        "t_verdict",
        "t_commit",
    ):
        assert col in TOKEN_COLUMNS


def test_parquet_round_trip_preserves_dtypes(tmp_path):
    df = tokens_frame(records())
    path = write_tokens(records(), tmp_path / "run" / "tokens.parquet")
    back = read_tokens(path)
    pd.testing.assert_frame_equal(back, df)
    assert dict(back.dtypes.astype(str)) == dict(df.dtypes.astype(str))
    assert str(back["device"].dtype) == "int32" and str(back["uplink_bytes"].dtype) == "int64"
    assert back["transmitted"].dtype == bool and back["beta"].dtype == np.float64
    assert pq.read_schema(path).remove_metadata().equals(TOKENS_SCHEMA.remove_metadata())
    # a DataFrame and dict rows (what the runtime builds) write the same table
    write_tokens(df, tmp_path / "df.parquet")
    write_tokens([dataclasses.asdict(r) for r in records()], tmp_path / "dicts.parquet")
    pd.testing.assert_frame_equal(read_tokens(tmp_path / "df.parquet"), df)
    pd.testing.assert_frame_equal(read_tokens(tmp_path / "dicts.parquet"), df)
    assert math.isnan(back.loc[1, "t_upload_sent"]) and back.loc[4, "draft_id"] == -1


def test_bad_tables_rejected(tmp_path):
    df = tokens_frame(records())
    with pytest.raises(ValueError, match="missing \\['t_commit'\\]"):
        write_tokens(df.drop(columns=["t_commit"]), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        write_tokens(df.assign(extra=1), tmp_path / "x.parquet")
    bad = df.astype({"draft_id": "float64"})
    bad.loc[0, "draft_id"] = NAN  # "no draft" is -1, never null
    with pytest.raises(ValueError, match="truncated converting to int32"):  # pyarrow.ArrowInvalid
        write_tokens(bad, tmp_path / "x.parquet")


def test_results_writer_streams_shards_and_merges(tmp_path):
    """Rows arrive as events; a skipped token's row waits for its shadow beta (and, the device's last,
    for the final flush's link columns); every shard is a readable file; merge gives tokens.parquet."""
    from agents.events import MessageLost, ShadowResolved, TokenCommitted, UploadSent, VerdictReceived

    recs = [dataclasses.asdict(r) for r in records()]
    skipped = {**recs[1], "beta": NAN, "beta_is_shadow": False}  # as committed, before its shadow beta
    w = ResultsWriter(tmp_path / "shards", flush_rows=2)
    w.add([TokenCommitted(recs[0]), TokenCommitted(skipped), TokenCommitted(recs[2])])  # 2 settled: a shard
    assert w.rows == 2 and len(w.shards) == 1 and len(read_tokens(w.shards[0])) == 2
    flush = ("a", "cu-hlm", 2, 1, True)  # the final flush of device 0 (step = max_new_tokens = 2)
    w.add(
        [
            UploadSent(0, *flush, 12, 2, 0.3, 24),
            VerdictReceived(0, *flush, 7, 1, 0.4),
            MessageLost(0, *flush, "uplink", 1),
            ShadowResolved(0, 1, 2, 0.4, NAN),
            TokenCommitted(recs[3]),
            TokenCommitted(recs[4]),
        ]
    )
    df = w.merge(tmp_path / "tokens.parquet")
    assert not (tmp_path / "shards").exists()
    want = tokens_frame(records())
    last = want.index[(want["device"] == 0) & (want["token_index"] == 1)]
    want.loc[last, ["flush_bytes", "flush_retransmissions", "downlink_bytes", "uplink_lost"]] = [24, 1, 7, 1]
    pd.testing.assert_frame_equal(df, want)
    pd.testing.assert_frame_equal(read_tokens(tmp_path / "tokens.parquet"), want)


def test_results_writer_keeps_unsettled_rows_of_a_run_cut_short(tmp_path):
    from agents.events import TokenCommitted

    w = ResultsWriter(tmp_path / "shards")
    w.add([TokenCommitted(dataclasses.asdict(r)) for r in records()])
    w.close()  # device 0's skipped token never got its shadow beta: written as it is
    assert len(w.frame()) == 5


def test_results_writer_reset_drops_every_row_and_starts_again(tmp_path):
    # the virtual clock's replay replaces the content pass's rows (testbed.sinks)
    from agents.events import TokenCommitted

    w = ResultsWriter(tmp_path / "shards", flush_rows=2)
    w.add([TokenCommitted(dataclasses.asdict(r)) for r in records()])  # shards written, a skipped row pending
    assert w.shards and w.pending
    w.reset()
    assert (w.rows, w.shards, w.pending, w.settled) == (0, [], {}, []) and (tmp_path / "shards").is_dir()
    w.add([TokenCommitted(dataclasses.asdict(records()[0]))])
    assert w.merge(tmp_path / "tokens.parquet", frame=False) == 1


# ------------------------------------------------------------------ summary figures


def test_summary_figures_by_hand():
    s = summary()
    assert (s["emulated_seconds"], s["wall_seconds"], s["tokens"], s["devices"]) == (1.0, 12.5, 5, 3)
    tp = s["throughput_tokens_per_s"]
    assert tp["system"] == 5.0  # 5 tokens / 1 emulated second
    # per device: tokens / (last commit - first draft start): 2/0.25, 2/0.5, 1/0.2
    assert tp["devices"] == pytest.approx({"0": 8.0, "1": 4.0, "2": 5.0})
    assert tp["tiers"] == pytest.approx({"a": 4 / 0.5, "b": 5.0})
    assert s["skip_rate"] == pytest.approx(1 / 5)
    assert s["acceptance_rate"] == pytest.approx(2 / 3)  # among the 3 transmitted drafts (llm-only excluded)
    assert s["uploads"] == 3
    assert s["vocab_compression"] == pytest.approx(1 - (10 + 100 + 20) / (V * 3))
    assert (s["uplink_bytes"], s["payload_bytes"], s["retransmissions"]) == (420, 350, 1)
    assert s["uplink_bytes_per_token"] == pytest.approx(84.0)
    # latencies t_commit - t_draft_start: 0.1, 0.15, 0.4, 0.1, 0.2 -> sorted 0.1 0.1 0.15 0.2 0.4
    lat = s["token_latency_s"]
    assert lat["p50"] == pytest.approx(0.15)
    assert lat["p95"] == pytest.approx(0.2 + 0.8 * 0.2)  # linear interpolation at rank 3.8
    assert lat["p99"] == pytest.approx(0.2 + 0.96 * 0.2)
    assert lat["mean"] == pytest.approx(0.95 / 5)
    assert s["jain_fairness"] == pytest.approx(289 / 315)  # (8+4+5)^2 / (3 * (64+16+25))
    assert s["beta_mean"] == pytest.approx(0.55) and s["shadow_beta_mean"] == pytest.approx(0.4)
    assert s["verifier_batch_size_mean"] == 2.0 and s["verifier_batches"] == 4
    assert s["scenario"] == "synthetic"


def test_summary_per_tier_blocks():
    a, b = summary()["tiers"]["a"], summary()["tiers"]["b"]
    assert (a["devices"], a["tokens"], a["policy"]) == (2, 4, "cu-hlm")
    assert a["skip_rate"] == pytest.approx(0.25) and a["acceptance_rate"] == pytest.approx(2 / 3)
    assert a["jain_fairness"] == pytest.approx(144 / 160)  # (8+4)^2 / (2 * (64+16))
    assert a["uplink_bytes"] == 410 and a["token_latency_s"]["p50"] == pytest.approx(0.125)
    assert (b["tokens"], b["skip_rate"], b["uplink_bytes"], b["jain_fairness"]) == (1, 0.0, 10, 1.0)
    assert b["acceptance_rate"] is None and b["vocab_compression"] is None  # no uploads of drafts


def test_summary_edge_cases():
    with pytest.raises(ValueError, match="clashes"):
        summarize(records(), emulated_seconds=1, wall_seconds=1, vocab_size=V, verifier_batches=[], extra={"tokens": 1})
    s = summarize(records()[:2], emulated_seconds=0.0, wall_seconds=1, vocab_size=V, verifier_batches=np.array([]))
    assert s["throughput_tokens_per_s"]["system"] is None and s["verifier_batch_size_mean"] is None


def test_summary_json_round_trip(tmp_path):
    s = summary()
    path = write_summary(s, tmp_path / "summary.json")
    assert json.loads(path.read_text()) == s
    assert "NaN" not in path.read_text()
    json.loads(path.read_text())


def test_tables_render():
    console = Console(record=True, width=160)
    console.print(summary_table(summary()))
    console.print(comparison_table({"hlm": summary(), "cu-hlm": summary()}))
    text = console.export_text()
    for word in (
        "synthetic",
        "jain fairness",
        "vocab compression",
        "56.7%",
        "cu-hlm",
        "llm-only",
        "hlm",
        "latency p95",
    ):
        assert word in text


def test_nulls_rejected(tmp_path):
    rows = [dataclasses.asdict(r) for r in records()]
    rows[2]["k"] = None
    with pytest.raises(ValueError, match=r"null values in \['k'\]"):
        write_tokens(rows, tmp_path / "x.parquet")
