"""Scenario schema for several verifiers: servers:, routing:, tiers' region, and the plan's routing."""

from __future__ import annotations

import pytest

from agents.verifier import ServerProfile
from testbed.config.schema import MAX_VERIFIERS
from testbed.scenario import ScenarioError, dump_scenario, load_scenario, override, parse_scenario


def base(**changes) -> dict:
    link = {"uplink": {"rate_mbps": 2, "delay_ms": 20}, "downlink": {"rate_mbps": 20, "delay_ms": 20}}
    d = {
        "name": "t",
        "seed": 7,
        "models": {"slm": "tiny:slm", "llm": "tiny:llm"},
        "prompts": {"texts": ["def f():\n", "class A:\n"]},
        "generation": {"max_new_tokens": 4},
        "tiers": [
            {"name": "phone", "count": 3, "slm_ms_per_token": 30.0, "link": link, "policy": "cu-hlm"},
            {"name": "laptop", "count": 2, "slm_ms_per_token": 12.0, "link": link, "policy": "u-hlm"},
        ],
    }
    return {**d, **changes}


def errors_of(d: dict) -> dict[str, str]:
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(d)
    return {p.path: p.message for p in ei.value.problems}


def test_defaults_one_verifier_from_server():
    s = parse_scenario(base(server={"max_batch": 4, "verify_ms": {"base": 10}}))
    assert s.servers is None and s.routing == "round-robin" and all(t.region is None for t in s.tiers)
    [(slot, profile)] = s.verifiers()
    assert (slot.index, slot.name, slot.pool, slot.capacity, slot.region) == (0, "verifier", "verifier", 4.0, None)
    assert profile == s.server.profile() == ServerProfile(10.0, 0.5, 2.0, 4, 2.0)


def test_defaults_are_left_out_of_the_resolved_scenario():
    # A scenario with one verifier dumps as it did before servers/routing/region existed (study caches
    # key on the hash of scenario.yaml).
    r = parse_scenario(base()).resolved_dict()
    assert "servers" not in r and "routing" not in r and all("region" not in t for t in r["tiers"])
    assert "routing" in parse_scenario(base(routing="jsq")).resolved_dict()


def test_pools_name_their_verifiers():
    s = parse_scenario(
        base(
            servers=[
                {"name": "gpu-a100", "count": 3, "max_batch": 16, "verify_ms": {"base": 5}},
                {"name": "cpu", "max_wait_ms": 0, "region": "eu"},
            ]
        )
    )
    slots = [slot for slot, _ in s.verifiers()]
    assert [v.name for v in slots] == ["gpu-a100-0", "gpu-a100-1", "gpu-a100-2", "cpu"]
    assert [v.pool for v in slots] == ["gpu-a100"] * 3 + ["cpu"]
    assert [v.index for v in slots] == [0, 1, 2, 3]
    assert [v.capacity for v in slots] == [16.0, 16.0, 16.0, 8.0]
    assert [v.region for v in slots] == [None, None, None, "eu"]
    profiles = [p for _, p in s.verifiers()]
    assert profiles[0] == ServerProfile(5.0, 0.5, 2.0, 16, 2.0) and profiles[3] == ServerProfile(max_wait_ms=0.0)


def test_servers_round_trip(tmp_path):
    s = parse_scenario(
        base(
            servers=[{"name": "gpu", "count": 2, "region": "eu"}, {"name": "cpu", "region": "us"}],
            routing={"name": "static", "by": "region"},
            tiers=[{**t, "region": r} for t, r in zip(base()["tiers"], ["eu", "us"])],
        )
    )
    again = load_scenario(dump_scenario(s, tmp_path / "s.yaml"))
    assert again.resolved_dict() == s.resolved_dict() and again.verifiers() == s.verifiers()
    assert again.servers == s.servers and again.routing == s.routing and again.tiers[1].region == "us"
    assert override(s, {"tiers.phone.region": "us"}).tiers[0].region == "us"


@pytest.mark.parametrize(
    "servers, path, message",
    [
        ([{"name": "a", "count": 2}, {"name": "a-1"}], "servers[1].name", "duplicate verifier name 'a-1'"),
        ([{"name": "a"}, {"name": "a"}], "servers[1].name", "duplicate verifier name 'a' (also from servers[0])"),
        (
            [{"name": "a", "count": 2}, {"name": "a-0", "count": 2}],
            "servers[1].name",
            "pool name 'a-0' is also a verifier of servers[0]",
        ),
        ([{"name": "a", "count": 0}], "servers[0].count", "expected a value >= 1"),
        ([{"name": "bad name"}], "servers[0].name", "expected a name of letters"),
        ([{"name": "a", "max_bach": 4}], "servers[0].max_bach", "unknown field (did you mean max_batch?)"),
        ([], "servers", "expected at least 1 item(s)"),
        (
            [{"name": "a", "count": MAX_VERIFIERS}, {"name": "b"}],
            "servers",
            f"expected at most 100,000 verifiers in all, got {MAX_VERIFIERS + 1:,}",
        ),
    ],
)
def test_bad_servers(servers, path, message):
    errors = errors_of(base(servers=servers))
    assert message in errors[path], errors


