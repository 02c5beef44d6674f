"""Dashboards as code: the committed grafana/ tree equals what testbed.dashboards renders, every
query is well formed and uses only defined metrics, and the CLI exports / reports clearly."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed import dashboards as D
from testbed.cli import app
from testbed.metrics import DERIVED, METRICS, Sel

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
REQUIRE = os.environ.get("HLM_REQUIRE_PROMETHEUS") == "1"
SERIES_NAMES = {m.name for m in METRICS} | {
    f"{m.name}{suffix}" for m in METRICS if m.kind == "histogram" for suffix in ("_bucket", "_sum", "_count")
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if REQUIRE:
            pytest.fail("promtool missing and HLM_REQUIRE_PROMETHEUS=1")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def test_committed_tree_equals_rendered() -> None:
    rendered = D.provisioning_files()
    committed = {str(p.relative_to(GRAFANA)): p.read_text() for p in GRAFANA.rglob("*") if p.is_file()}
    assert set(committed) == set(rendered), "run `testbed dashboards export grafana`"
    for rel, text in rendered.items():
        assert committed[rel] == text, f"grafana/{rel} is stale: run `testbed dashboards export grafana`"


def test_export_command_writes_the_tree(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["dashboards", "export", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    for rel, text in D.provisioning_files().items():
        assert (tmp_path / "out" / rel).read_text() == text


def test_dashboards_render_valid_grafana_json() -> None:
    uids = set()
    for db in D.DASHBOARDS:
        doc = json.loads(db.to_json())
        assert doc["uid"] not in uids and len(doc["uid"]) <= 40
        uids.add(doc["uid"])
        names = [v["name"] for v in doc["templating"]["list"]]
        assert names == ["datasource", "scenario", "tier", "policy"]
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for p in doc["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not (mine & cells), f"overlapping panel {p['title']}"
            cells |= mine
            if p["type"] == "row":
                continue
            assert p["targets"], p["title"]
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert [t["refId"] for t in p["targets"]] == [chr(65 + i) for i in range(len(p["targets"]))]
            if p["type"] == "heatmap":
                assert all(t["format"] == "heatmap" for t in p["targets"])


def _exprs():
    for db in D.DASHBOARDS:
        for p, t in db.targets():
            yield f"{db.uid}: {p.title}", t.expr
        for v in db.variables:
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", v.query)
            assert m, v.query
            yield f"{db.uid}: variable {v.name}", m.group(1)
    for d in DERIVED.values():
        yield f"derived {d.name}", d.expr(Sel(by=("tier", "policy")))
        yield f"derived {d.name} (run)", d.expr(Sel(window=None, by=("policy",)))


def test_queries_use_only_defined_metrics_and_filter_by_variables() -> None:
    for where, expr in _exprs():
        used = set(re.findall(r"\bhlm_[a-z0-9_]+", expr))
        assert used, where
        assert used <= SERIES_NAMES, (where, used - SERIES_NAMES)
        for sel in re.findall(r"\bhlm_[a-z0-9_]+\{([^}]*)\}", expr):
            assert 'scenario=~"$scenario"' in sel, (where, expr)
        assert not re.search(r"\bdevice\b", expr), (where, expr)  # never a label
    # the overview covers what issue 5 asks for
    titles = " / ".join(p.title.lower() for p in D.OVERVIEW.panels())
    for needle in (
        "throughput",
        "skip rate",
        "acceptance",
        "compression",
        "uplink bytes",
        "latency",
        "fairness",
        "batch",
        "queue",
        "uncertainty",
        "entries per upload k",
    ):
        assert needle in titles, needle


def test_every_query_parses(tmp_path: Path) -> None:
    """promtool checks the PromQL of every target, variable and derived figure (as recording rules)."""
    promtool = _promtool()
    lines = ["groups:", "  - name: hlm", "    rules:"]
    for i, (_where, expr) in enumerate(_exprs()):
        concrete = re.sub(r"\$\{?(scenario|tier|policy)\}?", ".*", expr.replace("$__rate_interval", "1m"))
        lines += [f"      - record: hlm:check_{i}", f"        expr: {json.dumps(concrete)}"]
    rules = tmp_path / "rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_configs_are_valid(tmp_path: Path) -> None:
    promtool = _promtool()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(D.prometheus_config(["127.0.0.1:1234", "127.0.0.1:5678"], "1s"))
    for path in (cfg, GRAFANA / "prometheus.yml"):
        out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    assert "remote_write" not in cfg.read_text() and "alerting" not in cfg.read_text()


def test_up_without_prometheus_says_how_to_get_it() -> None:
    res = CliRunner().invoke(app, ["dashboards", "up", "--prometheus", "no-such-prometheus-binary"])
    assert res.exit_code == 1
    assert "apt-get install prometheus" in res.output and "docker compose" in res.output
