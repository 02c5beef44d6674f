"""testbed.report.html: the page embeds every plot and stands alone; several runs side by side;
the `testbed report` command (testbed/commands/report.py)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from typer.testing import CliRunner

from testbed.cli import app
from testbed.report import PLOTS, format_value, write_report


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def assert_embeds_every_plot(html_path: Path, expected: set[str]) -> None:
    assert html_path.is_file()
    out = html_path.parent
    pngs = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert set(pngs) == expected
    html = html_path.read_text()
    embedded = embedded_pngs(html)
    assert sorted(embedded) == sorted(pngs.values())  # every plot exactly once, byte for byte
    for data in embedded:
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert "<script" not in html and "http://" not in html and "https://" not in html  # self-contained


def test_single_run_report_embeds_every_plot(tmp_path: Path, make_run) -> None:
    run = make_run(tmp_path / "run")
    html = write_report([run], tmp_path / "out")
    assert html == tmp_path / "out" / "report.html"
    assert_embeds_every_plot(html, {f"{key}.png" for key, _, _ in PLOTS})
    text = html.read_text()
    for needle in ("Jain fairness", "skip rate", "acceptance rate", "scenario.yaml", "cu-hlm", "u-hlm"):
        assert needle in text


def test_several_runs_compare_policies_side_by_side(tmp_path: Path, make_run) -> None:
    runs = [
        make_run(tmp_path / p, policies={"phone": p, "laptop": p}, seed=i, name="paper")
        for i, p in enumerate(["hlm", "u-hlm", "cu-hlm"])
    ]
    html = write_report(runs, tmp_path / "out")
    expected = {"policies.png"} | {f"{p}_{key}.png" for p in ("hlm", "u-hlm", "cu-hlm") for key, _, _ in PLOTS}
    assert_embeds_every_plot(html, expected)
    assert "Policies side by side" in html.read_text()


def test_cli_report_and_sweep_folders(tmp_path: Path, make_run) -> None:
    sweep = tmp_path / "sweep"
    for i, p in enumerate(["u-hlm", "cu-hlm"]):
        make_run(sweep / p, policies={"phone": p, "laptop": p}, seed=i)
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(sweep), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.html").is_file() and (tmp_path / "rep" / "policies.png").is_file()
    res = runner.invoke(app, ["report", str(sweep / "u-hlm")])  # one run: RUN_DIR/report by default
    assert res.exit_code == 0, res.output
    assert (sweep / "u-hlm" / "report" / "report.html").is_file()
    res = runner.invoke(app, ["report", str(tmp_path / "nothing-here")])
    assert res.exit_code == 2 and "not a run directory" in res.output


def test_format_value_kinds() -> None:
    assert format_value(None) == "-" and format_value(float("nan"), missing="n/a") == "n/a"
    assert format_value(0.1234, "pct") == "12.3%" and format_value(0.0456, "ms") == "45.6 ms"
    assert format_value(12345, "int") == "12,345" and format_value(1.5, "x") == "1.50x"
    assert format_value(1 / 3, "3") == "0.333" and format_value(1 / 3) == "0.33"
    assert format_value(1234.5, "e") == "1.23e+03"
