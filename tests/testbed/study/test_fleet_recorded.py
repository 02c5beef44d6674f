"""testbed reproduce fleet --content recorded (testbed/study/fleet_recorded.py): a tiny grid over a library
recorded once per module with tiny models (smoke, 8 tokens), replayed without models, local engine."""

from __future__ import annotations

import csv
import json

import pytest

from testbed.content import Library
from testbed.run import RunOptions, run_scenario
from testbed.scenario import load_scenario, override
from testbed.study.fleet_recorded import (
    COLUMNS,
    FleetRecordedError,
    Grid,
    GridPoint,
    base_fleet,
    grid_points,
    point_scenario,
    run_fleet_recorded,
    tier_counts,
)

POLICIES = ("u-hlm", "cu-hlm")  # smoke's two tiers


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A content library of smoke's run at 8 tokens: u-hlm and cu-hlm sequences."""
    root = tmp_path_factory.mktemp("fleet-recorded-lib")
    s = override(load_scenario("smoke"), {"generation.max_new_tokens": 8})
    run_scenario(
        s, RunOptions(out_dir=root / "run", engine="local", progress=False, report=False, save_content=root / "lib")
    )
    return root / "lib"


def tiny_grid(library) -> Grid:
    # the same library as both sources: the two lines of each policy must then coincide
    return Grid(
        library=str(library),
        tiny_library=str(library),
        policies=POLICIES,
        sizes=(40, 80),
        verifier_sweep_size=80,
        verifiers=(1, 2),
    )


