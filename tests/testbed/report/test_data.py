"""testbed.report.data: the report's figures are summary.json's (read, not recomputed); what only
the tokens hold is derived once; a run without (part of) summary.json gets the same figures from its
tokens as testbed.results.summarize would write."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from testbed import figures
from testbed.figures import beta_fit
from testbed.report import PLOTS, load_run, run_figures, write_report
from testbed.report.data import SUMMARY_KEYS, fill_summary, summary_from_tokens
from testbed.results import read_tokens, summarize, write_summary


def test_fit_recovers_the_generating_line(tmp_path: Path, make_run) -> None:
    path = make_run(tmp_path / "r", policies={"phone": "hlm", "laptop": "hlm"}, tokens_per_device=200)
    df = pd.read_parquet(path / "tokens.parquet")
    f = beta_fit(df)  # policies.rejection's least squares over the drafted tokens
    a, b, n = f.a, f.b, f.n
    # beta = clip(0.8 u - 0.07 + noise, 0, 1): clipping at 0 flattens the low end a little
    assert 0.6 < a < 0.9 and -0.1 < b < 0.05 and n == len(df)
    assert load_run(path).fit == f  # the report's, derived once when the run is loaded


def test_report_reads_summaries_from_testbed_results(tmp_path: Path, make_run) -> None:
    run = make_run(tmp_path / "run")
    df = read_tokens(run / "tokens.parquet")
    summary = summarize(
        df,
        emulated_seconds=float(df["t_commit"].max()),
        wall_seconds=2.0,
        vocab_size=151936,
        verifier_batches=[2, 3, 4],
    )
    write_summary(summary, run / "summary.json")
    html = write_report([run], tmp_path / "out")
    assert {p.name for p in html.parent.glob("*.png")} == {f"{key}.png" for key, _, _ in PLOTS}
    f = run_figures(load_run(run))
    assert f["verifier_batch_size_mean"] == 3.0 and f["wall_seconds"] == 2.0
    assert f["llm_agreement"] == pytest.approx(figures.llm_agreement(df))


def test_a_complete_summary_is_read_not_recomputed(tmp_path: Path, make_run, monkeypatch) -> None:
    path = make_run(tmp_path / "run")
    df = read_tokens(path / "tokens.parquet")
    summary = summarize(
        df, emulated_seconds=float(df["t_commit"].max()), wall_seconds=1.0, vocab_size=151936, verifier_batches=[]
    )
    summary["skip_rate"], summary["jain_fairness"] = 0.125, 0.5  # what the report shows: summary.json's
    write_summary(summary, path / "summary.json")

    def recomputed(*args, **kwargs):
        raise AssertionError("a figure summary.json holds was computed again")

    for name in ("token_figures", "device_throughput", "span_throughput", "jain", "latency_percentiles"):
        monkeypatch.setattr(figures, name, recomputed)
    run = load_run(path)
    f = run_figures(run)
    assert f["skip_rate"] == 0.125 and f["jain_fairness"] == 0.5
    per_device = summary["throughput_tokens_per_s"]["devices"]
    assert run.device_throughput.to_dict() == {int(d): x for d, x in per_device.items()}
    assert fill_summary(run.summary, run.tokens) is run.summary


def test_missing_figures_come_from_the_tokens_as_summarize_computes_them(tmp_path: Path, make_run) -> None:
    path = make_run(tmp_path / "run")
    df = read_tokens(path / "tokens.parquet")
    emu = float(df["t_commit"].max())
    full = summarize(df, emulated_seconds=emu, wall_seconds=1.0, vocab_size=151936, verifier_batches=[])
    derived = summary_from_tokens(df, emu, 151936)
    for keys in SUMMARY_KEYS:
        a, b = full, derived
        for k in keys:
            a, b = a[k], b[k]
        assert a == b, keys
    # no summary.json: every figure from the tokens (vocabulary compression needs vocab_size)
    (path / "summary.json").unlink()
    f = run_figures(load_run(path))
    assert f["tokens"] == len(df) and f["skip_rate"] == full["skip_rate"] and f["vocab_compression"] is None
    assert f["latency_p95"] == full["token_latency_s"]["p95"] and f["wall_seconds"] is None
    # one from before a figure existed: only that figure is filled in, the rest is read
    old = {k: v for k, v in full.items() if k not in ("jain_fairness", "fidelity_tv_branch_mean")}
    old["throughput_tokens_per_s"] = {"system": 1.0}
    filled = fill_summary(old, df)
    assert filled["jain_fairness"] == full["jain_fairness"] and "fidelity_tv_branch_mean" in filled
    assert filled["throughput_tokens_per_s"]["system"] == 1.0
    assert filled["throughput_tokens_per_s"]["tiers"] == full["throughput_tokens_per_s"]["tiers"]
    assert "jain_fairness" not in old  # the summary read is left as it was


def test_an_empty_run(tmp_path: Path, make_run) -> None:
    path = make_run(tmp_path / "run", tokens_per_device=1)
    df = read_tokens(path / "tokens.parquet").iloc[:0]
    s = summary_from_tokens(df, 0.0, None)
    assert s["tokens"] == 0 and s["devices"] == 0 and s["throughput_tokens_per_s"]["devices"] == {}
    assert s["jain_fairness"] is None and math.isnan(figures.ratio(0, 0))
