"""`testbed policies [--json]` lists every preset with its parameters."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from policies import PRESETS, load_policy
from testbed.cli import app


def test_policies_json_lists_every_preset_with_loadable_params():
    res = CliRunner().invoke(app, ["policies", "--json"])
    assert res.exit_code == 0, res.output
    presets = json.loads(res.output)["presets"]
    assert set(PRESETS) <= set(presets)
    assert presets["cu-hlm"]["params"]["theta"] == 0.1 and presets["cu-hlm"]["params"]["prob_bits"] == 8
    assert presets["rand-hlm"]["params"]["skip_rate"] == 0.5
    for name in PRESETS:
        entry = presets[name]
        assert entry["description"]
        # the listed parameters are exactly ones the preset accepts, at their defaults
        assert load_policy({"name": name, **entry["params"]}).params() == load_policy(name).params()


def test_policies_table():
    res = CliRunner().invoke(app, ["policies"])
    assert res.exit_code == 0, res.output
    for name in PRESETS:
        assert name in res.output
