"""cu-hlm-adaptive (policies.adaptive): learns online per device which u it may skip within a
risk budget (expected missed rejections per token), with no offline fit of a, b."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from policies import DecisionContext, PolicyConfig, PolicyError, load_policy, policy_catalog
from policies.adaptive import AdaptivePolicy

V = 16


# --------------------------------------------------------------------------- a synthetic stream
# u ~ Beta(1.2, 2), beta = clip(0.6 u - 0.05 + N(0, 0.1), 0, 1): E[beta | u] is known, and is
# neither linear (the clip) nor zero anywhere, so a risk-averse -b/a rule has nothing to go on.


def draw(g: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    u = g.beta(1.2, 2.0, n)
    return u, np.clip(0.6 * u - 0.05 + g.normal(0.0, 0.1, n), 0.0, 1.0)


def synthetic(**params) -> AdaptivePolicy:
    """The policy with an estimator that reports the stream's u (set by `run_stream`)."""
    p = AdaptivePolicy(config=PolicyConfig(truncation="full", prob_bits=32), estimator=lambda b: None, **params)
    p.stream_u = {}
    p.estimator = lambda batch: np.array([p.stream_u[(d, t)] for _, d, t in batch.keys])
    return p


def run_stream(policy, streams: dict[int, tuple[np.ndarray, np.ndarray]], order=None, seed: int = 11):
    """Feed each device's (u, beta) stream through decide_batch and observe, the way
    Device.on_verdict does: a skipped token's beta comes back (as a shadow) with the verdict
    of the device's next upload, before that upload's own beta. `order`: the (device,
    token_index) sequence to decide in (default: device by device). Returns per device the
    boolean array of skipped tokens and the decisions."""
    n = {d: len(s[0]) for d, s in streams.items()}
    order = order or [(d, t) for d in streams for t in range(n[d])]
    x = np.full(V, 1.0 / V)
    pending = {d: [] for d in streams}
    skipped = {d: np.zeros(n[d], dtype=bool) for d in streams}
    decisions = {d: [] for d in streams}
    for d, t in order:
        u, beta = float(streams[d][0][t]), float(streams[d][1][t])
        policy.stream_u[(d, t)] = u
        dec = policy.decide_batch(None, [DecisionContext(seed, d, t, 1.0, 0, x)])[0]
        decisions[d].append(dec)
        if dec.transmit:
            for args in pending[d]:
                policy.observe(d, *args, True)
            pending[d] = []
            policy.observe(d, t, u, beta, False)
        else:
            skipped[d][t] = True
            pending[d].append((t, u, beta))
    return skipped, decisions


def true_risk(policy, device: int, n: int = 400_000) -> float:
    """The expected risk per token of the device's current rule under the stream's law."""
    u, beta = draw(np.random.default_rng(99), n)
    rule = policy.skip_rule
    c, q = rule.rule(device)
    j = np.floor(u / rule.bin_width + 0.5)
    p_skip = np.where(j < c, 1.0, np.where(j == c, q, 0.0)) * (1.0 - rule.epsilon)
    return float(np.mean(beta * p_skip))


def streams_for(devices, n, seed=0):
    return {d: draw(np.random.default_rng([seed, d]), n) for d in devices}


