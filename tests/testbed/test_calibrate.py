"""`testbed calibrate` end to end on the tiny pair: every estimator fitted from the same
tokens, the fit equal to least squares on the written samples."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from testbed.cli import app


def test_calibrate_tiny_pair(tmp_path):
    out = tmp_path / "cal"
    res = CliRunner().invoke(
        app, ["calibrate", "--pair", "tiny", "--n-prompts", "3", "--max-new-tokens", "12", "--out", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{") :])
    samples = pd.read_csv(out / "samples.csv")
    assert len(samples) == 3 * 12 and (out / "beta_vs_u.png").stat().st_size > 10_000
    assert samples["beta"].between(0, 1).all()
    for name in ("temperature", "entropy", "max", "margin"):
        fit = doc["estimators"][name]
        a, b = np.polyfit(samples[f"u_{name}"], samples["beta"], 1)
        assert fit["n_tokens"] == 36
        assert np.isclose(fit["a"], a) and np.isclose(fit["b"], b)
        assert np.isclose(fit["pearson_r"], np.corrcoef(samples[f"u_{name}"], samples["beta"])[0, 1])
        if fit["a"] > 0:
            assert np.isclose(fit["u_th_risk_averse"], -fit["b"] / fit["a"])
        if fit["a"] is not None:  # the bootstrap over prompts (testbed.study.bootstrap), seeded
            from testbed.study.bootstrap import bootstrap_fit

            ci = bootstrap_fit(samples[f"u_{name}"], samples["beta"], samples["device"])
            assert fit["ci"]["groups"] == 3 and fit["ci"]["a"] == list(ci.a) and fit["ci"]["b"] == list(ci.b)
    # u of the temperature estimator is a fraction of K = 20 samples.
    assert np.allclose(samples["u_temperature"] * 20, np.round(samples["u_temperature"] * 20))
