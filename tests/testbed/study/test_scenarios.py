"""testbed.study.scenarios: isolated devices, fleet tier counts, samples per problem."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from testbed.study import scenarios
from testbed.study.fit import Fit
from testbed.study.scenarios import fleet_counts, paper_base, with_policy
from testbed.study.sizes import SIZES


def test_paper_devices_do_not_distort_each_other(tmp_path):
    """The isolated setting: a device's trace is the one it has alone, and the summary's per-device
    throughput is 1 / mean per-token delay = SLM + uplink + LLM + downlink per transmitted token."""
    from testbed.run import RunOptions, run_scenario

    fit = Fit(0.815, -0.066, "paper", 16)
    spec = scenarios.policy_spec("cu-hlm", fit, threshold="fixed", u_th=0.5)
    runs = {}
    for n in (1, 4):
        base = paper_base(dataclasses.replace(SIZES["smoke"], count=n, max_new_tokens=6))
        assert base.server.verify_ms.base == 0 and base.server.max_batch == n
        runs[n] = run_scenario(
            with_policy(base, spec, f"iso{n}"),
            RunOptions(out_dir=tmp_path / str(n), engine="local", progress=False, report=False, accuracy=False),
        )
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
    llm = scenarios.llm_ms(scenarios.paper_setting(SIZES["smoke"])) / 1000
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


def test_samples_per_problem_devices():
    size = dataclasses.replace(SIZES["smoke"], samples=3)
    s = scenarios.paper_setting(size)
    assert s.n_devices == 4 * 3  # device i decodes problem i mod 4 with its own keyed randomness
    with pytest.raises(ValueError, match="samples per problem must be >= 1"):
        scenarios.paper_setting(dataclasses.replace(SIZES["smoke"], samples=0))
