"""load_policy: every kind of bad spec fails at load with the spec and the reason; plugins
load by dotted path, registry name and entry point."""

from __future__ import annotations

import importlib.metadata
import pickle
import sys
import textwrap

import pytest

import policies.registry as registry
from policies import Policy, PolicyError, load_policy, policy_catalog, register_policy, unregister_policy

PLUGIN = '''
import numpy as np
from policies.base import Decision, Policy


class AlwaysSend(Policy):
    """Sends the top-k of every token."""

    name = "always-send"

    def __init__(self, k: int = 5, vocab_size: int | None = None):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k, self.vocab_size = k, vocab_size

    def decide(self, logits, ctx):
        return Decision(transmit=True, uncertainty=float("nan"), k=self.k)


class NotAPolicy:
    pass


def factory(k: int = 2):
    return AlwaysSend(k)


def bad_factory():
    return 42


INSTANCE = AlwaysSend(9)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    name = f"hlm_test_plugin_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    (tmp_path / f"{name}_broken.py").write_text("import numpy\nraise RuntimeError('plugin exploded on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for m in (name, f"{name}_broken"):
        sys.modules.pop(m, None)


def test_dotted_path_plugin_loads_with_params_and_context(plugin):
    p = load_policy(f"{plugin}:AlwaysSend")
    assert isinstance(p, Policy) and p.k == 5
    p = load_policy({"name": f"{plugin}:AlwaysSend", "k": 3}, vocab_size=1000, unrelated="ignored")
    assert p.k == 3 and p.vocab_size == 1000  # context goes only where the signature names it
    assert load_policy(f"{plugin}:factory").k == 2
    assert load_policy(f"{plugin}:INSTANCE").k == 9
    assert load_policy(p) is p


def test_registered_factory(plugin):
    mod = __import__(plugin)
    register_policy("my-policy", mod.AlwaysSend, description="test policy")
    try:
        assert load_policy({"name": "my-policy", "k": 4}).k == 4
        assert policy_catalog()["presets"]["my-policy"] == {
            "description": "test policy",
            "params": {"k": 5, "vocab_size": None},
        }
        with pytest.raises(PolicyError, match="already registered"):
            register_policy("my-policy", mod.factory)
        register_policy("my-policy", mod.factory, replace=True)
        assert load_policy("my-policy").k == 2
    finally:
        unregister_policy("my-policy")
    with pytest.raises(PolicyError, match="built-in preset"):
        register_policy("cu-hlm", mod.factory)


def test_entry_point_plugin(plugin, monkeypatch):
    eps = {
        "ep-good": importlib.metadata.EntryPoint("ep-good", f"{plugin}:AlwaysSend", registry.ENTRY_POINT_GROUP),
        "ep-broken": importlib.metadata.EntryPoint("ep-broken", f"{plugin}_broken:X", registry.ENTRY_POINT_GROUP),
    }
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    assert load_policy({"name": "ep-good", "k": 8}).k == 8
    with pytest.raises(PolicyError) as e:
        load_policy("ep-broken")
    assert "'ep-broken'" in str(e.value) and "plugin exploded on import" in str(e.value)
    assert policy_catalog()["entry_points"] == {"ep-good": f"{plugin}:AlwaysSend", "ep-broken": f"{plugin}_broken:X"}
    assert "ep-good" in str(pytest.raises(PolicyError, load_policy, "nope").value)  # listed as known


def bad_specs(plugin):
    """(spec, words the message must contain besides the spec)."""
    return [
        ("no-such-policy", ["unknown policy", "cu-hlm", "u-hlm", "llm-only"]),
        ({"name": "cu-hlm", "thetaa": 0.1}, ["unknown parameter", "thetaa", "theta"]),
        ({"name": "cu-hlm", "theta": "big"}, ["theta", "number"]),
        ({"name": "cu-hlm", "K": 2.5}, ["K", "integer"]),
        ({"name": "cu-hlm", "K": True}, ["K", "integer"]),
        ({"name": "cu-hlm", "theta": -1}, ["theta", ">= 0"]),
        ({"name": "cu-hlm", "prob_bits": 12}, ["prob_bits"]),
        ({"name": "cu-hlm", "estimator": "vibes"}, ["estimator", "temperature"]),
        ({"name": "u-hlm", "skip_rate": 0.2}, ["skip_rate", "no effect"]),
        ({"name": "hlm", "theta": 0.2}, ["theta", "no effect"]),
        ({"name": "u-hlm", "threshold": "fixed"}, ["u_th"]),
        ({"name": "u-hlm", "a": -0.5}, ["a = -0.5", "<= 0"]),
        ({"name": "u-hlm", "estimator": "none"}, ["estimator"]),
        ({"name": "cu-hlm-offline", "k": 0}, ["k", ">= 1"]),
        ({"name": "cu-hlm-offline", "k": 5, "calibration": "x.npz"}, ["either k or calibration"]),
        ({"name": "cu-hlm-offline", "calibration": "/nonexistent/cal.npz"}, ["cal.npz"]),
        ({"name": "rand-hlm", "skip_rate": 1.5}, ["skip_rate"]),
        ({"name": "llm-only", "k": 3}, ["unknown parameter", "none"]),
        ({"name": "slm-only", "prob_bits": 8}, ["unknown parameter", "prob_bits"]),
        ({"theta": 0.1}, ["'name'"]),
        ({"name": ""}, ["non-empty"]),
        (42, ["int"]),
        ("hlm_no_such_module_xyz:Policy", ["cannot import module", "hlm_no_such_module_xyz"]),
        (f"{plugin}_broken:X", ["cannot import", "plugin exploded on import"]),
        (f"{plugin}:Missing", ["no attribute", "Missing"]),
        (f"{plugin}:NotAPolicy", ["not a policies.base.Policy subclass"]),
        (f"{plugin}:bad_factory", ["returned int"]),
        ({"name": f"{plugin}:AlwaysSend", "q": 1}, ["unknown parameter", "q", "k"]),
        ({"name": f"{plugin}:AlwaysSend", "k": 0}, ["construction failed", "k must be >= 1"]),
        ({"name": f"{plugin}:INSTANCE", "k": 1}, ["takes no parameters"]),
        (f"{plugin}", ["unknown policy"]),
        (":Cls", ["package.module:ClassName"]),
    ]


def test_every_bad_spec_fails_at_load_with_spec_and_reason(plugin):
    for spec, words in bad_specs(plugin):
        with pytest.raises(PolicyError) as e:
            load_policy(spec)
        msg = str(e.value)
        assert repr(spec) in msg, msg
        for w in words:
            assert w in msg, (spec, w, msg)
        assert isinstance(e.value, ValueError)


def test_policy_error_pickles():
    e = PolicyError({"name": "x"}, "because")
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e) and back.spec == {"name": "x"} and back.reason == "because"


def test_dotted_path_written_to_a_fresh_module(tmp_path, monkeypatch):
    (tmp_path / "hlm_fresh_plugin.py").write_text(
        textwrap.dedent("""
        from policies import HybridPolicy, PolicyConfig

        class Aggressive(HybridPolicy):
            def __init__(self, u_th: float = 0.9):
                super().__init__("aggressive", PolicyConfig(threshold="fixed", u_th=u_th, estimator="max"))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        p = load_policy({"name": "hlm_fresh_plugin:Aggressive", "u_th": 0.7})
        assert p.config.u_th == 0.7 and p.name == "aggressive"
    finally:
        sys.modules.pop("hlm_fresh_plugin", None)
