"""testbed.report.plots: every plot draws a PNG, for a large fleet (scatter in place of bars, a
sample of devices in the raster) and for runs without uploads or a fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.report import PLOTS, load_run, write_report
from testbed.report.data import label_runs, run_figures
from testbed.report.plots import plot_policies


def test_large_fleet_and_odd_policies(tmp_path: Path, make_run) -> None:
    run = make_run(
        tmp_path / "fleet",
        policies={"phone": "cu-hlm", "laptop": "slm-only"},
        devices={"phone": 150, "laptop": 50},
        tokens_per_device=16,
    )
    html = write_report([run], tmp_path / "out")
    assert {p.name for p in html.parent.glob("*.png")} == {f"{key}.png" for key, _, _ in PLOTS}


@pytest.mark.parametrize("key,title,draw", PLOTS, ids=[key for key, _, _ in PLOTS])
def test_each_plot_without_uploads(tmp_path: Path, make_run, key, title, draw) -> None:
    # slm-only: no upload (no k, no payload, no acceptance), shadow betas only
    run = load_run(
        make_run(
            tmp_path / "run",
            policies={"phone": "slm-only", "laptop": "slm-only"},
            devices={"phone": 2, "laptop": 1},
            tokens_per_device=8,
        )
    )
    png = draw(run, tmp_path / f"{key}.png")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_policies_side_by_side_with_undefined_figures(tmp_path: Path, make_run) -> None:
    runs = [
        load_run(make_run(tmp_path / p, policies={"phone": p, "laptop": p}, tokens_per_device=8))
        for p in ("slm-only", "hlm")
    ]
    label_runs(runs)
    figs = [run_figures(r) for r in runs]
    assert figs[0]["acceptance_rate"] is None  # no uploads: undefined, drawn as no bar
    assert plot_policies(runs, figs, tmp_path / "policies.png").is_file()
