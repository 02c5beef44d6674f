"""The dashboards, proven against a real Prometheus.

A live stream of stat batches feeds a real `Collector` whose exporter a real Prometheus
(started through `testbed dashboards up`) scrapes every second; then every target query of
every dashboard is evaluated through Prometheus's HTTP API at a moment inside the stream and
must return data (at least one finite value). Variable queries (label_values) must return
values too, and `promtool check metrics` must accept the scraped exposition.

The stream comes from the `stat_source` fixture: a `LiveSource` whose `feed(collector)` blocks
while it streams batches into the collector in wall-clock time: a real short wall-clock run
of the smoke scenario (Ray actors, the ZeroMQ verifier, tiny models).

Needs the `prometheus` and `promtool` binaries (Debian package `prometheus`): skipped when
missing, a failure when HLM_REQUIRE_PROMETHEUS=1 (CI). Run under ../shared/bin/offline.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.dashboards import DASHBOARDS
from testbed.metrics import Collector, free_port

REQUIRE = os.environ.get("HLM_REQUIRE_PROMETHEUS") == "1"
STREAM_S = 8.0  # wall seconds of live stream
WINDOW = "5s"  # replaces $__rate_interval (scrape interval 1s)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        msg = f"`{binary}` not installed (apt-get install prometheus)"
        if REQUIRE:
            pytest.fail(msg + " and HLM_REQUIRE_PROMETHEUS=1")
        pytest.skip(msg)
    return path


# ---------------------------------------------------------------------------------------------
# Stat sources
# ---------------------------------------------------------------------------------------------
@dataclass
class LiveSource:
    """Something that streams stat batches live into a collector (blocking until done)."""

    scenario: str
    tiers: dict[str, str]
    vocab_size: int
    feed: Callable[[Collector], None]


@pytest.fixture(scope="module")
def stat_source(ray_session, tmp_path_factory) -> LiveSource:
    """A real short wall-clock run of the smoke scenario (Ray actors, ZeroMQ verifier, tiny
    models) streaming into the collector; time_scale 0.4 stretches it over several scrapes."""
    from testbed.run import RunOptions, plan, run_scenario
    from testbed.scenario import load_scenario, override

    s = override(load_scenario("smoke"), {"clock": "wall", "time_scale": 0.4, "generation.max_new_tokens": 16})
    p = plan(s)
    out = tmp_path_factory.mktemp("wall-run")

    def feed(collector: Collector) -> None:
        run_scenario(s, RunOptions(out_dir=out, engine="ray", progress=False, report=False, collector=collector))

    return LiveSource(s.name, {d.tier: d.policy_name for d in p.specs}, p.run.vocab_size, feed)


# ---------------------------------------------------------------------------------------------
# Prometheus around a live source
# ---------------------------------------------------------------------------------------------
@dataclass
class LiveProm:
    base: str
    collector: Collector
    eval_time: float  # unix time inside the live stream

    def get(self, path: str, **params) -> dict:
        import json

        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        with _OPENER.open(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.get("/api/v1/query", query=expr, time=f"{self.eval_time:.3f}")
        assert data["resultType"] == "vector", data
        return data["result"]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _OPENER.open(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def live_prometheus(stat_source: LiveSource, tmp_path_factory) -> LiveProm:
    _need("prometheus")
    tmp = tmp_path_factory.mktemp("prom")
    collector = Collector(
        stat_source.scenario, tiers=stat_source.tiers, vocab_size=stat_source.vocab_size, window_s=3.0
    )
    mport = collector.serve(-1)
    pport = free_port()
    testbed = Path(sys.executable).with_name("testbed")
    cmd = [
        str(testbed),
        "dashboards",
        "up",
        "--target",
        f"127.0.0.1:{mport}",
        "--port",
        str(pport),
        "--scrape-interval",
        "1s",
        "--data-dir",
        str(tmp),
    ]
    up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = up.stdout.readline()
        assert line.startswith("Prometheus ready"), line + up.stdout.read() if up.poll() is not None else line
        base = f"http://127.0.0.1:{pport}"
        prom = LiveProm(base, collector, eval_time=0.0)
        # Prometheus throttles target discovery (first scrape ~5 s after start): stream once it scrapes
        deadline = time.monotonic() + 30
        while not any(t["health"] == "up" for t in prom.get("/api/v1/targets")["activeTargets"]):
            assert time.monotonic() < deadline, "Prometheus never scraped the exporter"
            time.sleep(0.2)
        feeder = threading.Thread(target=stat_source.feed, args=(collector,), daemon=True)
        feeder.start()
        feeder.join(timeout=120)
        assert not feeder.is_alive(), "stat source did not finish"
        end = time.time()
        collector.linger(2.5)  # final values scraped (scrape interval 1s)
        prom.eval_time = end - 0.5
        yield prom
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
        collector.close()


def _substitute(expr: str) -> str:
    expr = expr.replace("$__rate_interval", WINDOW).replace("$__interval", "1s").replace("$__range", WINDOW)
    return re.sub(r"\$\{?(scenario|tier|policy)\}?", ".*", expr)


ALL_TARGETS = [
    pytest.param(t.expr, id=f"{db.uid}:{p.title}:{i}")
    for db in DASHBOARDS
    for p in db.panels()
    for i, t in enumerate(p.targets)
]


@pytest.mark.parametrize("expr", ALL_TARGETS)
def test_every_panel_target_returns_data(live_prometheus: LiveProm, expr: str) -> None:
    result = live_prometheus.query(_substitute(expr))
    assert result, f"no data for {expr}"
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), f"no finite value for {expr}: {values}"


def test_variables_have_values(live_prometheus: LiveProm, stat_source: LiveSource) -> None:
    for db in DASHBOARDS:
        for v in db.variables:
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", v.query)
            assert m, v.query
            values = live_prometheus.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": _substitute(m.group(1))})
            assert values, v.query
            if v.name == "tier":
                assert set(values) == set(stat_source.tiers)
            if v.name == "policy":
                assert set(values) == set(stat_source.tiers.values())


def test_scraped_values_match_the_collector(live_prometheus: LiveProm, stat_source: LiveSource) -> None:
    # The last scrape happened after the stream ended: Prometheus holds the final totals.
    data = live_prometheus.get("/api/v1/query", query="sum(hlm_tokens_committed_total)")
    snap = live_prometheus.collector.snapshot()
    assert snap.totals.committed > 100
    assert float(data["result"][0]["value"][1]) == snap.totals.committed
    up = live_prometheus.get("/api/v1/query", query="up")
    assert [r["value"][1] for r in up["result"]] == ["1"]


def test_promtool_accepts_the_scraped_exposition(live_prometheus: LiveProm) -> None:
    promtool = _need("promtool")
    with _OPENER.open(live_prometheus.collector.url, timeout=10) as r:
        text = r.read()
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (out.stdout, out.stderr)


def test_whole_run_promql_agrees_with_the_collector(live_prometheus: LiveProm) -> None:
    """The derived PromQL (whole run, from the final scrape) equals the collector's own figures."""
    from testbed.metrics import DERIVED, Sel

    snap = live_prometheus.collector.snapshot()
    t = snap.totals
    vocab = live_prometheus.collector.vocab_size
    expected = {
        "throughput": snap.throughput,
        "skip_rate": snap.skip_rate,
        "acceptance_rate": snap.acceptance_rate,
        "vocab_compression": 1 - t.vocab_entries / (vocab * t.uploads),
        "mean_k": t.vocab_entries / t.uploads,
        "uplink_bytes_per_token": t.uplink_bytes / t.committed,
        "verifier_batch_size_mean": snap.verifier_batch_size_mean,
    }
    for name, want in expected.items():
        expr = DERIVED[name].expr(Sel(window=None, scenario=".*", tier=".*", policy=".*"))
        data = live_prometheus.get("/api/v1/query", query=expr)
        assert len(data["result"]) == 1, (name, data)
        got = float(data["result"][0]["value"][1])
        assert got == pytest.approx(want, rel=1e-9), (name, expr)
