"""Scenario schema: field-path errors, YAML errors, round trips, overrides, sweeps, devices."""

from __future__ import annotations

import copy
import json

import pytest
import typer
import yaml
from typer.testing import CliRunner

from testbed.commands.validate import validate
from testbed.scenario import (
    Scenario,
    ScenarioError,
    bundled_scenarios,
    device_groups,
    devices,
    dump_scenario,
    expand_sweep,
    load_scenario,
    override,
    parse_scenario,
    sweep_points,
)


def base() -> dict:
    return {
        "name": "t",
        "seed": 7,
        "models": {"slm": "tiny:slm", "llm": "tiny:llm"},
        "prompts": {"texts": ["def f():\n", "class A:\n"]},
        "generation": {"max_new_tokens": 4},
        "tiers": [
            {
                "name": "phone",
                "count": 3,
                "slm_ms_per_token": 30.0,
                "policy": "cu-hlm",
                "link": {"uplink": {"rate_mbps": 2, "delay_ms": 20}, "downlink": {"rate_mbps": 20, "delay_ms": 20}},
            },
            {
                "name": "laptop",
                "count": 2,
                "slm_ms_per_token": 12.0,
                "policy": {"name": "u-hlm"},
                "link": {"uplink": {"rate_mbps": 20, "delay_ms": 5}, "downlink": {"rate_mbps": 50, "delay_ms": 5}},
            },
        ],
    }


def errors_of(d: dict) -> dict[str, str]:
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(d)
    return {p.path: p.message for p in ei.value.problems}


def netem_ready() -> bool:
    import netem

    return all(hasattr(netem, a) for a in ("LinkProfile", "DuplexProfile", "get_profile", "list_profiles"))


def policies_ready() -> bool:
    import policies

    return hasattr(policies, "load_policy") and hasattr(policies, "PolicyError")


needs_netem = pytest.mark.skipif(not netem_ready(), reason="netem link profiles not available yet")
needs_policies = pytest.mark.skipif(not policies_ready(), reason="policies.load_policy not available yet")


# ------------------------------------------------------------------ bundled scenarios


@pytest.mark.parametrize("name", ["default", "paper", "fleet-tiny", "smoke", "fleet-100k"])
def test_bundled_scenarios_validate(name):
    assert name in bundled_scenarios()
    s = load_scenario(name)
    assert s.name == name
    for run in expand_sweep(s):  # every run of a sweep validates too (links, policies included)
        assert devices(run)


def test_bundled_shapes():
    default, paper, fleet, smoke = (load_scenario(n) for n in ("default", "paper", "fleet-tiny", "smoke"))
    assert default.models.slm == "qwen2.5-coder:slm" and default.models.llm == "qwen2.5-coder:llm"
    assert default.n_devices == 4 and len(default.tiers) >= 2 and default.generation.max_new_tokens <= 48
    assert default.prompts.source == "humaneval" and default.prompts.count == 4
    assert paper.n_devices == 1 and [r.name for r in expand_sweep(paper)] == [
        "paper-hlm",
        "paper-u-hlm",
        "paper-cu-hlm",
    ]
    assert fleet.n_devices == 1000 and fleet.generation.max_new_tokens == 64
    assert 50 <= fleet.actors.devices_per_group <= 100 and len(fleet.tiers) >= 3
    assert smoke.n_devices == 8 and smoke.generation.max_new_tokens == 16
    for s in (fleet, smoke):
        assert all(str(m).startswith("tiny") for m in (s.models.slm, s.models.llm))


def test_unknown_bundled_name_lists_bundled():
    with pytest.raises(
        ScenarioError, match="bundled: default, fleet-100k, fleet-10k, fleet-1m, fleet-tiny, paper, smoke"
    ):
        load_scenario("no-such-scenario")
    with pytest.raises(ScenarioError, match="file not found"):
        load_scenario("missing/dir/x.yaml")


# ------------------------------------------------------------------ errors name field paths


def _set(d, path, value):
    node = d
    for p in path[:-1]:
        node = node[p]
    if value is _DEL:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DEL = object()
