"""The distributed runtime against the single-process engine: same scenario and seed, same
trace, in every actor layout and under real timing noise (docs/design.md section 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from chaos import Chaos, chaos_driver

from testbed import results
from testbed.run import RunOptions, run_scenario
from testbed.scenario import load_scenario, override

TRACE = [
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
    "fidelity_tv",
]


def assert_same_trace(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Tokens, decisions, measured betas and emulated timestamps: bit-identical."""
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def small(**changes):
    s = load_scenario("smoke")
    return override(s, {"generation.max_new_tokens": 8, **changes})


def trace(out: Path) -> pd.DataFrame:
    df = results.read_tokens(out / "tokens.parquet")
    return df.sort_values(["device", "token_index"]).reset_index(drop=True)[TRACE]


def run(s, tmp_path: Path, name: str, **opts) -> pd.DataFrame:
    out = tmp_path / name
    run_scenario(s, RunOptions(out_dir=out, progress=False, report=False, **opts))
    return trace(out)


@pytest.fixture(scope="module")
def local_trace(tmp_path_factory):
    return run(small(), tmp_path_factory.mktemp("local"), "local", engine="local")


def test_local_engine_is_complete_and_plausible(local_trace):
    s = small()
    assert len(local_trace) == s.n_devices * 8
    # Every device commits its tokens in order, and time only moves forward.
    for _, d in local_trace.groupby("device"):
        assert list(d["token_index"]) == list(range(8))
        assert np.all(np.diff(d["t_commit"].to_numpy()) > 0)
    sent = local_trace[local_trace.transmitted]
    assert len(sent) > 0 and (sent.t_verdict > sent.t_upload_sent).all()
    # A rejected draft is replaced by the verifier's resample; an accepted one is kept.
    acc = sent[sent.accepted]
    assert (acc.token_id == acc.draft_id).all()


def test_ray_engine_reproduces_local_engine(ray_session, local_trace, tmp_path):
    ray_trace = run(small(), tmp_path, "ray", engine="ray")
    assert_same_trace(ray_trace, local_trace)


def test_layout_does_not_change_the_trace(ray_session, tmp_path):
    one = run(small(**{"actors.devices_per_group": 1}), tmp_path, "dpg1", engine="ray")
    four = run(small(**{"actors.devices_per_group": 4}), tmp_path, "dpg4", engine="ray")
    assert_same_trace(one, four)


def test_real_timing_noise_does_not_change_the_trace(ray_session, local_trace, tmp_path):
    noisy = run(
        small(**{"actors.devices_per_group": 3}),
        tmp_path,
        "noisy",
        engine="ray",
        driver=chaos_driver(Chaos(delay_s=0.02)),
    )
    assert_same_trace(noisy, local_trace)


