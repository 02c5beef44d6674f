"""Chaos: actors killed with SIGKILL mid-run are restarted by deterministic replay, and the
virtual clock's trace (tokens.parquet, every column) is the fault-free run's (DESIGN.md section 8).

The kills are real (`kill -9` of the actor's worker process, RunOptions.chaos_kill) and fire once
the driver has drained a given number of committed tokens. Tiny random models; seconds each.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from testbed.runner import RunFailed, RunOptions, run_scenario
from testbed.scenario import load_scenario, override

TOKENS = 24  # per device; 8 devices in 2 groups of 4 (smoke): 192 tokens


def scenario(**changes):
    return override(load_scenario("smoke"), {"generation.max_new_tokens": TOKENS, **changes})


def run(tmp_path: Path, name: str, s=None, **opts) -> tuple[pd.DataFrame, dict]:
    out = tmp_path / name
    summary = run_scenario(s or scenario(), RunOptions(out_dir=out, progress=False, report=False, accuracy=False, **opts))
    return pd.read_parquet(out / "tokens.parquet"), summary


@pytest.fixture(scope="module")
def fault_free(ray_session, tmp_path_factory):
    return run(tmp_path_factory.mktemp("fault-free"), "ref")


def assert_identical(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_fault_free_run_has_no_restarts(fault_free):
    df, summary = fault_free
    assert len(df) == 8 * TOKENS and summary["complete"]
    assert summary["restarts"]["total"] == 0


def test_killed_group_is_replayed_to_the_same_trace(fault_free, tmp_path):
    df, summary = run(tmp_path, "group", chaos_kill=(("group:1", 40),))  # of its 96
    assert summary["restarts"]["groups"] == {"1": 1} and summary["restarts"]["total"] == 1
    assert summary["restarts"]["events"][0]["devices"] == [4, 5, 6, 7]
    assert_identical(df, fault_free[0])


def test_killed_verifier_is_rebuilt_to_the_same_trace(fault_free, tmp_path):
    df, summary = run(tmp_path, "verifier", chaos_kill=(("verifier", 60),))
    assert summary["restarts"]["verifier"] == 1 and summary["restarts"]["total"] == 1
    assert_identical(df, fault_free[0])


def test_every_actor_restarted_once_in_one_run(fault_free, tmp_path):
    # Group thresholds count the group's own tokens (96 each), the verifier's the run's (192). Both
    # groups die early (a restart blocks the driver for seconds: a group still far from its end
    # when the other restarts is still running after it), the verifier later, with both running.
    kills = (("group:0", 24), ("group:1", 24), ("verifier", 140))
    df, summary = run(tmp_path, "all", chaos_kill=kills)
    r = summary["restarts"]
    assert (r["verifier"], r["groups"], r["total"]) == (1, {"0": 1, "1": 1}, 3)
    assert_identical(df, fault_free[0])


def test_past_max_restarts_the_run_fails_with_one_paragraph(ray_session, tmp_path):
    s = scenario(**{"actors.max_restarts": 1})
    out = tmp_path / "bounded"
    with pytest.raises(RunFailed) as err:
        run_scenario(s, RunOptions(out_dir=out, progress=False, report=False, accuracy=False,
                                   chaos_kill=(("group:0", 20), ("group:1", 40))))
    text = str(err.value)
    assert "\n" not in text and "device group 1" in text and "devices 4-7" in text
    assert "actors.max_restarts" in text and "died: ActorDiedError" in text
    assert str(out) in text
    partial = pd.read_parquet(out / "tokens.parquet")  # the partial results are kept
    assert 0 < len(partial) < 8 * TOKENS
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
