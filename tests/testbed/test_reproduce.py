"""testbed reproduce paper|fleet (testbed/reproduce.py) on tiny models, local engine."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from testbed import reproduce, reproduce_report
from testbed.reproduce import SIZES, Study, fleet_counts, paper_base, paper_throughput, with_policy

PNG = b"\x89PNG\r\n\x1a\n"
PAPER_FIGURES = ["uth_throughput_ratio", "uth_skip_rate", "uth_compression", "uth_pass_at_1", "uth_fidelity",
                 "beta_u_fit", "reliability", "theta_compression", "policies", "skip_vs_fidelity", "channel_sweep"]
FLEET_FIGURES = ["fleet_throughput", "fleet_fairness", "fleet_batch"]


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "paper"
    lines: list[str] = []
    t = time.time()
    result = reproduce.run_paper("smoke", out, log=lines.append)
    return {"out": out, "result": result, "lines": lines, "seconds": time.time() - t}


def _figures_ok(report: Path, names: list[str]) -> str:
    page = report.read_text(encoding="utf-8")
    for name in names:
        png = report.parent / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000, png
        assert png.read_bytes()[:8] == PNG, png
        assert f'data-plot="{name}.png"' in page, name
    assert page.count('src="data:image/png;base64,') == len(names)
    return page


def test_paper_smoke_end_to_end(paper):
    result, out = paper["result"], paper["out"]
    page = _figures_ok(result.report, PAPER_FIGURES)
    labels = [r["label"] for r in result.rows]
    for policy in reproduce.POLICIES:  # every policy has a row (adaptive at each risk budget)
        assert any(r["policy"] == policy for r in result.rows), policy
        assert any(lab == policy or lab.startswith(policy + "-") for lab in labels)
    assert [r["label"] for r in result.rows if r["group"] == "u_th"] == [
        "cu-hlm-risk-prone", *(f"cu-hlm-uth{v:g}" for v in SIZES["smoke"].u_th), "cu-hlm-uth0", "cu-hlm-uth-1"]
    # both sides of the risk-averse flip: skip every u = 0 token / skip nothing (testbed.calibration_ci)
    by_label = {r["label"]: r for r in result.rows}
    assert by_label["cu-hlm-uth-1"]["skip_rate"] == 0.0 and by_label["cu-hlm-uth0"]["u_th"] == 0.0
    t0 = pd.read_parquet(out / "points/cu-hlm-uth0/tokens.parquet")
    assert ((~t0["transmitted"]) == (t0["uncertainty"] == 0)).all()  # skipped: exactly the u = 0 tokens
    cal = json.loads((out / "calibration/calibration.json").read_text())
    ci = cal["fits"]["temperature"]["ci"]
    assert ci["bootstrap"] == 1000 and ci["groups"] == 4 and ci["a"][0] <= ci["a"][1]
    table = json.loads((result.report.parent / "table.json").read_text())
    assert table["calibration_flip"]["straddles_zero"] == ci["straddles_zero"]
    assert "How sure the calibration is" in page
    for label in labels:
        assert f"<td>{label}</td>" in page
    assert "up to 206x" in page and "45.93%" in page and "0.081 / 0.81" in page  # the papers' numbers
    # progress: one line per point, done/total and elapsed
    total = len(result.rows) + 1
    assert len(paper["lines"]) == total + 1  # + the header
    assert all(re.match(rf"\[\s*\d+/{total}\] \S+: ran in [\d.]+ s \(elapsed [\d.]+ s\)$", l) for l in paper["lines"][1:])
    # the runs are what the table says: the risk-prone point uses the fitted (a, b)
    fit = result.fit
    by = {r["point"]: r for r in result.rows}
    assert by["cu-hlm-risk-prone"]["u_th"] == pytest.approx((0.5 - fit.b) / fit.a)
    assert by["hlm"]["throughput_ratio_hlm"] == 1.0 and by["hlm"]["vocab_compression"] == 0.0
    assert by["slm-only"]["skip_rate"] == 1.0 and by["cu-hlm-uth1"]["skip_rate"] == 1.0
    s = (out / "points/cu-hlm-offline/scenario.yaml").read_text()
    assert f"k: {fit.kstar}" in s and "name: cu-hlm-offline" in s
    rand = json.loads((out / "points/rand-hlm/summary.json").read_text())
    assert (out / "points/rand-hlm/scenario.yaml").read_text().count(
        f"skip_rate: {round(by['u-hlm']['skip_rate'], 4)}") == 1
    assert rand["complete"] and "accuracy" in rand


def test_adaptive_points_per_estimator_and_the_equal_fidelity_table(paper):
    result = paper["result"]
    adaptive = [r for r in result.rows if r["policy"] == "cu-hlm-adaptive"]
    size = SIZES["smoke"]
    assert sorted((r["estimator"], r["risk"]) for r in adaptive) == sorted(
        (e, r) for e in size.adaptive_estimators for r in size.risks)
    table = json.loads((result.report.parent / "table.json").read_text())
    page = result.report.read_text(encoding="utf-8")
    assert "cu-hlm-adaptive against cu-hlm at equal fidelity" in page
    for v in table["adaptive_vs_cu_hlm"]:  # every compared point is in the table, with its gain
        assert f"<td>{v['point']}</td>" in page
        assert v["skip_gain"] == pytest.approx(v["skip_rate"] - v["cu_hlm_skip_rate"])


def _row(point, fid, skip, policy="cu-hlm", group="u_th", **kw):
    return {"point": point, "policy": policy, "group": group, "fidelity_tv": fid, "skip_rate": skip,
            "pass_at_1": kw.pop("pass_at_1", 0.5), **kw}


def test_equal_fidelity_interpolates_along_cu_hlms_pareto_front():
    rows = [_row("cu-hlm", 0.02, 0.2, group="policy"), _row("cu-hlm-uth0.25", 0.04, 0.6, pass_at_1=0.25),
            _row("dominated", 0.03, 0.1), _row("cu-hlm-uth0.5", 0.08, 0.8),
            _row("cu-hlm-theta0.5", 0.021, 0.9, group="theta"),  # another theta: not a threshold of the sweep
            _row("a1", 0.03, 0.5, policy="cu-hlm-adaptive", risk=0.01, estimator="max"),
            _row("a2", 0.01, 0.3, policy="cu-hlm-adaptive", risk=0.001, estimator="max"),
            _row("a3", 0.09, 0.95, policy="cu-hlm-adaptive", risk=0.1, estimator="max")]
    assert [r["point"] for r in reproduce.cu_hlm_frontier(rows)] == ["cu-hlm", "cu-hlm-uth0.25", "cu-hlm-uth0.5"]
    v = {x["point"]: x for x in reproduce.equal_fidelity(rows)}
    assert set(v) == {"a1", "a2"}  # a3 lies beyond the sweep's fidelity: nothing to compare with
    assert v["a1"]["cu_hlm_skip_rate"] == pytest.approx(0.4) and v["a1"]["skip_gain"] == pytest.approx(0.1)
    assert v["a1"]["cu_hlm_bracket"] == ["cu-hlm", "cu-hlm-uth0.25"] and v["a1"]["cu_hlm_pass_at_1"] == [0.5, 0.25]
    assert not v["a1"]["bound"]
    assert v["a2"]["bound"] and v["a2"]["cu_hlm_skip_rate"] == pytest.approx(0.2)  # more faithful than any u_th


def test_equal_fidelity_uses_the_upper_concave_hull_not_the_staircase():
    """A threshold under the chord of its neighbours is beaten by mixing them: the hull skips it, and the
    comparison is against the chord (here 0.5 at fidelity 0.03, where the staircase would say 0.3)."""
    rows = [_row("cu-hlm", 0.02, 0.2, group="policy"), _row("cu-hlm-uth0.1", 0.03, 0.3),
            _row("cu-hlm-uth0.5", 0.04, 0.8), _row("a", 0.03, 0.45, policy="cu-hlm-adaptive", risk=0.01)]
    assert [r["point"] for r in reproduce.cu_hlm_frontier(rows)] == ["cu-hlm", "cu-hlm-uth0.5"]
    (v,) = reproduce.equal_fidelity(rows)
    assert v["cu_hlm_skip_rate"] == pytest.approx(0.5) and v["skip_gain"] == pytest.approx(-0.05)
    # every measured point lies on or under the hull
    f = [r["fidelity_tv"] for r in reproduce.cu_hlm_frontier(rows)]
    s = [r["skip_rate"] for r in reproduce.cu_hlm_frontier(rows)]
    assert all(r["skip_rate"] <= np.interp(r["fidelity_tv"], f, s) + 1e-12 for r in rows[:3])


def test_paper_table_equals_point_summaries(paper):
    out, result = paper["out"], paper["result"]
    table = json.loads((out / "report/table.json").read_text())
    assert table["rows"] == json.loads(json.dumps(result.rows))
    hlm = json.loads((out / "points/hlm/summary.json").read_text())
    hlm_thr = paper_throughput(hlm, out / "points/hlm/tokens.parquet")
    by_point = {r["point"]: r for r in table["rows"]}
    page = result.report.read_text(encoding="utf-8")
    # the accuracy table: every scored point with its paired comparison and verdict
    assert "Accuracy: each policy against llm-only, paired" in page
    new_columns = ["Δ pass@1 vs llm-only", "distinguishable (95%)", "|Δ| ≤ (TV bound)"]
    for col in reproduce_report.ACCURACY_COLUMNS + new_columns:
        assert f"<th>{col}</th>" in page, col
    for r in table["rows"]:
        assert "<tr><td>" + "</td><td>".join(reproduce_report._accuracy_cells(r)) + "</td></tr>" in page
    for r in table["rows"]:
        s = json.loads((out / "points" / r["point"] / "summary.json").read_text())
        tok = pd.read_parquet(out / "points" / r["point"] / "tokens.parquet")
        # the study's throughput: total tokens / sum of the device spans (first draft start, last commit)
        g = tok.groupby("device")
        spans = g["t_commit"].max() - g["t_draft_start"].min()
        assert r["throughput_tokens_per_s"] == pytest.approx(len(tok) / spans.sum(), rel=1e-12)
        devices = s["throughput_tokens_per_s"]["devices"]
        assert sum(g.size()[int(d)] / x for d, x in devices.items()) == pytest.approx(spans.sum(), rel=1e-12)
        assert r["throughput_ratio_hlm"] == pytest.approx(r["throughput_tokens_per_s"] / hlm_thr, rel=1e-12)
        assert r["skip_rate"] == s["skip_rate"] and r["vocab_compression"] == s["vocab_compression"]
        assert r["fidelity_tv"] == s.get("fidelity_tv_mean")
        acc = s["accuracy"]
        assert r["pass_at_1"] == acc["unbiased"]["pass_at_1"] and r["pass_at_1_stderr"] == acc["unbiased"]["stderr"]
        assert r["pass_at_1"] == pytest.approx(acc["pass_at_1"])  # one sample per problem
        assert r["n_problems"] == 4 and r["samples_per_problem"] == [1, 1]
        # the accuracy bound implied by fidelity: mean over sequences of min(1, summed per-token TV)
        per_seq = tok.groupby("device")["fidelity_tv"].sum().clip(upper=1.0)
        assert r["pass_at_1_tv_bound"] == pytest.approx(per_seq.mean(), rel=1e-12)
        if r["policy"] != "llm-only":
            assert r["pass_at_1_relative"] == acc.get("pass_at_1_relative")
            assert r["pass_at_1_relative_stderr"] == acc.get("pass_at_1_relative_stderr")
            assert acc["reference"]["run_dir"] == str(out / "points/llm-only")
            pr = acc["paired"]
            assert pr["test"] == "mcnemar-exact" and pr["n_problems"] == 4
            assert r["pass_at_1_diff"] == pr["diff"] and r["pass_at_1_diff_stderr"] == pr["stderr"]
            assert r["mcnemar_p"] == pr["mcnemar_p"] and r["distinguishable_95"] == pr["distinguishable_95"]
            assert r["pass_at_1_diff"] == pytest.approx(r["pass_at_1"] - by_point["llm-only"]["pass_at_1"])
        else:
            assert r["pass_at_1_diff"] == 0.0 and r["distinguishable_95"] is None
            assert r["pass_at_1_tv_bound"] == 0.0  # the LLM's own law
        # the HTML row shows the same numbers
        cells = reproduce_report._policy_cells(r)
        assert "<tr><td>" + "</td><td>".join(cells) + "</td></tr>" in page


def test_paper_resumes(paper, tmp_path):
    out = tmp_path / "paper"
    shutil.copytree(paper["out"], out)
    rows = paper["result"].rows
    lines: list[str] = []
    t = time.time()
    again = reproduce.run_paper("smoke", out, log=lines.append)
    fast = time.time() - t
    assert set(again.statuses.values()) == {"cached"} and again.rows == rows
    assert fast < paper["seconds"]
    assert all(": cached in " in line for line in lines[1:])
    # an interrupted point (summary cut short, no point.json) and a half-written one are redone, alone
    victim, partial = out / "points/cu-hlm-uth0.3", out / "points/u-hlm"
    (victim / "point.json").unlink()
    s = json.loads((victim / "summary.json").read_text())
    (victim / "summary.json").write_text(json.dumps({**s, "complete": False, "interrupted": True}))
    (partial / "summary.json").write_text("{")  # torn write
    other = out / "points/hlm/tokens.parquet"
    before = other.stat().st_mtime_ns
    third = reproduce.run_paper("smoke", out, log=lambda line: None)
    ran = {n for n, st in third.statuses.items() if st == "ran"}
    assert ran == {"cu-hlm-uth0.3", "u-hlm"}
    assert other.stat().st_mtime_ns == before
    assert third.rows == rows  # deterministic: the redone points give the same numbers


def test_finished_needs_matching_scenario(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    acc = {"pass_at_1_relative": 1.0, "paired": {}}
    (d / "summary.json").write_text(json.dumps({"complete": True, "accuracy": acc}))
    st = Study(tmp_path)
    st._mark(d, "abc", 1.0)
    assert Study.finished(d, "abc", True, True)
    assert not Study.finished(d, "other", True, True)  # a changed parameter is recomputed
    (d / "summary.json").write_text(json.dumps({"complete": True, "accuracy": {"pass_at_1_relative": 1.0}}))
    assert not Study.finished(d, "abc", True, True)  # scored before the paired comparison existed
    (d / "summary.json").write_text(json.dumps({"complete": True}))
    assert not Study.finished(d, "abc", True, False)  # scored points need their accuracy block
    assert Study.finished(d, "abc", False, False)


def test_paper_devices_do_not_distort_each_other(tmp_path):
    """The isolated setting: a device's trace is the one it has alone, and the summary's per-device
    throughput is 1 / mean per-token delay = SLM + uplink + LLM + downlink per transmitted token."""
    from testbed.run import RunOptions, run_scenario

    fit = reproduce.Fit(0.815, -0.066, "paper", 16)
    spec = reproduce.policy_spec("cu-hlm", fit, threshold="fixed", u_th=0.5)
    runs = {}
    for n in (1, 4):
        base = paper_base(dataclasses.replace(SIZES["smoke"], count=n, max_new_tokens=6))
        assert base.server.verify_ms.base == 0 and base.server.max_batch == n
        runs[n] = run_scenario(with_policy(base, spec, f"iso{n}"),
                               RunOptions(out_dir=tmp_path / str(n), engine="local", progress=False, report=False,
                                          accuracy=False))
    t = {n: pd.read_parquet(tmp_path / str(n) / "tokens.parquet") for n in runs}
    alone, among = t[1], t[4][t[4]["device"] == 0].reset_index(drop=True)
    for col in ("token_id", "transmitted", "t_draft_start", "t_commit"):
        assert alone[col].tolist() == among[col].tolist()
    assert runs[1]["throughput_tokens_per_s"]["devices"]["0"] == runs[4]["throughput_tokens_per_s"]["devices"]["0"]
    df = t[4]
    delay = df["t_commit"] - df["t_draft_start"]
    for dev, g in df.groupby("device"):
        assert runs[4]["throughput_tokens_per_s"]["devices"][str(dev)] == pytest.approx(1 / delay[g.index].mean())
    slm = base.tiers[0].slm_ms_per_token / 1000
    llm = reproduce.llm_ms(reproduce.paper_setting(SIZES["smoke"])) / 1000
    skipped, sent = ~df["transmitted"], df["transmitted"]
    assert skipped.any() and sent.any()
    assert np.allclose(delay[skipped], slm)
    assert (delay[sent] > slm + llm + 2 * 0.005).all()  # + both links' 5 ms delay and the transfers


def test_fleet_counts():
    assert fleet_counts([2, 1, 1], 4) == [2, 1, 1]
    assert fleet_counts([2, 1, 1], 6) == [3, 2, 1]
    for n in (3, 5, 16, 64, 1000):
        c = fleet_counts([2, 1, 1], n)
        assert sum(c) == n and min(c) >= 1
    assert sum(fleet_counts([2, 1, 1], 2)) == 2


def test_fleet_smoke_end_to_end(tmp_path):
    lines: list[str] = []
    result = reproduce.run_fleet("smoke", tmp_path / "fleet", log=lines.append)
    page = _figures_ok(result.report, FLEET_FIGURES)
    sizes = SIZES["smoke"].fleet_sizes
    assert {(r["policy"], r["fleet_size"]) for r in result.rows} == {(p, n) for p in reproduce.FLEET_POLICIES
                                                                     for n in sizes}
    for r in result.rows:
        s = json.loads((tmp_path / "fleet/points" / r["point"] / "summary.json").read_text())
        assert s["devices"] == r["fleet_size"] and len(s["tiers"]) == min(3, r["fleet_size"])
        assert r["system_throughput_tokens_per_s"] == s["throughput_tokens_per_s"]["system"]
        assert r["jain_fairness"] == s["jain_fairness"]
        assert r["verifier_batch_size_mean"] == s["verifier_batch_size_mean"]
        assert f"<td>{r['label']}</td><td>{r['fleet_size']}</td>" in page
    assert len(lines) == len(result.rows) + 2


def test_cli_resumes_and_estimates(paper, tmp_path):
    from typer.testing import CliRunner

    from testbed.cli import app

    out = tmp_path / "paper"
    shutil.copytree(paper["out"], out)
    r = CliRunner().invoke(app, ["reproduce", "paper", "--size", "smoke", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    text = r.output + (r.stderr if hasattr(r, "stderr") else "")
    assert "cached in" in text and "report:" in text
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert doc["rows"] == json.loads(json.dumps(paper["result"].rows))
    r = CliRunner().invoke(app, ["reproduce", "paper", "--size", "small", "--estimate", "--json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.stdout)
    # small fits well within an hour on 2 CPU cores with native bf16 (the step time is measured on such a
    # machine: about 19 min): with a measured 1 in 16 completions running on to 256 tokens, most points cost
    # the whole budget; an fp32-only CPU takes a few times longer
    bf16, fp32 = est["cpu_classes"]["bf16"]["minutes"], est["cpu_classes"]["fp32"]["minutes"]
    assert est["size"] == "small" and est["max_new_tokens"] >= 256 and est["devices"] == 16
    assert 10 < bf16[0] < 40 and bf16[0] <= bf16[1] < 60, bf16
    assert bf16[1] <= est["cpu_classes"]["bf16"]["minutes_without_stops"] + 1e-9
    assert fp32[0] > 2 * bf16[0] and est["minutes"] == [bf16[0], fp32[1]]
    # over many tiles (medium: 164 problems) stopping is what makes 256 tokens affordable overnight
    med = reproduce.estimate("paper", "medium")["cpu_classes"]["bf16"]
    assert med["minutes_without_stops"] > 1.5 * med["minutes"][1] and med["minutes"][1] < 16 * 60
    r = CliRunner().invoke(app, ["reproduce", "paper", "--size", "small", "--estimate"])
    assert r.exit_code == 0 and "native bf16" in r.output and "fp32 only" in r.output, r.output
    r = CliRunner().invoke(app, ["reproduce", "paper", "--size", "full", "--estimate", "--json"])
    assert json.loads(r.stdout)["devices"] == 164 * 5 and SIZES["full"].samples >= 5
    r = CliRunner().invoke(app, ["reproduce", "paper", "--size", "small", "--samples", "2", "--estimate", "--json"])
    assert json.loads(r.stdout)["devices"] == 32
    r = CliRunner().invoke(app, ["reproduce", "paper", "--size", "huge"])
    assert r.exit_code != 0


def test_batch_steps_and_throughput_with_unequal_lengths():
    # one tile: the longest completion; more devices than a tile: the tiles still busy at each step
    assert reproduce.batch_steps([5, 80, 30]) == 80
    assert reproduce.batch_steps([10] * 17) == 20 and reproduce.batch_steps([10] * 16 + [30]) == 10 * 2 + 20
    assert reproduce.batch_steps([]) == 0
    # a device that never stops keeps its tile for the whole budget: expected over P(none of 16) = (15/16)^16
    none = (15 / 16) ** 16
    assert reproduce.point_steps([40] * 16, 256, 0) == pytest.approx(none * 40 + (1 - none) * 256)
    assert reproduce.point_steps([40] * 16, 256, 1) == 256 and reproduce.point_steps([], 256, 0) == 0
    # devices that generate different numbers of tokens: total tokens / sum of spans, not the harmonic mean
    tok = pd.DataFrame({"device": [0] * 4 + [1], "t_draft_start": [0.0, 1.0, 2.0, 3.0, 0.0],
                        "t_commit": [1.0, 2.0, 3.0, 4.0, 10.0]})
    summary = {"throughput_tokens_per_s": {"devices": {"0": 1.0, "1": 0.1}}}
    assert paper_throughput(summary, tok) == pytest.approx(5 / 14)  # 5 tokens over 4 + 10 s: 1 / mean delay
    assert paper_throughput(summary) == pytest.approx(2 / (1 + 10))  # the summary alone: the harmonic mean
    tok["fidelity_tv"] = [0.1, 0.2, 0.3, 0.4, 0.05]
    assert reproduce.tv_accuracy_bound(tok) == pytest.approx((1.0 + 0.05) / 2)  # min(1, 1.0) and 0.05


def test_samples_per_problem_devices():
    size = dataclasses.replace(SIZES["smoke"], samples=3)
    s = reproduce.paper_setting(size)
    assert s.n_devices == 4 * 3  # device i decodes problem i mod 4 with its own keyed randomness
    with pytest.raises(ValueError, match="samples per problem must be >= 1"):
        reproduce.paper_setting(dataclasses.replace(SIZES["smoke"], samples=0))