@pytest.mark.parametrize(
    "feedback, epsilon, tol_mean, tol", [("shadow", 0.05, 0.06, 0.2), ("transmitted", 0.2, 0.1, 0.3)]
)
def test_risk_converges_to_the_budget_and_a_bigger_budget_skips_more(feedback, epsilon, tol_mean, tol):
    n, devices = 3000, (0, 1, 2, 3)
    streams = streams_for(devices, n)
    skip_rates = []
    for risk in (0.01, 0.03):
        p = synthetic(risk=risk, epsilon=epsilon, feedback=feedback)
        skipped, _ = run_stream(p, streams)
        # The rule each device ends with has, under the true law, the risk asked for ...
        risks = [true_risk(p, d) for d in devices]
        assert np.mean(risks) == pytest.approx(risk, rel=tol_mean), risks
        assert risks == pytest.approx([risk] * len(devices), rel=tol)
        # ... and so has what the stream realised in its second half (after the learning).
        realised = np.mean([streams[d][1][n // 2 :] * skipped[d][n // 2 :] for d in devices])
        assert realised == pytest.approx(risk, rel=tol)
        skip_rates.append(np.mean([skipped[d].mean() for d in devices]))
    assert 0.05 < skip_rates[0] < skip_rates[1]


def test_it_skips_what_the_known_law_allows():
    """Against the oracle threshold for the same budget (u_th with E[beta 1{u <= u_th}] =
    risk under the true law): nearly as many skips once learnt."""
    n = 4000
    streams = streams_for((0,), n, seed=3)
    p = synthetic(risk=0.02, epsilon=0.05)
    skipped, _ = run_stream(p, streams)
    u, beta = draw(np.random.default_rng(98), 400_000)
    order = np.argsort(u)
    cum = np.cumsum(beta[order]) / u.size
    oracle_skip = np.searchsorted(cum, 0.02) / u.size
    late = skipped[0][n // 2 :].mean()
    assert 0.85 * oracle_skip < late < 1.1 * oracle_skip, (late, oracle_skip)


def test_budget_zero_never_skips_and_never_probes():
    streams = streams_for((0, 1), 1500, seed=1)
    p = synthetic(risk=0.0, epsilon=0.3)
    skipped, decisions = run_stream(p, streams)
    assert not any(s.any() for s in skipped.values())
    assert all(d.transmit for ds in decisions.values() for d in ds)
    assert p.skip_rule.stats(0)["would_skip"] == p.skip_rule.stats(0)["probes"] == 0


def test_probes_are_epsilon_of_the_would_be_skips():
    n, eps = 4000, 0.25
    streams = streams_for((0, 1, 2), n, seed=2)
    p = synthetic(risk=0.03, epsilon=eps)
    skipped, decisions = run_stream(p, streams)
    would = probes = 0
    for d in streams:
        st = p.skip_rule.stats(d)
        assert st["skipped"] == skipped[d].sum() == sum(not x.transmit for x in decisions[d])
        assert st["would_skip"] == st["skipped"] + st["probes"]
        would += st["would_skip"]
        probes += st["probes"]
    assert would > 1000
    rate = probes / would
    assert abs(rate - eps) < 4 * math.sqrt(eps * (1 - eps) / would)


def test_nothing_is_skipped_before_min_samples_betas():
    streams = streams_for((0,), 400, seed=4)
    p = synthetic(risk=0.2, epsilon=0.0, min_samples=20)
    skipped, _ = run_stream(p, streams)
    assert not skipped[0][:20].any() and skipped[0].any()


def test_state_is_per_device_interleaving_changes_nothing():
    """Two devices decided interleaved (one shared instance) or each alone (own instances),
    in either order: the same decisions, bit for bit."""
    n = 600
    streams = streams_for((3, 8), n, seed=5)
    shared = synthetic(risk=0.03, epsilon=0.1)
    interleaved = [(d, t) for t in range(n) for d in (8, 3)]
    _, dec_shared = run_stream(shared, streams, order=interleaved)
    for d in (3, 8):
        alone = synthetic(risk=0.03, epsilon=0.1)
        _, dec_alone = run_stream(alone, {d: streams[d]})
        assert dec_alone[d] == dec_shared[d]
        assert sum(not x.transmit for x in dec_alone[d]) > 50  # the comparison is not vacuous
    # One batch holding both devices decides as two single-device calls do.
    p1, p2 = synthetic(risk=0.03, epsilon=0.1), synthetic(risk=0.03, epsilon=0.1)
    x = np.full(V, 1.0 / V)
    for t in range(n):
        ctxs = [DecisionContext(11, d, t, 1.0, 0, x) for d in (3, 8)]
        for d in (3, 8):
            p1.stream_u[(d, t)] = p2.stream_u[(d, t)] = float(streams[d][0][t])
        both = p1.decide_batch(None, ctxs)
        single = [p2.decide_batch(None, [c])[0] for c in ctxs]
        assert both == single
        for d, dec in zip((3, 8), both):
            if dec.transmit:
                for p in (p1, p2):
                    p.observe(d, t, float(streams[d][0][t]), float(streams[d][1][t]), False)


def test_a_device_that_starts_over_starts_from_scratch():
    streams = streams_for((0,), 500, seed=6)
    p = synthetic(risk=0.03)
    _, first = run_stream(p, streams)
    _, again = run_stream(p, streams)  # the same instance, the stream from token 0 again
    assert again == first


def test_learned_kstar_uses_the_devices_betas():
    """truncation=online: beta_d in U_TV's denominator is the device's learned E[beta | u]
    once it has evidence (here all betas are 1: the bound is tightest, k grows)."""
    g = np.random.default_rng(0)
    z = g.normal(0, 2.0, (1, 400)).astype(np.float32)
    x = np.exp(z[0] - z[0].max())
    x /= x.sum()
    ctx = lambda dev, t: DecisionContext(1, dev, t, 1.0, int(np.argmax(x)), x)  # noqa: E731
    learned = load_policy({"name": "cu-hlm-adaptive", "estimator": "max", "risk": 0.0, "min_samples": 4})
    linear = load_policy(
        {"name": "cu-hlm-adaptive", "estimator": "max", "risk": 0.0, "min_samples": 4, "kstar_beta": "linear"}
    )
    k0 = [p.decide(z[0], ctx(0, 0)).k for p in (learned, linear)]
    assert k0[0] == k0[1]  # no evidence yet: both use a*u + b
    for t in range(1, 6):
        for p in (learned, linear):
            d = p.decide(z[0], ctx(0, t))
            p.observe(0, t, d.uncertainty, 1.0, False)
    k1 = [p.decide(z[0], ctx(0, 9)).k for p in (learned, linear)]
    assert k1[1] == k0[1] and k1[0] > k0[0]


# --------------------------------------------------------------------------- parameters, catalog


@pytest.mark.parametrize(
    "params, names",
    [
        ({"risk": -0.1}, "risk"),
        ({"risk": 1.5}, "risk"),
        ({"risk": "low"}, "risk"),
        ({"risk": math.nan}, "risk"),
        ({"epsilon": 1.0}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"feedback": "transmitted", "epsilon": 0.0}, "epsilon"),
        ({"feedback": "all"}, "feedback"),
        ({"min_samples": 0}, "min_samples"),
        ({"min_samples": 2.5}, "min_samples"),
        ({"prior_strength": -1}, "prior_strength"),
        ({"bin_width": 0}, "bin_width"),
        ({"kstar_beta": "paper"}, "kstar_beta"),
        ({"truncation": "full", "kstar_beta": "linear"}, "kstar_beta"),
        ({"estimator": "none"}, "estimator"),
        ({"truncation": "offline", "k": 8}, "truncation"),
        ({"truncation": "full", "theta": 0.2}, "theta"),
        ({"threshold": "fixed"}, "threshold"),
        ({"K": 0}, "K"),
        ({"prob_bits": 7}, "prob_bits"),
    ],
)
def test_bad_parameters_fail_at_load_naming_the_parameter(params, names):
    with pytest.raises(PolicyError, match=names):
        load_policy({"name": "cu-hlm-adaptive", **params})


def test_listed_in_the_catalog_and_the_cli_and_loads_back():
    from typer.testing import CliRunner

    from testbed.cli import app

    res = CliRunner().invoke(app, ["policies", "--json"])
    assert res.exit_code == 0, res.output
    entry = json.loads(res.output)["presets"]["cu-hlm-adaptive"]
    assert entry == policy_catalog()["presets"]["cu-hlm-adaptive"]
    params = entry["params"]
    assert params["risk"] == 0.02 and params["epsilon"] == 0.05 and params["feedback"] == "shadow"
    assert params["truncation"] == "online" and params["bin_width"] == 0.05
    assert load_policy({"name": "cu-hlm-adaptive", **params}).params() == load_policy("cu-hlm-adaptive").params()
    p = load_policy({"name": "cu-hlm-adaptive", "risk": 0.05, "truncation": "top-k", "k": 8, "estimator": "entropy"})
    assert isinstance(p, AdaptivePolicy) and p.name == "cu-hlm-adaptive"
    assert p.params()["risk"] == 0.05 and p.params()["bin_width"] == 0.02 and "kstar_beta" not in p.params()
    with pytest.raises(PolicyError, match="built-in"):
        from policies import register_policy

        register_policy("cu-hlm-adaptive", AdaptivePolicy)


def test_a_scenario_pins_its_parameters():
    from testbed.scenario import load_scenario, override

    s = override(load_scenario("smoke"), {"policy": {"name": "cu-hlm-adaptive", "risk": 0.05}})
    spec = s.resolved_dict()["tiers"][0]["policy"]
    assert spec["name"] == "cu-hlm-adaptive" and spec["risk"] == 0.05 and spec["epsilon"] == 0.05
    assert load_policy(spec).params() == load_policy({"name": "cu-hlm-adaptive", "risk": 0.05}).params()


# --------------------------------------------------------------------------- through the engine

TOKENS = 96


def smoke(tokens: int = TOKENS, **policy):
    from testbed.scenario import load_scenario, override

    return override(
        load_scenario("smoke"), {"generation.max_new_tokens": tokens, "policy": {"name": "cu-hlm-adaptive", **policy}}
    )


def tokens_of(out: Path):
    from testbed import results

    return results.read_tokens(out / "tokens.parquet").sort_values(["device", "token_index"]).reset_index(drop=True)


def test_device_feeds_every_verdict_to_observe(tmp_path):
    """Device.on_verdict calls observe for each piggybacked skipped token (its shadow beta)
    and then for the verified draft, with the u the decision reported, in the device's order."""
    from agents.engine import run_local
    from agents.lm import BatchedLM
    from agents.models import load_model
    from testbed import results
    from testbed.run import plan

    class Spy(AdaptivePolicy):
        def __init__(self):
            super().__init__(risk=0.05)
            self.calls = []

        def observe(self, device, token_index, uncertainty, beta, skipped):
            self.calls.append((device, token_index, uncertainty, beta, skipped))
            super().observe(device, token_index, uncertainty, beta, skipped)

    p = plan(smoke(48))
    spy = Spy()
    result = run_local(
        p.specs,
        p.run,
        p.server,
        BatchedLM(load_model(p.slm)),
        BatchedLM(load_model(p.llm)),
        {name: spy for name in p.policy_specs},
    )
    df = results.tokens_frame(result.rows)
    calls = {(c[0], c[1]): c for c in spy.calls}
    assert len(calls) == len(spy.calls) == len(df)  # every token once: drafts and shadows
    for r in df.itertuples():
        assert calls[(r.device, r.token_index)][2:] == (r.uncertainty, r.beta, not r.transmitted)
    for dev in df.device.unique():  # a device's feedback arrives in token order
        idx = [c[1] for c in spy.calls if c[0] == dev]
        assert idx == sorted(idx)
    assert (~df.transmitted).sum() > 0


def test_smoke_run_skips_after_warm_up_near_the_budget(tmp_path):
    from testbed.run import RunOptions, run_scenario

    risk = 0.03
    run_scenario(smoke(risk=risk), RunOptions(out_dir=tmp_path, engine="local", progress=False, report=False))
    df = tokens_of(tmp_path)
    late = df[df.token_index >= TOKENS // 3]
    skipped = ~late.transmitted
    assert skipped.mean() > 0.05
    assert not df.beta[~df.transmitted].isna().any()  # every skipped token got its shadow beta
    realised = float((late.beta * skipped).sum() / len(late))
    assert 0.4 * risk < realised < 1.5 * risk


@pytest.fixture(scope="module")
def ray_here():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_traces_are_identical_in_every_engine_and_layout(ray_here, tmp_path):
    """The learning policy is fed only by each device's own verdicts: local engine (one
    instance for all devices), Ray with 4 devices per group and with 1 (an instance per
    device) give the same trace, bit for bit."""
    import pandas as pd

    from testbed.run import RunOptions, run_scenario
    from testbed.scenario import override

    cols = [
        "device",
        "token_index",
        "token_id",
        "draft_id",
        "uncertainty",
        "transmitted",
        "k",
        "payload_bytes",
        "accepted",
        "resampled",
        "beta",
        "t_draft_start",
        "t_upload_sent",
        "t_verdict",
        "t_commit",
    ]
    traces = {}
    for name, engine, dpg in [("local", "local", 4), ("ray4", "ray", 4), ("ray1", "ray", 1)]:
        s = override(smoke(32, risk=0.05, min_samples=4, epsilon=0.1), {"actors.devices_per_group": dpg})
        run_scenario(s, RunOptions(out_dir=tmp_path / name, engine=engine, progress=False, report=False))
        traces[name] = tokens_of(tmp_path / name)[cols]
    assert (~traces["local"].transmitted).sum() > 10  # the policy did skip: the comparison means something
    pd.testing.assert_frame_equal(traces["ray4"], traces["local"], check_exact=True)
    pd.testing.assert_frame_equal(traces["ray1"], traces["local"], check_exact=True)