def test_malformed_frames_get_error_replies_and_the_run_continues(ray_session, tmp_path):
    import ray
    import zmq

    from agents import codec, protocol, wire
    from agents.actors import ClockParams, Verifier
    from testbed.run import plan

    p = plan(small())
    verifier = ray.remote(num_cpus=0, max_concurrency=4)(Verifier).remote(
        p.llm, p.server, p.run.seed, p.run.vocab_size, ClockParams()
    )
    try:
        endpoint = ray.get(verifier.start.remote())
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        garbage = [[b"not a frame"], [b"HT\x09" + b"\x00" * 40, b"\x00" * 20], [b"\x00" * 5000, b"x"]]
        for parts in garbage:
            sock.send_multipart(parts)
            assert sock.poll(5000), "no reply to a malformed frame"
            with pytest.raises(protocol.ProtocolError, match="verifier error"):
                wire.decode(sock.recv_multipart())
        # A well-formed frame with a draft outside the vocabulary is rejected alone ...
        prompt = list(p.specs[0].prompt_ids)
        opened = protocol.Open(device=0, session=wire.SESSION, seq=0, prompt=prompt, seed=0, temperature=1.0)
        sock.send_multipart(wire.encode(wire.Open(opened, wire.OpenStamp(1, 0.01))))
        payload = codec.encode_payload([1, 2], [0.5, 0.25], p.run.vocab_size)

        def upload(seq: int = 0, draft: int = 1) -> list[bytes]:
            frame = protocol.Upload(
                device=0, session=wire.SESSION, seq=seq, token_index=seq, draft=draft, draft_prob=0.5, payload=payload
            )
            return wire.encode(wire.Upload(frame, wire.UploadStamp(0.0, 0.01)))

        sock.send_multipart(upload(draft=p.run.vocab_size + 5))
        assert sock.poll(5000)
        with pytest.raises(protocol.ProtocolError, match="outside the vocabulary"):
            wire.decode(sock.recv_multipart())
        # ... and the same session then gets its verdict.
        sock.send_multipart(upload())
        assert sock.poll(20000)
        verdict = wire.decode(sock.recv_multipart()).frame
        assert verdict.seq == 0 and 0 <= verdict.token < p.run.vocab_size
        # A retransmission of the same sequence number gets the same verdict again.
        sock.send_multipart(upload())
        assert sock.poll(5000)
        again = wire.decode(sock.recv_multipart()).frame
        assert again == verdict
        # A sequence number from the future (a frame went missing) is out of order.
        sock.send_multipart(upload(seq=5))
        assert sock.poll(5000)
        with pytest.raises(protocol.ProtocolError, match="expected 1") as info:
            wire.decode(sock.recv_multipart())
        assert str(int(protocol.ErrorCode.OUT_OF_ORDER)) in str(info.value)
        status = ray.get(verifier.status.remote())
        assert status["errors"] == len(garbage) + 2 and status["failure"] is None
        sock.close()
    finally:
        ray.kill(verifier)


