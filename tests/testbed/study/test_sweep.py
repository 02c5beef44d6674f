"""The channel sweep (testbed.study.sweep): the delay model against a smoke study's measured
throughputs, its closed-form limits, the paper's accounting, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from agents.codec import paper_bits
from testbed.study import sweep as cs
from testbed.study.analysis import paper_throughput
from testbed.study.paper import run_paper


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "paper"
    run_paper("smoke", out, log=lambda line: None)
    return out


def test_delay_model_reproduces_the_measured_throughputs(study):
    pts = cs.load_points(study)
    assert {"hlm", "cu-hlm", "llm-only", "slm-only", "u-hlm"} <= set(pts)
    for name, p in pts.items():
        rate = p.model.uplink_rate_bps
        model = cs.device_throughputs(p.tokens, p.model, rate, cs.Encoding("ours"), p.summary["vocab_size"])
        measured = p.summary["throughput_tokens_per_s"]["devices"]
        for d, v in measured.items():
            assert model[int(d)] == pytest.approx(v, rel=1e-9), (name, d)
        a = cs.affine(p.tokens, p.model, cs.Encoding("ours"), p.summary["vocab_size"])
        measured = paper_throughput(p.summary, study / "points" / name / "tokens.parquet")
        assert float(a.throughput(rate)) == pytest.approx(measured, rel=1e-9), name
    # and the study's own rate is the paper-uplink's W log2(1 + SNR) (10 MHz, 10 dB)
    assert pts["hlm"].model.uplink_rate_bps == pytest.approx(10e6 * math.log2(11))


def test_the_table_and_the_report_carry_the_sweep(study):
    doc = json.loads((study / "report/table.json").read_text())
    sweep = doc["channel_sweep"]
    assert set(sweep["encodings"]) == {"ours", "paper-V512", "paper-V32000"}
    by = {r["point"]: r for r in doc["rows"]}
    for r in sweep["encodings"]["ours"]["rows"]:  # at the study's rate: the measured ratio
        assert r["ratio_at_study_rate"] == pytest.approx(by[r["point"]]["throughput_ratio_hlm"], rel=1e-9)
    page = (study / "report/report.html").read_text()
    assert 'data-plot="channel_sweep.png"' in page and "where the paper's 206x lies" in page


def tokens(devices: int, n: int, skip: float, k: int, payload: int, vocab: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Synthetic tokens: each device skips round(skip * n) tokens, uploads `payload` bytes (+ a 40-byte frame)."""
    rows = []
    for d in range(devices):
        skipped = set(np.random.default_rng(seed + d).choice(n, round(skip * n), replace=False).tolist())
        for t in range(n):
            tx = t not in skipped
            rows.append(
                {
                    "device": d,
                    "transmitted": tx,
                    "draft_id": 5,
                    "k": k if tx else 0,
                    "uplink_bytes": payload + 40 if tx else 0,
                    "downlink_bytes": 30 if tx else 0,
                    "payload_bytes": payload if tx else 0,
                }
            )
    return pd.DataFrame(rows)


MODEL = cs.DelayModel(
    slm_s=0.025, uplink_rate_bps=34.6e6, uplink_delay_s=0.005, downlink_rate_bps=34.6e6, downlink_delay_s=0.0213
)


def brute_throughput(tok: pd.DataFrame, rate: float, bits: np.ndarray) -> float:
    """Per token delay summed per device, harmonic mean over devices (the study's definition)."""
    m = MODEL
    fixed = m.uplink_delay_s + 8 * tok["downlink_bytes"] / m.downlink_rate_bps + m.downlink_delay_s
    delay = m.slm_s + np.where(tok["transmitted"], bits / rate + fixed, 0.0)
    per = [len(g) / delay[g.index].sum() for _, g in tok.groupby("device")]
    return len(per) / sum(1 / x for x in per)


