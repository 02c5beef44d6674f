"""Chaos: actors killed with SIGKILL mid-run are restarted by deterministic replay, and the
virtual clock's trace (tokens.parquet, every column) is the fault-free run's (docs/design.md section 9).

The kills are real (`kill -9` of the actor's worker process, chaos.Chaos.kill) and fire at a
given number of committed tokens: a group's own, counted by the group; the run's, drained by the driver.
Tiny random models; seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from chaos import Chaos, chaos_driver

from testbed.run import RunFailed, RunOptions, run_scenario
from testbed.scenario import load_scenario, override

TOKENS = 24  # per device; 8 devices in 2 groups of 4 (smoke): 192 tokens


def scenario(**changes):
    return override(load_scenario("smoke"), {"generation.max_new_tokens": TOKENS, **changes})


def run(tmp_path: Path, name: str, s=None, chaos: Chaos | None = None, **opts) -> tuple[pd.DataFrame, dict]:
    out = tmp_path / name
    summary = run_scenario(
        s or scenario(),
        RunOptions(
            out_dir=out,
            progress=False,
            report=False,
            accuracy=False,
            driver=chaos_driver(chaos) if chaos else None,
            **opts,
        ),
    )
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
    # And actors dying during that recovery: the group's new incarnation as soon as it is made, then
    # the verifier right before the handover to the next one. Each is restarted in turn (3 restarts,
    # the default actors.max_restarts), the group's devices handed over to the rebuilt verifier.
    df, summary = run(
        tmp_path,
        "group",
        chaos=Chaos(
            kill=(("group:1", 40),),  # of its 96
            in_recovery=("group:1", "verifier"),
        ),
    )
    r = summary["restarts"]
    assert (r["groups"], r["verifier"], r["total"]) == ({"1": 2}, 1, 3)
    assert [e["actor"] for e in r["events"]] == ["device group 1", "device group 1", "verifier"]
    assert r["events"][0]["devices"] == [4, 5, 6, 7]
    assert_identical(df, fault_free[0])


def test_killed_verifier_is_rebuilt_to_the_same_trace(fault_free, tmp_path):
    # Twice: mid-run, and after every group has finished, before its content log is read (the
    # rebuilt verifier's log, restored from the groups' final sessions, is the replay's input).
    df, summary = run(tmp_path, "verifier", chaos=Chaos(kill=(("verifier", 60), ("verifier", 8 * TOKENS))))
    assert summary["restarts"]["verifier"] == 2 and summary["restarts"]["total"] == 2
    assert [e["tokens_committed"] for e in summary["restarts"]["events"]][1] == 8 * TOKENS
    assert_identical(df, fault_free[0])


def test_every_actor_restarted_once_in_one_run(fault_free, tmp_path):
    # Group thresholds count the group's own tokens (96 each), and the group kills itself there, so
    # each dies mid-run however long the driver is busy restarting the other (with the driver counting,
    # a loaded machine once let group 1 finish before it was seen at 24). The verifier's threshold
    # counts the run's drained tokens (192); it is needed to the end, so it is always restarted.
    kills = (("group:0", 24), ("group:1", 24), ("verifier", 140))
    df, summary = run(tmp_path, "all", chaos=Chaos(kill=kills))
    r = summary["restarts"]
    assert (r["verifier"], r["groups"], r["total"]) == (1, {"0": 1, "1": 1}, 3)
    assert_identical(df, fault_free[0])


def test_past_max_restarts_the_run_fails_with_one_paragraph(ray_session, tmp_path):
    # The second death is group 0's new incarnation, during its recovery: deterministic. (A second
    # kill mid-run at another token count can land on a group that finished while the driver was busy
    # with the first restart: harmless for the trace, but then no second restart is needed.)
    s = scenario(**{"actors.max_restarts": 1})
    out = tmp_path / "bounded"
    with pytest.raises(RunFailed) as err:
        run_scenario(
            s,
            RunOptions(
                out_dir=out,
                progress=False,
                report=False,
                accuracy=False,
                driver=chaos_driver(Chaos(kill=(("group:0", 20),), in_recovery=("group:0",))),
            ),
        )
    text = str(err.value)
    assert "\n" not in text and "device group 0" in text and "devices 0-3" in text
    assert "actors.max_restarts" in text and "died: ActorDiedError" in text
    assert str(out) in text
    partial = pd.read_parquet(out / "tokens.parquet")  # the partial results are kept
    assert 0 < len(partial) < 8 * TOKENS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["restarts"]["groups"] == {"0": 1} and summary["restarts"]["limit"] == 1


# --- the same recovery without Ray: the cores a restarted verifier is rebuilt in ------------------


def _drive(group, verifier, pause=None):
    """agents.engine.drive's loop, for a content pass; returns early when `pause(group)` holds
    after the uploads of a step were submitted and before their batch is verified."""
    while not group.done:
        for upload in group.step():
            if (verdict := verifier.submit(upload)) is not None:
                group.on_verdict(verdict)
        if pause is not None and pause(group):
            return
        while (ready := verifier.next_batch()) is not None:
            for verdict in verifier.verify(*ready):
                group.on_verdict(verdict)


@pytest.mark.parametrize("stops", [False, True], ids=["length", "stops"])
def test_restored_verifier_continues_bit_for_bit(stops):
    """VerifierCore.restore from the devices' committed sessions, mid-run, with uploads in flight
    (resent): the content record and the verdict log equal an uninterrupted run's, bit for bit
    (LLM caches re-fed in the original incremental calls), and so does the replayed trace. With stops
    (the tiny tokenizer's eos) too: sessions closed by a stop stay closed, the others go on."""
    from agents.device import DeviceGroupCore
    from agents.engine import replay_content, run_content
    from agents.lm import BatchedLM
    from agents.models import load_model
    from agents.record import Content
    from agents.verifier import VerifierCore
    from policies import load_policy
    from testbed.run import plan

    p = plan(scenario(**({"generation.stop_at_eos": True} if stops else {})))
    policies = lambda: {name: load_policy(spec) for name, spec in p.policy_specs.items()}  # noqa: E731
    slm, llm = (lambda: BatchedLM(load_model(p.slm))), (lambda: BatchedLM(load_model(p.llm)))
    ref = run_content(p.specs, p.run, p.server, slm(), llm(), policies()).content

    group = DeviceGroupCore.content_pass(p.specs, p.run, slm(), policies())
    lost = VerifierCore.content_pass(llm(), p.server, p.run.seed, p.run.vocab_size)
    lost.open(group.opens())
    _drive(group, lost, pause=lambda g: sum(len(d.rows) for d in g.devices.values()) >= 60 and g.unanswered())
    assert group.unanswered() and not group.done  # uploads in flight when the verifier is lost
    new = VerifierCore.content_pass(llm(), p.server, p.run.seed, p.run.vocab_size)
    new.restore(group.session_states())
    assert {k: v for k, v in new.log.items()} == {k: v for k, v in lost.log.items() if k in new.log}
    for upload in group.unanswered():  # the groups resend what is unanswered
        assert new.submit(upload) is None
    _drive(group, new)
    got = Content(group.recorded(), new.log)
    assert got.verdicts == ref.verdicts
    for device, record in ref.devices.items():
        np.testing.assert_array_equal([r.fidelity_tv for r in got.devices[device]], [r.fidelity_tv for r in record])
        assert got.devices[device] == record
    want = replay_content(p.specs, p.run, p.server, policies(), ref).rows
    assert replay_content(p.specs, p.run, p.server, policies(), got).rows == want
    ended = [r["stop_reason"] for r in want if r["stop_reason"]]
    assert len(ended) == len(p.specs) and ("eos" in ended) == stops and len(want) <= len(p.specs) * TOKENS


def test_only_the_driver_can_hand_a_session_over(ray_session):
    """Verifier.handover (a Ray call) reserves the devices for the restarted group's identity: an
    OPEN from another client is refused, the reserved identity's is admitted; a client message can
    never move a session."""
    import ray
    import zmq

    from agents import protocol, wire
    from agents.actors import ClockParams, Verifier
    from testbed.run import plan

    p = plan(scenario())
    verifier = ray.remote(num_cpus=0, max_concurrency=4)(Verifier).remote(
        p.llm, p.server, p.run.seed, p.run.vocab_size, ClockParams(), allowed_devices=[0, 1]
    )
    ctx = zmq.Context.instance()

    def client(identity: bytes):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(endpoint)
        return sock

    def open_reply(sock, device: int):
        """None when admitted (an OPEN has no reply), else the ERROR reply as a ProtocolError."""
        frame = protocol.Open(
            device=device, session=wire.SESSION, seq=0, prompt=p.specs[device].prompt_ids, seed=0, temperature=1.0
        )
        sock.send_multipart(wire.encode(wire.Open(frame, wire.OpenStamp(4, 0.01))))
        if not sock.poll(3000):
            return None
        try:
            return wire.decode(sock.recv_multipart())
        except protocol.ProtocolError as exc:
            return exc

    try:
        endpoint = ray.get(verifier.start.remote())
        first, thief, heir = client(b"group-0.0"), client(b"thief"), client(b"group-0.1")
        assert open_reply(first, 0) is None  # admitted (an OPEN has no reply)
        ray.get(verifier.handover.remote([0], b"group-0.1"))
        refused = open_reply(thief, 0)
        assert isinstance(refused, protocol.ProtocolError) and "reserved" in str(refused)
        assert open_reply(heir, 0) is None
        again = open_reply(thief, 0)
        assert isinstance(again, protocol.ProtocolError) and "already open" in str(again)
        assert ray.get(verifier.status.remote())["failure"] is None
    finally:
        for sock in (first, thief, heir):
            sock.close()
        ray.kill(verifier)


def test_wall_clock_recovers_every_token_once(ray_session, tmp_path):
    """Wall clock: the same recovery works (real timing differs, so the trace is not compared to a
    fault-free one): the run completes with every token exactly once."""
    s = scenario(**{"clock": "wall", "time_scale": 0.5})
    df, summary = run(tmp_path, "wall", s, chaos=Chaos(kill=(("group:0", 20), ("verifier", 100))))
    assert (summary["restarts"]["groups"], summary["restarts"]["verifier"]) == ({"0": 1}, 1)
    assert len(df) == 8 * TOKENS and not df.duplicated(["device", "token_index"]).any()
    for _, d in df.groupby("device"):
        assert list(d["token_index"]) == list(range(TOKENS))


def test_a_run_that_stops_recovers_to_the_same_trace(ray_session, tmp_path):
    """Restarted actors replay to the same stops: every actor killed once in a run whose devices stop
    at the tiny tokenizer's eos."""
    s = scenario(**{"generation.stop_at_eos": True})
    want, ref = run(tmp_path, "ref", s)
    assert ref["stops"]["reasons"]["eos"] > 0 and ref["complete"] and ref["tokens"] < 8 * TOKENS
    kills = (("group:0", 20), ("group:1", 20), ("verifier", ref["tokens"] // 2))
    df, summary = run(tmp_path, "all", s, chaos=Chaos(kill=kills))
    assert summary["restarts"]["total"] == 3 and summary["stops"] == ref["stops"]
    assert_identical(df, want)
