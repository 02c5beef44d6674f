"""`testbed run` with CURVE and the runner's stall check (issue 11 items 2 and 3), on the smoke
scenario's tiny models under one local Ray (run under shared/bin/offline)."""

from __future__ import annotations

import json

import pytest
from chaos import Chaos, chaos_driver
from test_runtime import assert_same_trace, run, small

from testbed.run import RunFailed, RunOptions, run_scenario
from testbed.scenario import load_scenario, override


def test_curve_on_gives_the_same_trace_as_off(ray_session, tmp_path):
    plain = run(small(**{"server.curve": "off"}), tmp_path, "off", engine="ray")
    curve = run(small(**{"server.curve": "on"}), tmp_path, "on", engine="ray")
    assert_same_trace(curve, plain)
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("off", "on")}
    assert summaries["on"]["curve"] is True and summaries["off"]["curve"] is False
    assert summaries["on"]["protocol_errors"] == 0


def test_curve_off_beyond_loopback_is_refused_at_validation():
    from testbed.scenario import ScenarioError

    with pytest.raises(ScenarioError, match="loopback only"):
        override(load_scenario("smoke"), {"server.host": "0.0.0.0", "server.curve": "off"})


def test_a_stalled_run_ends_with_a_message_naming_the_sessions_holding_it_up(ray_session, tmp_path):
    """Group 1 (devices 2, 3) opens its sessions and hangs; the other groups finish. The run ends
    after actors.stall_timeout_s with one paragraph naming them; the partial results are kept."""
    s = small(**{"actors.devices_per_group": 2, "actors.stall_timeout_s": 3})
    out = tmp_path / "stalled"
    with pytest.raises(RunFailed) as err:
        run_scenario(
            s,
            RunOptions(
                out_dir=out, engine="ray", progress=False, report=False, driver=chaos_driver(Chaos(stall_group=1))
            ),
        )
    text = str(err.value)
    assert "stalled" in text and "actors.stall_timeout_s" in text and "\n" not in text
    assert "Groups still running: 1 (devices 2-3)" in text
    assert "waiting for uploads from devices 2-3 (group 1)" in text
    assert str(out) in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["tokens"] == 6 * 8  # the three other groups' tokens


def test_restarted_actors_keep_their_curve_keys(ray_session, tmp_path):
    """A killed group and a killed verifier come back with the run's keys (the same ones: the
    others need none new), and the trace is the plain fault-free run's."""
    from test_recovery import assert_identical, scenario
    from test_recovery import run as run_chaos

    want, _ = run_chaos(tmp_path, "plain", scenario(**{"server.curve": "off"}))
    got, summary = run_chaos(
        tmp_path, "curve", scenario(**{"server.curve": "on"}), chaos=Chaos(kill=(("group:1", 30), ("verifier", 80)))
    )
    assert summary["curve"] is True and summary["restarts"]["total"] == 2
    assert_identical(got, want)


def test_hostile_messages_during_a_run_are_counted_by_reason(ray_session, tmp_path):
    """A client of our own sends a 40-byte frame (header seq 0xFFFFFFFF, a version this side does not
    speak) and an UPLOAD with a NaN arrival stamp for one of the run's devices at the verifier of a running
    `testbed run`: each gets its ERROR reply, hlm_protocol_errors_total counts them by the verifier's
    ErrorCode name, summary.json has them by reason, and the trace is the local engine's."""
    import socket
    import struct
    import threading

    import zmq

    from agents import protocol, wire
    from testbed.metrics import Collector

    with socket.socket() as probe:  # a free port for the verifier, so the hostile client knows it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = small(**{"server.port": port})
    top = 0xFFFFFFFF
    frame = struct.Struct("<2sBBIIII").pack(b"HT", 9, 2, top, top, top, 20) + bytes(20)
    replies, stop = [], threading.Event()

    def hostile() -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")  # queued until the verifier binds
        sock.send_multipart([frame, bytes(20)])
        # an UPLOAD whose emulation stamp arrives at NaN: refused at decoding, whoever owns device 3
        # (an empty-prompt OPEN would race the group's own OPEN: REFUSED or BAD_BODY by timing)
        upload = protocol.Upload(
            device=3, session=wire.SESSION, seq=0, token_index=0, draft=protocol.NO_TOKEN, llm_samples=True
        )
        sock.send_multipart([protocol.encode_frame(upload), wire.UploadStamp(0.0, float("nan")).pack()])
        while len(replies) < 2 and not stop.is_set():
            if sock.poll(100):
                replies.append(protocol.decode_frame(sock.recv_multipart()[0]))
        sock.close()

    collector = Collector(s.name)
    client = threading.Thread(target=hostile)
    client.start()
    try:
        got = run(s, tmp_path, "ray", engine="ray", collector=collector)
    finally:
        stop.set()
        client.join(10)
    want = run(small(), tmp_path, "local", engine="local")
    assert_same_trace(got, want)
    assert [(type(r), r.code) for r in replies] == [
        (protocol.Error, protocol.ErrorCode.BAD_VERSION),
        (protocol.Error, protocol.ErrorCode.BAD_BODY),
    ]
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["protocol_errors"] == 2
    assert summary["protocol_errors_by_reason"] == {"BAD_BODY": 1, "BAD_VERSION": 1}
    for reason in ("BAD_VERSION", "BAD_BODY"):
        value = collector.registry.get_sample_value("hlm_protocol_errors_total", {"scenario": s.name, "reason": reason})
        assert value == 1, (reason, value)
    assert (
        collector.registry.get_sample_value("hlm_protocol_errors_total", {"scenario": s.name, "reason": "malformed"})
        is None
    )