BAD = [
    (("tiers", 1, "link", "uplink", "rate_mbps"), -2, "tiers[1].link.uplink.rate_mbps", "> 0"),
    (
        ("tiers", 0, "link", "downlink", "loss"),
        1.5,
        "tiers[0].link.downlink.loss",
        "expected a number in [0, 1), got 1.5",
    ),
    (("tiers", 0, "link", "downlink"), _DEL, "tiers[0].link.downlink", "required"),
    (("tiers", 0, "link"), 42, "tiers[0].link", "named link profile"),
    (("tiers", 0, "count"), 0, "tiers[0].count", ">= 1"),
    (("tiers", 1, "slm_ms_per_token"), 0, "tiers[1].slm_ms_per_token", "> 0"),
    (("tiers", 1, "slm_ms_per_token"), "fast", "tiers[1].slm_ms_per_token", "expected a number"),
    (("tiers", 0, "policy"), 3, "tiers[0].policy", "preset name"),
    (("tiers", 0, "policy"), {"theta": 0.1}, "tiers[0].policy.name", "required"),
    (("tiers", 0, "name"), "has space", "tiers[0].name", "letters, digits"),
    (("tiers",), [], "tiers", "at least 1"),
    (("clock",), "fast", "clock", "'virtual' or 'wall'"),
    (("time_scale",), 0, "time_scale", "> 0"),
    (("seed",), -1, "seed", ">= 0"),
    (("generation", "max_new_tokens"), 0, "generation.max_new_tokens", ">= 1"),
    (("generation", "temperature"), 0.0, "generation.temperature", "> 0"),
    (("server",), {"max_batch": 0}, "server.max_batch", ">= 1"),
    (("server",), {"verify_ms": {"base": -1}}, "server.verify_ms.base", ">= 0"),
    (("server",), {"port": 70000}, "server.port", "<= 65535"),
    (("actors",), {"devices_per_group": 0}, "actors.devices_per_group", ">= 1"),
    (("metrics",), {"port": -5}, "metrics.port", ">= 0"),
    (("models", "slm"), "qwen2.5-coder:xlm", "models.slm", "xlm"),
    (("models", "llm"), {"kind": "huge"}, "models.llm.kind", "kind: tiny"),
    (("models", "llm"), _DEL, "models.llm", "required"),
    (("prompts",), {"source": "humaneval", "count": 100, "offset": 100}, "prompts.count", "<= 164"),
    (("prompts",), {"texts": ["a"], "file": "x.jsonl"}, "prompts.file", None),
    (("prompts",), {"texts": []}, "prompts.texts", "at least one"),
    (("prompts",), {"source": "file"}, "prompts.file", "required"),
    (("address",), "", "address", None),
    (("generation", "stop"), "\ndef", "generation.stop", "expected a list of stop sequences"),
    (("generation", "stop"), ["\ndef", ""], "generation.stop[1]", "non-empty string"),
    (("generation", "stop"), [3], "generation.stop[0]", "non-empty string"),
    (("generation", "stop_at_eos"), "sometimes", "generation.stop_at_eos", None),
]


@pytest.mark.parametrize("path,value,where,expected", BAD, ids=[b[2] for b in BAD])
def test_errors_name_field_path(path, value, where, expected):
    d = base()
    _set(d, path, value)
    errs = errors_of(d)
    assert where in errs, errs
    if expected:
        assert expected in errs[where], errs[where]


def test_all_errors_listed_with_lines(tmp_path):
    d = base()
    d["tiers"][0]["count"] = 0
    d["tiers"][1]["link"]["uplink"]["rate_mbps"] = -1
    d["generation"]["temperature"] = -1
    d["clok"] = "wall"
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(ScenarioError) as ei:
        load_scenario(f)
    paths = {p.path: p for p in ei.value.problems}
    assert set(paths) == {"tiers[0].count", "tiers[1].link.uplink.rate_mbps", "generation.temperature", "clok"}
    assert "did you mean clock?" in paths["clok"].message
    lines = f.read_text().splitlines()
    assert lines[paths["tiers[0].count"].line - 1].strip().startswith("count:")
    assert lines[paths["tiers[1].link.uplink.rate_mbps"].line - 1].strip().startswith("rate_mbps: -1")
    text = str(ei.value)
    assert f"{f}:{paths['clok'].line}: clok: unknown field" in text and "4 problems" in text


def test_unknown_field_in_nested_model():
    d = base()
    d["server"] = {"max_bach": 4}
    errs = errors_of(d)
    assert "did you mean max_batch?" in errs["server.max_bach"]


