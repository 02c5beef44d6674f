"""Issue 11 item 4: whatever would fail at run time is refused at validation, by `testbed validate`
and by `testbed run` before it writes anything; a failure at run time is one paragraph that says
where the partial results are (the traceback only with --debug)."""

from __future__ import annotations

import time

import pytest
import yaml
from typer.testing import CliRunner

from testbed.cli import app
from testbed.preflight import ACTOR_BYTES, DEVICE_BYTES, TOKEN_BYTES, GiB, max_devices, preflight
from testbed.scenario import ScenarioError, load_scenario, override, parse_scenario


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
            }
        ],
    }


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def check_refused(tmp_path, d: dict, *expected: str) -> str:
    """validate exits 1 and run exits 2 with the same message naming `expected`; run writes nothing."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d, sort_keys=False))
    v = cli("validate", str(f))
    assert v.exit_code == 1, v.output
    out = tmp_path / "out"
    r = cli("run", str(f), "--engine", "local", "--out", str(out), "--no-report")
    assert r.exit_code == 2, r.output
    for text in (v.stderr, r.stderr):
        assert "Traceback" not in text
        for e in expected:
            assert e in text, text
    assert not out.exists()  # nothing written: no folder, no scenario.yaml
    return r.stderr


def test_prompt_longer_than_positions(tmp_path):
    d = base()
    d["models"] = {"slm": {"kind": "tiny", "max_positions": 64}, "llm": {"kind": "tiny", "max_positions": 48}}
    d["generation"]["max_new_tokens"] = 40
    # "def f():\n" is 9 byte-tokens (with BOS): 9 + 40 = 49 > 48.
    check_refused(
        tmp_path,
        d,
        "generation.max_new_tokens: prompt 0 (texts[0]) is 9 tokens",
        "needs 49 positions, over the 48 max positions of models.llm",
        "models.slm: 64",
        "max_new_tokens <= 39 fits",
    )
    # The limit is exact: prompt + max_new_tokens = positions passes (and runs: test_runtime's slm-only).
    d["generation"]["max_new_tokens"] = 39
    preflight(parse_scenario(d), engine="local")


def test_vocabulary_mismatch(tmp_path):
    d = base()
    d["models"] = {"slm": {"kind": "tiny", "vocab_size": 600}, "llm": "tiny:llm"}
    check_refused(tmp_path, d, "models: models.slm", "vocabulary of 600 tokens", "models.llm (tiny:llm) of 512")


def test_link_that_loses_everything(tmp_path):
    d = base()
    d["tiers"][0]["link"]["uplink"]["loss"] = 1.0
    check_refused(
        tmp_path,
        d,
        "tiers[0].link.uplink.loss: expected a loss probability < 1, got 1.0",
        "(tier phone)",
        "after 33 tries",
    )
    # Gilbert-Elliott that never leaves its all-loss bad state, on the downlink.
    d = base()
    d["tiers"][0]["link"]["downlink"].update(ge_p=0.1, ge_r=0.0)
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(d)
    (p,) = ei.value.problems
    assert p.path == "tiers[0].link.downlink.ge_r" and "loses every packet" in p.message and "tier phone" in p.message
    d["tiers"][0]["link"]["downlink"]["ge_r"] = 0.3  # a real bursty link still passes
    parse_scenario(d)


def test_server_host(tmp_path):
    d = base()
    d["server"] = {"host": "not a host"}
    check_refused(
        tmp_path,
        d,
        "server.host: expected an IPv4 address or a host name",
        "got 'not a host', which is not a valid host name",
    )
    for bad, why in (("::1", "IPv4 only"), ("no-such-host.invalid", "does not resolve here")):
        d["server"] = {"host": bad}
        with pytest.raises(ScenarioError, match=why):
            parse_scenario(d)
    for good in ("127.0.0.1", "0.0.0.0", "localhost"):
        d["server"] = {"host": good}
        preflight(parse_scenario(d))
    # A well-formed address this machine does not own (TEST-NET-2): refused for a local Ray run.
    d["server"] = {"host": "198.51.100.7"}
    with pytest.raises(ScenarioError, match=r"198\.51\.100\.7.*cannot be bound on this machine"):
        preflight(parse_scenario(d))
    preflight(parse_scenario(d), address="10.0.0.1:6379")  # a cluster's node may own it: not checked here


def test_bad_prompt_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    d = base()
    d["prompts"] = {"file": "p.jsonl"}
    err = check_refused(tmp_path, d, "prompts: ", "p.jsonl:2: invalid JSON")
    assert len(err.strip().splitlines()) == 2  # the head line and the problem, nothing else


def test_too_many_devices(tmp_path, monkeypatch):
    import testbed.preflight

    monkeypatch.setattr(testbed.preflight, "available_memory", lambda: 24 * GiB)  # the same on any machine
    d = base()
    d["tiers"][0]["count"] = 10_000_000
    t = time.perf_counter()
    check_refused(
        tmp_path,
        d,
        "tiers: 10000000 devices need about",
        "of the 24.0 GiB available on this machine",
        f"{DEVICE_BYTES // 1024} KiB + 4 tokens x {TOKEN_BYTES // 1024} KiB",
        "at most",
    )
    assert time.perf_counter() - t < 30  # refused at once, not after minutes of planning
    # Too many actor processes for the devices: the layout is named, with the group size that fits.
    d["tiers"][0]["count"] = 5000
    d["actors"] = {"devices_per_group": 1}
    with pytest.raises(ScenarioError) as ei:
        preflight(parse_scenario(d))
    (p,) = ei.value.problems
    assert p.path == "actors.devices_per_group" and f"x {ACTOR_BYTES >> 20} MiB" in p.message
    assert "devices_per_group >=" in p.message


def test_device_bound_allows_fleet_10k_on_24_gib():
    """The bound's figures: 10,000 tiny devices at 64 tokens fit a 24 GiB machine (~21 GiB free)."""
    s = load_scenario("fleet-tiny")  # 64 tokens, tiny models
    facts = {"slm": {"vocab_size": 512, "max_positions": 4096, "layers": 2, "kv_heads": 2, "head_dim": 16}}
    facts["llm"] = facts["slm"]
    assert max_devices(override(s, {"actors.devices_per_group": 500}), facts, 30, 21 * GiB) >= 10_000