def test_affine_form_equals_brute_force_and_the_limits_are_closed_form():
    h = tokens(3, 40, 0.0, 1000, 4000)
    c = tokens(3, 40, 0.25, 30, 35)
    enc = cs.Encoding("ours")
    ah, ac = cs.affine(h, MODEL, enc, 1000), cs.affine(c, MODEL, enc, 1000)
    for rate in (1e3, 1e6, 34.6e6, 1e10):
        bh = brute_throughput(h, rate, 8.0 * h["uplink_bytes"].to_numpy())
        bc = brute_throughput(c, rate, 8.0 * c["uplink_bytes"].to_numpy())
        assert float(ah.throughput(rate)) == pytest.approx(bh, rel=1e-12)
        assert float(ac.throughput(rate)) == pytest.approx(bc, rel=1e-12)
    # R -> 0: the payload ratio adjusted for skipping; R -> infinity: (slm + cost) / (slm + (1 - skip) cost)
    cost = MODEL.uplink_delay_s + 8 * 30 / MODEL.downlink_rate_bps + MODEL.downlink_delay_s
    low, high = cs.limits(ah, ac)
    assert low == pytest.approx((4000 + 40) / (0.75 * (35 + 40)), rel=1e-12)
    assert high == pytest.approx((MODEL.slm_s + cost) / (MODEL.slm_s + 0.75 * cost), rel=1e-12)
    assert float(cs.ratio(ah, ac, 1e-6)) == pytest.approx(low, rel=1e-6)
    assert float(cs.ratio(ah, ac, 1e18)) == pytest.approx(high, rel=1e-6)
    # monotone between them (a ratio of affine functions of 1 / R)
    r = cs.ratio(ah, ac, np.logspace(0, 12, 200))
    assert np.all(np.diff(r) <= 1e-12)
    # nothing skipped: the high-rate limit is exactly 1
    same = cs.affine(tokens(3, 40, 0.0, 30, 35), MODEL, enc, 1000)
    assert cs.limits(ah, same)[1] == pytest.approx(1.0, rel=1e-12)


def test_rate_reaching_a_target_solves_the_ratio():
    h = cs.affine(tokens(2, 40, 0.0, 1000, 4000), MODEL, cs.Encoding("ours"), 1000)
    c = cs.affine(tokens(2, 40, 0.5, 30, 35), MODEL, cs.Encoding("ours"), 1000)
    low, high = cs.limits(h, c)
    for target in (2.0, 10.0, 0.9 * low):
        r = cs.rate_reaching(h, c, target)
        assert float(cs.ratio(h, c, r)) == pytest.approx(target, rel=1e-9)
        assert float(cs.ratio(h, c, 0.5 * r)) > target > float(cs.ratio(h, c, 2 * r))
    assert cs.rate_reaching(h, c, 1.01 * low) is None
    assert cs.rate_reaching(h, c, 0.5 * high) == math.inf  # reached at every rate


@pytest.mark.parametrize("vocab", [1000, 32_000, 151_936])
def test_paper_accounting_is_codec_paper_bits(vocab):
    run_vocab = 1000
    h = tokens(2, 10, 0.0, run_vocab, 4000)
    c = tokens(2, 10, 0.3, 37, 60)
    enc = cs.Encoding("paper", vocab)
    hb = cs.uplink_bits(h, enc, run_vocab, MODEL)
    cb = cs.uplink_bits(c, enc, run_vocab, MODEL)
    assert np.all(hb == paper_bits(vocab, vocab))  # hlm's full distribution: k = |V| of the accounting
    assert hb[0] == vocab * (8 + math.ceil(math.log2(vocab)))
    assert np.all(cb[c["transmitted"]] == paper_bits(37, vocab)) and np.all(cb[~c["transmitted"]] == 0)
    # low-rate limit in the paper's accounting: 1 / ((1 - skip) (1 - compression)) with compression 1 - k / |V|
    low, _ = cs.limits(cs.affine(h, MODEL, enc, run_vocab), cs.affine(c, MODEL, enc, run_vocab))
    assert low == pytest.approx(1 / (0.7 * (37 / vocab)), rel=1e-12)
    # the paper's headline numbers on the same delay model: at most 1 / ((1 - 0.748)(1 - 0.974))
    ph, pc = cs.paper_curve(MODEL, 0.748, 0.974)
    assert cs.limits(ph, pc)[0] == pytest.approx(1 / (0.252 * 0.026), rel=1e-12)


def test_a_random_link_is_refused_by_name():
    from netem import LinkProfile

    with pytest.raises(cs.SweepError, match="uplink: the delay model needs a static link.*loss"):
        cs._static_rate(LinkProfile(rate_bps=1e6, loss=0.01), "points/x/scenario.yaml: uplink")


def test_cli_sweep_on_a_study(study):
    from typer.testing import CliRunner

    from testbed.cli import app

    r = CliRunner().invoke(app, ["reproduce", "sweep", str(study), "--vocab", "32000", "--vocab", "151936", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout[r.stdout.index("{") :])
    assert {"ours", "paper-V512", "paper-V32000", "paper-V151936"} == set(doc["encodings"])
    assert (study / "report/channel_sweep.png").stat().st_size > 10_000
    r = CliRunner().invoke(app, ["reproduce", "sweep", str(study / "nowhere")])
    assert r.exit_code == 2 and "no points/ folder" in r.output