@pytest.fixture(scope="module")
def study(library, tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet-recorded") / "study"
    lines: list[str] = []
    result = run_fleet_recorded(tiny_grid(library), out, log=lines.append)
    return result, lines


def test_grid_points_dedupe_the_sweep_point_at_the_sized_verifier_count():
    g = Grid(policies=("hlm",), sizes=(1000, 10000), verifiers=(1, 10, 20))
    names = [p.name for p in grid_points(g)]
    assert len(names) == len(set(names))
    assert names[:4] == [
        "recorded-hlm-n1000-v1",
        "recorded-hlm-n10000-v10",
        "recorded-hlm-n10000-v1",
        "recorded-hlm-n10000-v20",
    ]
    assert len(names) == 2 * 4  # two sources


def test_tier_counts_keep_fleet_100k_shares():
    fleet = base_fleet()
    shares = [t["count"] for t in fleet.tiers]
    assert shares == [60000, 30000, 10000] and fleet.server["max_batch"] == 128 and "count" not in fleet.server
    assert tier_counts(100000, shares) == shares
    assert tier_counts(41, shares) == [25, 12, 4]
    assert sum(tier_counts(12345, shares)) == 12345


def test_point_scenario_takes_the_policy_as_the_library_recorded_it(library):
    lib = Library.open(library)
    spec = next(e["spec"] for e in lib.policies().values() if e["label"] == "cu-hlm")
    s = point_scenario(GridPoint("recorded", "cu-hlm", 80, 2), base_fleet(), str(library), spec, 7)
    assert s.n_devices == 80 and s.replays_library
    assert [t.count for t in s.tiers] == [48, 24, 8]
    assert {json.dumps(t.policy, sort_keys=True, default=str) for t in s.tiers} == {
        json.dumps(spec, sort_keys=True, default=str)
    }
    assert s.servers[0].count == 2 and s.servers[0].max_batch == 128


def test_rows_figures_and_files(study, library, figures_ok):
    result, lines = study
    rows = result.rows
    assert len(rows) == 2 * len(POLICIES) * 3  # per source and policy: n40 v1, n80 v1, n80 v2
    assert all(list(r) == COLUMNS for r in rows)
    for r in rows:
        s = json.loads((result.out / "points" / r["point"] / "summary.json").read_text())
        assert s["devices"] == r["fleet_size"] and s["complete"]
        assert r["throughput_tokens_per_s"] == s["throughput_tokens_per_s"]["system"] > 0
        assert r["uplink_mbps"] == pytest.approx(s["uplink_bytes"] * 8 / s["emulated_seconds"] / 1e6)
        assert 0 < r["jain_fairness"] <= 1 and r["verifier_batch_size_mean"] >= 1
    with (result.out / "rows.csv").open() as f:
        assert [row["point"] for row in csv.DictReader(f)] == [r["point"] for r in rows]
    table = (result.out / "table.md").read_text()
    assert table.count("\n") == len(rows) + 2
    page = figures_ok(result.report, ["fleet_size", "verifiers"])
    assert all(r["point"] in page for r in rows)
    assert len(lines) == len(rows) + 2  # the header, a line per point, the files


def test_same_library_gives_the_same_figures_for_both_sources(study):
    by = {r["point"]: r for r in study[0].rows}
    for name, r in by.items():
        if r["content"] == "recorded":
            twin = by[name.replace("recorded-", "tiny-", 1)]
            assert {k: v for k, v in r.items() if k not in ("point", "content", "wall_s")} == {
                k: v for k, v in twin.items() if k not in ("point", "content", "wall_s")
            }


def test_more_verifiers_do_not_lower_throughput_and_split_the_batches(study):
    by = {(r["content"], r["policy"], r["fleet_size"], r["verifiers"]): r for r in study[0].rows}
    for content in ("recorded", "tiny"):
        for policy in POLICIES:
            one, two = by[(content, policy, 80, 1)], by[(content, policy, 80, 2)]
            assert two["throughput_tokens_per_s"] >= one["throughput_tokens_per_s"]
            assert two["verifier_batch_size_mean"] < one["verifier_batch_size_mean"]
            # ... and twice the devices on one verifier: more throughput, wider batches
            small = by[(content, policy, 40, 1)]
            assert one["throughput_tokens_per_s"] > small["throughput_tokens_per_s"]
            assert one["verifier_batch_size_mean"] > small["verifier_batch_size_mean"]


def test_a_second_call_reruns_nothing(study, library):
    result, _ = study
    mtimes = {p: p.stat().st_mtime_ns for p in result.out.glob("points/*/summary.json")}
    again = run_fleet_recorded(tiny_grid(library), result.out, log=lambda line: None)
    assert set(again.statuses.values()) == {"cached"}
    assert {p: p.stat().st_mtime_ns for p in result.out.glob("points/*/summary.json")} == mtimes
    assert again.rows == result.rows


def test_cli_resumes_the_study(study, library):
    from typer.testing import CliRunner

    from testbed.cli import app

    result, _ = study
    args = ["reproduce", "fleet", "--content", "recorded", "--library", str(library), "--tiny-library", str(library)]
    args += ["--policies", ",".join(POLICIES), "--sizes", "40,80", "--verifiers", "1,2", "--out", str(result.out)]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert "cached" in r.output and " ran " not in r.output


def test_missing_library_and_policy_say_how_to_fix_them(library, tmp_path):
    with pytest.raises(FleetRecordedError, match="testbed content ls.*testbed content record"):
        run_fleet_recorded(Grid(library=str(tmp_path / "nowhere"), tiny_library=str(library)), tmp_path / "out")
    with pytest.raises(FleetRecordedError, match=r"no policy hlm; it holds: cu-hlm, u-hlm"):
        run_fleet_recorded(Grid(library=str(library), tiny_library=str(library), policies=("hlm",)), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before any run


def test_cli_refuses_the_models_options_and_a_missing_library(tmp_path):
    from typer.testing import CliRunner

    from testbed.cli import app

    base = ["reproduce", "fleet", "--content", "recorded", "--out", str(tmp_path / "out")]
    r = CliRunner().invoke(app, [*base, "--a", "0.4", "--b", "0.1"])
    assert r.exit_code == 2 and "--content models only" in r.output
    r = CliRunner().invoke(app, [*base, "--library", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "testbed content record" in r.output
    assert not (tmp_path / "out").exists()