def test_sweep_checked_before_the_first_run(tmp_path):
    d = base()
    d["models"] = {"slm": {"kind": "tiny", "max_positions": 48}, "llm": {"kind": "tiny", "max_positions": 48}}
    d["sweep"] = {"max_new_tokens": [4, 40]}  # the second run does not fit
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d, sort_keys=False))
    out = tmp_path / "out"
    r = cli("run", str(f), "--engine", "local", "--out", str(out), "--no-report")
    assert r.exit_code == 2 and "(sweep run t-max_new_tokens=40)" in r.stderr and "49 positions" in r.stderr
    assert not out.exists()  # not even the first, valid run
    assert cli("validate", str(f)).exit_code == 1


# ------------------------------------------------------------------ failures at run time


def _fail_mid_run(monkeypatch, exc: BaseException):
    """The local engine raises `exc` once some tokens' content has reached the runner."""
    import agents.engine

    real = agents.engine.run_virtual

    def run_virtual(*args, on_content=None, **kw):
        steps = []

        def content(group, verifier):  # called after each step of the content pass
            if on_content is not None:  # the runner takes the content pass's events (on_content_events)
                on_content(group, verifier)
            steps.append(1)
            if len(steps) == 3:  # a few tokens in: their events have reached the runner
                raise exc

        return real(*args, on_content=content, **kw)

    monkeypatch.setattr(agents.engine, "run_virtual", run_virtual)


def test_run_time_failure_is_one_paragraph(monkeypatch, tmp_path):
    _fail_mid_run(monkeypatch, RuntimeError("device 1: upload 3 lost 33 times"))
    out = tmp_path / "out"
    r = cli("run", "smoke", "--engine", "local", "--out", str(out), "--no-report")
    assert r.exit_code == 1
    err = r.stderr.strip()
    assert "Traceback" not in r.output
    assert err.startswith("testbed run failed: smoke (local engine) stopped after")
    assert "RuntimeError: device 1: upload 3 lost 33 times" in err
    assert f"Partial results are in {out} (" in err and "tokens.parquet" in err and "--debug" in err
    assert len(err.splitlines()) == 1  # one paragraph
    assert (out / "tokens.parquet").exists() and (out / "scenario.yaml").exists()


def test_debug_prints_the_traceback(monkeypatch, tmp_path):
    _fail_mid_run(monkeypatch, RuntimeError("device 1: upload 3 lost 33 times"))
    r = cli("run", "smoke", "--engine", "local", "--out", str(tmp_path / "out"), "--no-report", "--debug")
    assert r.exit_code == 1
    assert "Traceback (most recent call last)" in r.stderr and "in run_virtual" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("testbed run failed: smoke")


def test_ctrl_c_says_where_the_partial_results_are(monkeypatch, tmp_path):
    _fail_mid_run(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "out"
    r = cli("run", "smoke", "--engine", "local", "--out", str(out), "--no-report")
    assert r.exit_code == 130
    assert (
        r.stderr.strip().startswith("interrupted: smoke stopped after") and f"Partial results are in {out}" in r.stderr
    )
    assert "Traceback" not in r.output


def test_describe_error_reduces_actor_tracebacks():
    from testbed.commands.run import describe_error

    nested = RuntimeError(
        'verifier failed:\nTraceback (most recent call last):\n  File "x.py", line 1, in f\n'
        "ValueError: device 3: session already open\n"
    )
    assert describe_error(nested) == "RuntimeError: verifier failed: ValueError: device 3: session already open"
    assert describe_error(OSError("disk full")) == "OSError: disk full"