@pytest.mark.slow
def test_two_node_cluster_run_completes(tmp_path):
    """A separate Ray cluster of two nodes (head + worker) in a subprocess, joined by --address; the
    verifier then binds every interface, so the run is encrypted (CURVE) end to end."""
    script = textwrap.dedent(f"""
        import ray, json
        from pathlib import Path
        from ray.cluster_utils import Cluster
        from testbed.run import RunOptions, run_scenario
        from testbed.scenario import load_scenario, override
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2, "include_dashboard": False}})
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        s = override(load_scenario("smoke"), {{"generation.max_new_tokens": 4}})
        summary = run_scenario(s, RunOptions(out_dir=Path({str(tmp_path)!r}), address=cluster.address,
                                             progress=False, report=False))
        nodes = len([n for n in ray.nodes() if n["Alive"]]) if ray.is_initialized() else 2
        print("RESULT", json.dumps({{"tokens": summary["tokens"], "nodes": nodes, "curve": summary["curve"],
                                    "refused": summary["curve_refused"]}}))
        cluster.shutdown()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    result = json.loads(line.removeprefix("RESULT"))
    # --address binds the verifier off loopback (0.0.0.0): CURVE on (server.curve auto), every group let in
    assert result["tokens"] == 32 and result["curve"] is True
    assert not any(result["refused"].values()), result["refused"]


def test_wall_clock_follows_real_time(ray_session, tmp_path):
    """In the wall clock emulated time is real time x time_scale: a run whose emulated span is
    ~S seconds takes about S / time_scale real seconds, and every token still arrives in order."""
    s = small(**{"clock": "wall", "time_scale": 0.5})
    out = tmp_path / "wall"
    summary = run_scenario(s, RunOptions(out_dir=out, engine="ray", progress=False, report=False))
    df = trace(out)
    assert len(df) == s.n_devices * 8
    for _, d in df.groupby("device"):
        assert np.all(np.diff(d["t_commit"].to_numpy()) > 0)
    span_real = summary["emulated_seconds"] / 0.5
    # The run also loads models and starts actors (before emulated zero), so wall >= span.
    assert summary["wall_seconds"] >= span_real
    assert span_real > 0.5  # slowed down 2x, the emulation really waited
    assert summary["lag_s"] < 0.5 * summary["emulated_seconds"]


def test_metrics_port_zero_is_any_free_port_on_metrics_host(tmp_path, capsys):
    """metrics.port 0 = any free port (as server.port), bound on metrics.host; None = no exporter."""
    import re

    s = small(**{"metrics.port": 0, "metrics.host": "127.0.0.2"})  # any 127/8 address binds on Linux
    run_scenario(
        s,
        RunOptions(
            out_dir=tmp_path / "free",
            engine="local",
            progress=False,
            report=False,
            metrics_port=s.metrics.port,
            metrics_host=s.metrics.host,
        ),
    )
    m = re.search(r"^metrics: http://127\.0\.0\.2:(\d+)/metrics$", capsys.readouterr().out, re.M)
    assert m and int(m.group(1)) > 0
    run_scenario(small(), RunOptions(out_dir=tmp_path / "off", engine="local", progress=False, report=False))
    assert "metrics:" not in capsys.readouterr().out


def test_cli_metrics_port_takes_the_field_values():
    from typer.testing import CliRunner

    from testbed.cli import app

    r = CliRunner().invoke(app, ["run", "smoke", "--engine", "local", "--metrics-port", "70000"])
    assert r.exit_code == 2 and "metrics.port: expected a value <= 65535" in r.output


def test_cli_serves_metrics_and_lingers(tmp_path):
    """`testbed run --metrics-port P --linger S`: the final counts stay scrapeable after the run."""
    import re
    import time
    import urllib.request

    from testbed.metrics import free_port

    port = free_port()
    out = tmp_path / "cli"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testbed.cli",
            "run",
            "smoke",
            "--engine",
            "local",
            "--out",
            str(out),
            "--no-report",
            "--metrics-port",
            str(port),
            "--linger",
            "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, committed = time.time() + 240, 0.0
        while time.time() < deadline and not (out / "summary.json").exists():
            time.sleep(0.5)
        assert (out / "summary.json").exists(), proc.stderr.read() if proc.poll() is not None else "timeout"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        committed = sum(float(v) for v in re.findall(r"^hlm_tokens_committed_total\{[^}]*\} (\S+)$", body, re.M))
        assert committed == load_scenario("smoke").n_devices * 16
        assert proc.poll() is None  # still lingering
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("policy", ["llm-only", "slm-only", "hlm", "rand-hlm", "u-hlm", "cu-hlm", "cu-hlm-offline"])
def test_every_preset_runs_end_to_end(policy, tmp_path):
    s = small(policy=policy)
    run(s, tmp_path, policy, engine="local")
    df = results.read_tokens(tmp_path / policy / "tokens.parquet")
    assert len(df) == s.n_devices * 8
    sent = df[df.transmitted]
    if policy == "llm-only":  # no drafts: the LLM samples every token itself
        assert df.transmitted.all() and (df.draft_id == -1).all() and (df.payload_bytes == 0).all()
    elif policy == "slm-only":  # nothing sent; every draft committed, with its shadow beta measured
        assert not df.transmitted.any() and (df.token_id == df.draft_id).all() and df.beta.notna().all()
    else:
        assert (df.loc[~df.transmitted, "token_id"] == df.loc[~df.transmitted, "draft_id"]).all()
        assert df.beta.between(0, 1).all()  # measured for every token: real or shadow
    if policy == "hlm":  # every draft, the full float32 distribution
        assert df.transmitted.all() and (sent.k == 512).all() and (sent.prob_bits == 32).all()
    if policy in ("cu-hlm", "cu-hlm-offline"):
        assert (sent.k < 512).all() and (sent.prob_bits == 8).all()


def test_prefix_tokens_served_are_summed_over_every_group():
    # The compute limit (testbed.profile) leaves the prompt tokens the prefix caches served out of the
    # prefill bound; on Ray each group has its own cache, so the run's count is every group's.
    from testbed.run.ray_driver import _every_group_served

    def lm(served, layout="packed"):
        return {
            "forward": layout,
            "prefix_cache": None if served is None else {"max_mib": 512.0, "tokens_served": served},
        }

    merged = None
    for served in (30, 0, 12):
        merged = _every_group_served(merged, lm(served))
    assert merged == lm(42)
    assert _every_group_served(lm(5, "hf"), lm(7)) == lm(12, "hf")  # the first group's layout
    assert _every_group_served(lm(None), lm(7)) == lm(None)  # no cache: nothing served
    assert _every_group_served(None, None) is None and _every_group_served(None, lm(3)) == lm(3)


def test_progress_names_the_pass_of_a_virtual_clock_run(tmp_path, capsys):
    # Both passes count every token, so the count starts again at the replay: the line says which.
    from testbed.run import plan
    from testbed.sinks import Sinks

    p = plan(small())
    sinks = Sinks(p, RunOptions(out_dir=tmp_path, progress=True, report=False, accuracy=False, engine="local"))
    sinks.progress.log_line()
    assert "content pass: tokens 0 (of at most 64)" in capsys.readouterr().err
    sinks.events([])
    sinks.progress.log_line()
    assert "replay (emulated times): tokens 0 (of at most 64)" in capsys.readouterr().err
    sinks.close()


@pytest.fixture(scope="module")
def stopping(tmp_path_factory):
    """A smoke run that stops: at the tiny tokenizer's eos, and at a stop sequence, text a device of the
    non-stopping run commits at token indices 3-4 (so at least that device provably stops mid-run)."""
    from agents.models import ByteTokenizer

    tmp = tmp_path_factory.mktemp("stop")
    full = run(small(**{"generation.stop": [], "generation.stop_at_eos": False}), tmp, "full", engine="local")
    tok, stop = ByteTokenizer(512), None
    for _, g in full.groupby("device"):
        text = tok.decode(g.token_id.tolist()[3:5])
        if len(text) == 2 and text.isascii() and text.isprintable():
            stop = text
            break
    assert stop is not None
    s = small(**{"generation.stop": [stop], "generation.stop_at_eos": True})
    return s, full, run(s, tmp, "local", engine="local"), tmp / "local"


def test_a_run_that_stops_counts_what_was_generated(stopping):
    s, full, df, out = stopping
    summary = json.loads((out / "summary.json").read_text())
    rows = results.read_tokens(out / "tokens.parquet")
    ends = rows.groupby("device").stop_reason.agg(lambda r: [x for x in r if x])
    assert (ends.str.len() == 1).all()  # one reason per device, on its last row
    assert (rows.groupby("device").apply(lambda g: g.sort_values("token_index").stop_reason.iloc[-1]) != "").all()
    reasons = rows.loc[rows.stop_reason != "", "stop_reason"].value_counts().to_dict()
    assert reasons.get("stop", 0) >= 1 and len(rows) < s.n_devices * 8
    assert summary["tokens"] == len(rows) and summary["complete"] is True
    assert summary["stops"]["reasons"] == {
        "eos": reasons.get("eos", 0),
        "stop": reasons.get("stop", 0),
        "length": reasons.get("length", 0),
        "unfinished": 0,
    }
    assert summary["stops"]["tokens_per_device"]["min"] < 8
    last = rows.sort_values("token_index").groupby("device").tail(1).set_index("device")
    assert summary["stops"]["devices"] == {
        str(d): {"tokens": int(r.token_index) + 1, "reason": r.stop_reason} for d, r in last.sort_index().iterrows()
    }
    assert summary["throughput_tokens_per_s"]["system"] == pytest.approx(len(rows) / summary["emulated_seconds"])
    import yaml

    assert yaml.safe_load((out / "scenario.yaml").read_text())["generation"]["stop"] == s.generation.stop
    # the content (tokens, decisions) up to each device's stop is the non-stopping run's
    content = [
        "device",
        "token_index",
        "token_id",
        "draft_id",
        "transmitted",
        "k",
        "accepted",
        "resampled",
        "beta",
        "uncertainty",
        "fidelity_tv",
    ]
    merged = df[content].merge(full[content], on=["device", "token_index"], suffixes=("", "_full"))
    assert len(merged) == len(df)
    for c in content[2:]:
        pd.testing.assert_series_equal(merged[c], merged[f"{c}_full"], check_names=False)


def test_ray_engine_reproduces_a_run_that_stops(ray_session, stopping, tmp_path):
    s, _, local, _ = stopping
    assert_same_trace(run(s, tmp_path, "ray", engine="ray"), local)


# A tiny pair wide enough that its fp32 logits differ between 1 and 2 torch threads here
# (tests/agents/test_lm_invariance.py: test_fp32_logits_depend_on_the_thread_count).
WIDE_PAIR = {
    "models.slm": {"kind": "tiny", "role": "slm", "layers": 1, "hidden": 512, "intermediate": 1024},
    "models.llm": {"kind": "tiny", "role": "llm", "layers": 1, "hidden": 512, "intermediate": 1024},
}


def test_threads_resolve_once_and_every_engine_computes_at_that_count(ray_session, tmp_path):
    """actors.threads: auto resolves to the usable cores, is pinned in scenario.yaml and recorded
    under compute.threads; the local engine and the Ray virtual clock (every actor at that count,
    as the models report) give the same trace, with a model whose fp32 bits depend on the count."""
    from agents.models.hardware import auto_threads

    s = small(**WIDE_PAIR, **{"generation.max_new_tokens": 6})
    assert s.actors.threads == "auto"
    traces = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        summary = run_scenario(s, RunOptions(out_dir=out, progress=False, report=False, engine=engine, accuracy=False))
        traces[engine] = trace(out)
        threads = summary["compute"]["threads"]
        assert threads["requested"] == "auto" and threads["content"] == auto_threads()
        assert threads["slm"] == threads["llm"] == auto_threads() and threads["machine_load_1m"] >= 0
        # what torch itself reported where the forwards ran (the Ray actors' processes)
        assert summary["compute"]["slm"]["threads"] == summary["compute"]["llm"]["threads"] == auto_threads()
        if engine == "ray" and auto_threads() > 1:  # two groups and the verifier take the cores in turns
            assert summary["compute"]["slm"]["compute_turn"] is not None
            assert summary["compute"]["llm"]["compute_turn"] is not None
        assert load_scenario(out / "scenario.yaml").actors.threads == auto_threads()
    assert_same_trace(traces["ray"], traces["local"])


def test_a_pinned_thread_count_is_used_and_the_wall_clock_keeps_the_split(ray_session, tmp_path):
    s = small(**{"actors.threads": 1, "generation.max_new_tokens": 4})
    summary = run_scenario(
        s, RunOptions(out_dir=tmp_path / "one", progress=False, report=False, engine="ray", accuracy=False)
    )
    assert summary["compute"]["threads"]["content"] == 1 and summary["compute"]["slm"]["threads"] == 1
    assert summary["compute"]["llm"]["threads"] == 1
    wall = small(**{"clock": "wall", "time_scale": 0.2, "actors.verifier_threads": 2, "generation.max_new_tokens": 3})
    summary = run_scenario(
        wall, RunOptions(out_dir=tmp_path / "wall", progress=False, report=False, engine="ray", accuracy=False)
    )
    t = summary["compute"]["threads"]
    assert (t["slm"], t["llm"]) == (1, 2)
    assert summary["compute"]["llm"]["threads"] == 2 and summary["compute"]["slm"]["threads"] == 1