def test_duplicate_tier_names():
    d = base()
    d["tiers"][1]["name"] = "phone"
    assert "duplicate tier name" in errors_of(d)["tiers[1].name"]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: x\nseed: 1\ntiers: [\n  {name: a, count: 1\n")
    with pytest.raises(ScenarioError) as ei:
        load_scenario(f)
    (p,) = ei.value.problems
    assert p.line is not None and p.line >= 3
    assert str(ei.value).splitlines()[1].strip().startswith(f"{f}:{p.line}: YAML syntax error")


def test_yaml_duplicate_key_and_non_mapping(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("name: x\nseed: 1\nseed: 2\n")
    with pytest.raises(ScenarioError, match=r"dup.yaml:3: .*duplicate key 'seed' \(first on line 2\)"):
        load_scenario(f)
    f.write_text("- just\n- a list\n")
    with pytest.raises(ScenarioError, match="expected a mapping"):
        load_scenario(f)
    f.write_text("")
    with pytest.raises(ScenarioError, match="empty document"):
        load_scenario(f)


# ------------------------------------------------------------------ round trip, overrides


@pytest.mark.parametrize("name", ["default", "paper", "fleet-tiny", "smoke", "fleet-100k"])
def test_dump_load_round_trip(tmp_path, name):
    s = load_scenario(name)
    path = dump_scenario(s, tmp_path / "scenario.yaml")
    again = load_scenario(path)
    assert again == s
    assert again.resolved_dict() == s.resolved_dict()
    assert yaml.safe_load(path.read_text())["server"]["verify_ms"]["per_sequence"] == s.server.verify_ms.per_sequence


def test_defaults_filled_and_relative_prompt_file(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "def f():"}\n')
    d = base()
    d["prompts"] = {"file": "p.jsonl"}
    f = tmp_path / "sub" / "s.yaml"
    f.parent.mkdir()
    d["prompts"]["file"] = "../p.jsonl"
    f.write_text(yaml.safe_dump(d))
    s = load_scenario(f)
    r = s.resolved_dict()
    assert r["prompts"] == {
        "source": "file",
        "count": None,
        "offset": 0,
        "texts": None,
        "file": str(tmp_path / "p.jsonl"),
    }
    assert r["clock"] == "virtual" and r["server"]["max_batch"] == 8 and r["actors"]["devices_per_group"] == 4
    assert r["metrics"]["port"] is None and r["address"] is None
    out = dump_scenario(s, tmp_path / "elsewhere" / "scenario.yaml")  # still finds the prompt file
    assert load_scenario(out) == s
    d["prompts"]["file"] = "nope.jsonl"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(ScenarioError, match="prompts.file: prompt file not found"):
        load_scenario(f)


def test_override():
    s = parse_scenario(base())
    o = override(
        s, clock="wall", time_scale=2.0, address="127.0.0.1:6379", devices_per_group=1, metrics_port=9400, seed=None
    )
    assert (o.clock, o.time_scale, o.address, o.actors.devices_per_group, o.metrics.port, o.seed) == (
        "wall",
        2.0,
        "127.0.0.1:6379",
        1,
        9400,
        7,
    )
    assert s.clock == "virtual"  # the original is untouched
    o = override(s, {"tiers.laptop.count": 5, "server.max_batch": 16, "policy": "hlm"})
    assert o.tiers[1].count == 5 and o.server.max_batch == 16
    assert all((t.policy if isinstance(t.policy, str) else t.policy["name"]) == "hlm" for t in o.tiers)
    with pytest.raises(ScenarioError, match="clock: expected one of 'virtual' or 'wall'"):
        override(s, clock="sundial")
    with pytest.raises(ScenarioError, match="unknown key 'tiers.tablet.count'"):
        override(s, {"tiers.tablet.count": 1})
    with pytest.raises(ScenarioError, match="unknown key 'generation.top_q'"):
        override(s, {"generation.top_q": 1})


# ------------------------------------------------------------------ sweeps


def test_sweep_expansion():
    d = base()
    d["sweep"] = {"policy": ["hlm", "u-hlm"], "generation.temperature": [0.5, 1.0]}
    s = parse_scenario(d)
    runs = expand_sweep(s)
    assert [r.name for r in runs] == [
        "t-hlm-temperature=0.5",
        "t-hlm-temperature=1.0",
        "t-u-hlm-temperature=0.5",
        "t-u-hlm-temperature=1.0",
    ]
    assert sweep_points(s)[2] == {"policy": "u-hlm", "generation.temperature": 0.5}
    assert all(r.sweep is None for r in runs)
    assert runs[3].generation.temperature == 1.0
    names = [t.policy if isinstance(t.policy, str) else t.policy["name"] for t in runs[2].tiers]
    assert names == ["u-hlm", "u-hlm"]
    assert expand_sweep(parse_scenario(base())) == [parse_scenario(base())]


def test_sweep_errors_name_the_value():
    d = base()
    d["sweep"] = {"slm_ms_per_token": [10.0, -1.0]}
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(d)
    msgs = [p.message for p in ei.value.problems if p.path == "sweep.slm_ms_per_token[1]"]
    assert msgs == [
        "tiers[0].slm_ms_per_token: expected a value > 0, got -1.0",
        "tiers[1].slm_ms_per_token: expected a value > 0, got -1.0",
    ]
    d["sweep"] = {"generation.nope": [1]}
    assert "unknown key" in errors_of(d)["sweep.generation.nope"]
    d["sweep"] = {"policy": []}
    assert "non-empty" in errors_of(d)["sweep.policy"]


def test_sweep_dict_policies_get_distinct_names():
    d = base()
    d["sweep"] = {"tiers.phone.policy": [{"name": "cu-hlm", "theta": 0.1}, {"name": "cu-hlm", "theta": 0.2}]}
    try:
        runs = expand_sweep(parse_scenario(d))
    except ScenarioError:
        pytest.skip("policies rejects the theta parameter")
    assert len({r.name for r in runs}) == 2


# ------------------------------------------------------------------ devices, verifier time


def test_devices_and_groups():
    d = base()
    d["actors"] = {"devices_per_group": 2}
    s = parse_scenario(d)
    ds = devices(s)
    assert [x.device_id for x in ds] == [0, 1, 2, 3, 4]
    assert [x.tier for x in ds] == ["phone"] * 3 + ["laptop"] * 2
    assert ds[3].slm_ms_per_token == 12.0 and ds[0].link == s.tiers[0].link
    assert ds[0].policy_spec == s.tiers[0].policy and ds[4].policy == "u-hlm"
    assert [[x.device_id for x in g] for g in device_groups(s)] == [[0, 1], [2, 3], [4]]


def test_server_profile_verify_time():
    # The verifier's time model is agents.verifier.ServerProfile; the scenario only maps its fields.
    s = parse_scenario({**base(), "server": {"verify_ms": {"base": 20.0, "per_token": 0.5, "per_sequence": 2.0}}})
    assert s.server.profile().verify_seconds(4, 10) == pytest.approx((20 + 0.5 * 10 + 2 * 4) / 1000)
    assert s.server.profile().verify_seconds(1, 1) == pytest.approx(0.0225)


# ------------------------------------------------------------------ models, links, policies via their packages


def test_model_specs():
    d = base()
    d["models"] = {"slm": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "llm": "qwen2.5-coder:llm"}
    assert parse_scenario(d).models.slm == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    d["models"] = {"slm": {"kind": "tiny", "role": "slm", "vocab_size": 300}, "llm": "tiny"}
    assert parse_scenario(d).models.slm["vocab_size"] == 300


def test_tiny_model_params_checked_by_agents():
    m = pytest.importorskip("agents.models")
    if not hasattr(m, "parse_spec"):
        pytest.skip("agents.models.parse_spec not available yet")
    d = base()
    d["models"]["slm"] = {"kind": "tiny", "layrs": 2}
    assert "unknown tiny model parameter" in errors_of(d)["models.slm.layrs"]
    d["models"]["slm"] = {"kind": "tiny", "vocab_size": 1, "layers": 2}
    assert "vocab_size" in errors_of(d)["models.slm.vocab_size"]
    d["models"]["slm"] = "./no/such/folder"
    assert "does not exist" in errors_of(d)["models.slm"]


@needs_netem
def test_links_checked_by_netem():
    import netem

    d = base()
    d["tiers"][0]["link"]["uplink"]["rate_mbs"] = 2  # a typo netem rejects
    assert "unknown link parameter" in errors_of(d)["tiers[0].link.uplink.rate_mbs"]
    d = base()
    d["tiers"][0]["link"]["downlink"]["jitter_dist"] = "cauchy"
    assert "uniform" in errors_of(d)["tiers[0].link.downlink.jitter_dist"]
    d = base()
    d["tiers"][1]["link"] = "no-such-profile"
    msg = errors_of(d)["tiers[1].link"]
    assert "unknown link profile" in msg and "wifi-weak" in msg
    d["tiers"][1]["link"] = "wifi-weak"
    assert parse_scenario(d).tiers[1].link == "wifi-weak"
    assert netem.list_profiles()  # bundled scenarios may name these


@needs_policies
def test_policies_checked_and_resolved():
    d = base()
    d["tiers"][0]["policy"] = "no-such-policy"
    assert "no-such-policy" in errors_of(d)["tiers[0].policy"]
    d["tiers"][0]["policy"] = "cu-hlm"
    s = parse_scenario(d)
    pol = s.tiers[0].policy  # resolved to {name, every parameter} so the dumped scenario pins them
    assert isinstance(pol, dict) and pol["name"] == "cu-hlm"
    assert parse_scenario(json.loads(json.dumps(s.resolved_dict()))) == s
    import policies

    assert policies.load_policy(pol).params() == policies.load_policy("cu-hlm").params()


# ------------------------------------------------------------------ `testbed validate`


def _cli():
    app = typer.Typer()
    app.command()(validate)
    return app


def test_validate_command(tmp_path):
    r = CliRunner().invoke(_cli(), ["smoke", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ok"] and out["devices"] == 8 and out["prompts"] == 4 and out["runs"] == ["smoke"]
    r = CliRunner().invoke(_cli(), ["paper", "--json"])
    assert json.loads(r.stdout)["runs"] == ["paper-hlm", "paper-u-hlm", "paper-cu-hlm"]

    d = base()
    d["tiers"][1]["link"]["uplink"]["rate_mbps"] = -2
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(d, sort_keys=False))
    r = CliRunner().invoke(_cli(), [str(f), "--json"])
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert not out["ok"] and out["errors"][0]["path"] == "tiers[1].link.uplink.rate_mbps" and out["errors"][0]["line"]
    r = CliRunner().invoke(_cli(), [str(f)])
    assert r.exit_code == 1 and "tiers[1].link.uplink.rate_mbps: expected a number > 0, got -2" in r.stderr

    r = CliRunner().invoke(_cli(), ["smoke", "--resolved"])
    assert r.exit_code == 0 and parse_scenario(yaml.safe_load(r.stdout)) == load_scenario("smoke")


def test_jsonl_errors_reported_by_validate(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    d = base()
    d["prompts"] = {"file": "p.jsonl"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(_cli(), [str(tmp_path / "s.yaml"), "--json"])
    assert r.exit_code == 1
    err = json.loads(r.stdout)["errors"][0]
    assert err["path"] == "prompts" and "p.jsonl:2: invalid JSON" in err["message"]


def test_scenario_is_frozen():
    s = parse_scenario(base())
    with pytest.raises(ValueError, match="frozen"):  # pydantic's ValidationError
        s.seed = 3  # type: ignore[misc]
    assert isinstance(copy.deepcopy(s), Scenario)


def test_multiline_prompts_round_trip_exactly(tmp_path):
    d = base()
    d["prompts"] = {"texts": ["def f(x):\n    return x\n", " lead\n", "trail \n\n\n", "a\tb", "no newline"]}
    s = parse_scenario(d)
    path = dump_scenario(s, tmp_path / "s.yaml")
    assert "- |\n    def f(x):\n        return x\n" in path.read_text()  # a literal block, readable
    assert load_scenario(path).prompts.texts == d["prompts"]["texts"]


def test_bare_tiny_models_take_the_role_of_their_slot():
    s = parse_scenario(
        {
            "name": "t",
            "models": {"slm": "tiny", "llm": {"kind": "tiny", "vocab_size": 300}},
            "tiers": [{"name": "a", "count": 1, "slm_ms_per_token": 10.0, "link": "wifi-strong"}],
        }
    )
    assert s.models.slm == "tiny:slm"
    assert s.models.llm == {"kind": "tiny", "vocab_size": 300, "role": "llm"}


def test_stop_defaults_to_the_humaneval_stops_for_humaneval_prompts_and_shows_in_the_resolved_scenario(tmp_path):
    from testbed.accuracy import STOP_SEQUENCES

    d = base()
    assert parse_scenario(d).generation.stop == []  # texts: no stop sequences unless asked
    d["prompts"] = {"source": "humaneval", "count": 2}
    s = parse_scenario(d)
    assert s.generation.stop == list(STOP_SEQUENCES) and s.generation.stop_at_eos
    path = dump_scenario(s, tmp_path / "scenario.yaml")
    assert yaml.safe_load(path.read_text())["generation"]["stop"] == list(STOP_SEQUENCES)
    assert load_scenario(path) == s
    d["generation"] = {"max_new_tokens": 4, "stop": []}  # an explicit empty list disables them
    assert parse_scenario(d).generation.stop == []
    d["generation"] = {"max_new_tokens": 4, "stop": ["\n\n"], "stop_at_eos": False}
    assert parse_scenario(d).generation.stop == ["\n\n"]
