"""`testbed links`, `testbed links plot` and `testbed bench links`."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from netem import LinkProfile
from testbed.benchmarks import links as bench
from testbed.commands.links import app

runner = CliRunner()


def test_links_json_lists_every_profile_in_scenario_units():
    result = runner.invoke(app, ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"5g-good", "lte-edge", "wifi-strong", "wifi-weak", "paper-uplink"} <= set(data)
    assert data["5g-good"]["uplink"]["rate_mbps"] == 30.0
    assert "summary" in data["lte-edge"]


def test_links_table():
    result = runner.invoke(app, [])
    assert result.exit_code == 0, result.output
    assert "wifi-weak" in result.output and "paper-uplink" in result.output


def test_links_plot_writes_a_png(tmp_path):
    out = tmp_path / "cell.png"
    result = runner.invoke(app, ["plot", "cell-rayleigh", "--seconds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = runner.invoke(app, ["plot", "nope", "--seconds", "2", "--out", str(out)])
    assert bad.exit_code == 2 and "known:" in bad.output


def test_bench_measures_model_and_transport_in_one_run():
    result = bench.run(model_sends=2000, transport_messages=200, rounds=1)
    model, transport = result["model"], result["transport"]
    assert model["min_sends_per_s"] > 0 and set(model["sends_per_s"]) >= {"5g-good", "lte-edge"}
    for key in ("stream_us_per_msg", "rtt_us"):
        assert all(v > 0 for v in transport[key].values())
    assert set(transport["rtt_overhead_us"]) == {"caller", "thread"}


def test_model_speed_helper():
    assert bench.model_sends_per_s(LinkProfile(rate_bps=1e6), n=1000) > 0
