"""Where a run's events go (testbed.sinks): one collector and one results writer for both passes of
the virtual clock. The content pass feeds progress (the collector's content totals, no metric) and the
partial results of a run cut short; the replay's timed events replace them."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest

from agents.events import TokenCommitted, VerifierBatch
from testbed.results import TokenRecord, read_tokens
from testbed.sinks import Sinks


def plan(devices: int = 2, max_new_tokens: int = 2):
    specs = [SimpleNamespace(device=d, tier="phone", policy_name="cu-hlm") for d in range(devices)]
    tiers = [SimpleNamespace(name="phone", count=devices, policy="cu-hlm")]
    scenario = SimpleNamespace(name="unit", clock="virtual", tiers=tiers)
    return SimpleNamespace(
        specs=specs, scenario=scenario, run=SimpleNamespace(vocab_size=512, max_new_tokens=max_new_tokens)
    )


@pytest.fixture
def sinks(tmp_path):
    opts = SimpleNamespace(
        collector=None, metrics_port=None, metrics_host="127.0.0.1", out_dir=tmp_path, engine="local", progress=True
    )
    s = Sinks(plan(), opts)  # type: ignore[arg-type]
    yield s
    s.close()


def token(device: int, index: int, t: float, transmitted: bool = True) -> TokenCommitted:
    return TokenCommitted(
        dataclasses.asdict(
            TokenRecord(
                device,
                "phone",
                "cu-hlm",
                0,
                index,
                7,
                draft_id=7,
                uncertainty=0.5,
                transmitted=transmitted,
                k=8 if transmitted else 0,
                accepted=True,
                beta=0.1,
                t_draft_start=t - 0.1,
                t_commit=t,
            )
        )
    )


def committed(s: Sinks, name: str) -> float | None:
    return s.collector.registry.get_sample_value(name, {"scenario": "unit", "tier": "phone", "policy": "cu-hlm"})


def test_progress_reads_the_one_collector(sinks, capsys):
    sinks.content([token(0, 0, 0.1), token(1, 0, 0.1)])
    sinks.progress.log_line()
    assert "content pass: tokens 2 (of at most 4) | phone: 2 tok, skip 0%" in capsys.readouterr().err
    assert committed(sinks, "hlm_tokens_committed_total") == 0  # the content pass moves no metric
    assert sinks.tokens == 2
    sinks.events([token(0, 0, 0.25), VerifierBatch(0.1, 0.2, 1, 1)])
    sinks.progress.log_line()
    assert "replay (emulated times): tokens 1 (of at most 4)" in capsys.readouterr().err
    assert committed(sinks, "hlm_tokens_committed_total") == 1 and sinks.batch_sizes == [1]


def test_a_run_cut_short_in_the_content_pass_keeps_its_rows(sinks, tmp_path):
    sinks.content([token(0, 0, 0.1), token(1, 0, 0.1), token(0, 1, 0.2)])
    df = sinks.results(tmp_path / "tokens.parquet")
    assert df is not None and len(df) == 3
    full = read_tokens(tmp_path / "tokens.parquet")
    assert full[["device", "token_index"]].values.tolist() == [[0, 0], [0, 1], [1, 0]]
    assert full["t_commit"].isna().all()  # no times before the replay
    assert not (tmp_path / "tokens.shards").exists()


def test_the_replay_replaces_the_content_rows(sinks, tmp_path):
    sinks.content([token(0, 0, 0.1), token(1, 0, 0.1)])
    sinks.events([])  # no token yet: the content rows stay
    sinks.events([token(0, 0, 0.25)])
    sinks.results(tmp_path / "tokens.parquet")
    full = read_tokens(tmp_path / "tokens.parquet")
    assert full[["device", "token_index"]].values.tolist() == [[0, 0]]
    assert full["t_commit"].tolist() == [pytest.approx(0.25)]


def test_nothing_committed_gives_no_results(sinks, tmp_path):
    assert sinks.results(tmp_path / "tokens.parquet") is None
    assert not (tmp_path / "tokens.parquet").exists()


def test_clock_reports_active_devices_and_protocol_errors_as_increments(sinks):
    sinks.events([token(1, 1, 0.3)])
    sinks.events([TokenCommitted({**token(0, 1, 0.4).row, "stop_reason": "length"})])
    sinks.clock(0.5, 3, {"OVERSIZED": 1})
    sinks.clock(0.0, 3, {"OVERSIZED": 1})  # cumulative: nothing new
    snap = sinks.collector.snapshot()
    assert snap.active_devices == {"phone": 1} and snap.lag_s == 0.0  # the runner's latest report
    assert snap.protocol_errors == {"OVERSIZED": 1, "malformed": 2}
    assert math.isclose(snap.emulated_s, 0.4)