def test_server_profile_is_not_silently_ignored():
    errors = errors_of(base(server={"max_batch": 4}, servers=[{"name": "gpu"}]))
    assert "max_batch of server: are not used when servers: is given" in errors["server.max_batch"]
    # the socket fields of server: still apply
    s = parse_scenario(base(server={"port": 5555}, servers=[{"name": "gpu"}]))
    assert s.server.port == 5555


@pytest.mark.parametrize(
    "routing, message",
    [
        ("nope", "routing 'nope': unknown router 'nope'; known: round-robin, static, jsq"),
        (3, "expected a router name (round-robin, static, jsq)"),
        ("", "expected a router name"),
        ("no_such_module_xyz:R", "cannot import module 'no_such_module_xyz'"),
        ({"name": "jsq", "k": 1}, "unknown parameter(s) k"),
        ({"name": "static", "map": {"phone": "gpu"}}, "tier(s) laptop have no entry in map"),
        ({"name": "static", "map": {"phone": "gpu", "laptop": "tpu"}}, "map target(s) tpu name no pool or verifier"),
        (
            {"name": "static", "map": {"phone": "gpu", "laptop": "gpu", "tablet": "gpu"}},
            "map key(s) tablet are not tiers here (laptop, phone)",
        ),
        ({"name": "static", "by": "region"}, "tier(s) laptop, phone have no region"),
    ],
)
def test_bad_routing(routing, message):
    errors = errors_of(base(servers=[{"name": "gpu", "count": 2}], routing=routing))
    assert message in errors["routing"], errors


def test_static_routing_to_pools_and_verifiers():
    s = parse_scenario(
        base(
            servers=[{"name": "gpu", "count": 2}, {"name": "cpu"}],
            routing={"name": "static", "map": {"phone": "gpu", "laptop": "cpu"}},
        )
    )
    assert s.routing == {"name": "static", "map": {"phone": "gpu", "laptop": "cpu"}}
    # a verifier name is a target too; without servers: the one verifier is "verifier"
    parse_scenario(base(routing={"name": "static", "map": {"phone": "verifier", "laptop": "verifier"}}))


def test_sweeping_routing():
    s = parse_scenario(base(servers=[{"name": "gpu", "count": 2}], sweep={"routing": ["round-robin", "jsq"]}))
    assert s.sweep == {"routing": ["round-robin", "jsq"]}
    errors = errors_of(base(servers=[{"name": "gpu", "count": 2}], sweep={"routing": ["jsq", "nope"]}))
    assert "unknown router 'nope'" in errors["sweep.routing[1]"]


# ---------------------------------------------------------------------------- plan


def test_plan_routes_devices():
    from testbed.run.plan import plan

    s = parse_scenario(
        base(
            servers=[{"name": "gpu", "count": 2, "max_batch": 4}, {"name": "cpu", "max_batch": 2}],
            routing={"name": "static", "map": {"phone": "gpu", "laptop": "cpu"}},
        )
    )
    p = plan(s, engine="local")
    assert [v.name for v, _ in p.verifiers] == ["gpu-0", "gpu-1", "cpu"]
    assert p.verifier_of.tolist() == [0, 1, 0, 2, 2]
    assert [sp.device for sp in p.specs] == [0, 1, 2, 3, 4]


def test_plan_one_verifier():
    from testbed.run.plan import Plan, plan

    s = parse_scenario(base(server={"max_batch": 3}))
    p = plan(s, engine="local")
    assert p.server == s.server.profile() and p.verifiers == s.verifiers() and p.verifier_of.tolist() == [0] * 5
    # a Plan built without them (older callers) gets the one verifier of its server
    q = Plan(s, p.specs, p.run, p.server, p.policy_specs, p.slm, p.llm)
    assert [v.name for v, _ in q.verifiers] == ["verifier"] and q.verifiers[0][1] is p.server
    assert q.verifier_of is None
    # one declared verifier: its own profile is the plan's server
    one = parse_scenario(base(servers=[{"name": "gpu", "max_batch": 5}]))
    assert plan(one, engine="local").server.max_batch == 5
