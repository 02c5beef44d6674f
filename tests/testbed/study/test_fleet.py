"""testbed reproduce fleet (testbed/study/fleet.py) on tiny models, local engine."""

from __future__ import annotations

import json

from testbed.study import fleet
from testbed.study.sizes import FLEET_POLICIES, SIZES

FLEET_FIGURES = ["fleet_throughput", "fleet_fairness", "fleet_batch"]


def test_fleet_smoke_end_to_end(tmp_path, figures_ok):
    lines: list[str] = []
    result = fleet.run_fleet("smoke", tmp_path / "fleet", log=lines.append)
    page = figures_ok(result.report, FLEET_FIGURES)
    sizes = SIZES["smoke"].fleet_sizes
    assert {(r["policy"], r["fleet_size"]) for r in result.rows} == {(p, n) for p in FLEET_POLICIES for n in sizes}
    for r in result.rows:
        s = json.loads((tmp_path / "fleet/points" / r["point"] / "summary.json").read_text())
        assert s["devices"] == r["fleet_size"] and len(s["tiers"]) == min(3, r["fleet_size"])
        assert r["system_throughput_tokens_per_s"] == s["throughput_tokens_per_s"]["system"]
        assert r["jain_fairness"] == s["jain_fairness"]
        assert r["verifier_batch_size_mean"] == s["verifier_batch_size_mean"]
        assert f"<td>{r['label']}</td><td>{r['fleet_size']}</td>" in page
    assert len(lines) == len(result.rows) + 2
