"""The exporter (testbed.metrics.exporter): its own registry per collector, no device label, HTTP
/metrics, and promtool's check of the exposition."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request

import pytest

from agents.events import MessageLost, TokenCommitted, UploadSent, VerifierBatch
from testbed.metrics import Collector, free_port

REQUIRE = os.environ.get("HLM_REQUIRE_PROMETHEUS") == "1"
S = "unit"


def token(device: int, t: float = 1.0) -> TokenCommitted:
    return TokenCommitted(
        dict(
            device=device,
            tier="phone",
            policy="cu-hlm",
            draft_id=5,
            uncertainty=0.5,
            transmitted=True,
            k=32,
            payload_bytes=104,
            uplink_bytes=130,
            accepted=True,
            resampled=False,
            t_draft_start=t - 0.1,
            t_commit=t,
        )
    )


def value(c: Collector, name: str, **labels) -> float | None:
    return c.registry.get_sample_value(name, {"scenario": c.scenario, **labels})


def test_exposition_has_no_device_label_and_dedicated_registries() -> None:
    a, b = Collector("a", tiers={"phone": "cu-hlm"}), Collector("b", tiers={"phone": "cu-hlm"})
    a.ingest_events([token(device=123456)])
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for fam in text_string_to_metric_families(a.exposition().decode()) for s in fam.samples]
    assert samples and all(
        set(s.labels) <= {"scenario", "tier", "policy", "actor", "reason", "verifier", "le"} for s in samples
    )
    assert all(s.labels["scenario"] == "a" for s in samples)
    assert not any("123456" in v for s in samples for v in s.labels.values())
    assert value(b, "hlm_tokens_committed_total", tier="phone", policy="cu-hlm") == 0


def test_serve_port_zero_is_off_and_http_serves_metrics() -> None:
    c = Collector(S, tiers={"phone": "cu-hlm"})
    assert c.serve(0) is None and c.url is None
    port = c.serve(-1)
    try:
        url = c.url
        assert port and url is not None and url == f"http://127.0.0.1:{port}/metrics"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=5) as r:
            assert b"hlm_tokens_committed_total" in r.read()
        c.linger(0.05)
        wall = c.wall_time()
        assert c.wall_time() == wall  # frozen after finish()
    finally:
        c.close()
    c.close()  # idempotent


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize("with_data", [False, True])
def test_promtool_check_metrics(with_data: bool) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if REQUIRE:
            pytest.fail("promtool missing and HLM_REQUIRE_PROMETHEUS=1")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    c = Collector(S, tiers={"phone": "cu-hlm", "laptop": "u-hlm"}, vocab_size=151936)
    if with_data:
        base = (0, "phone", "cu-hlm", 0, 0, False)  # device, tier, policy, step, seq, final
        events: list = [token(device=d, t=0.1 * d + 0.1) for d in range(5)]
        events += [
            VerifierBatch(0.0, 0.02, 2, 3, (0.0, 0.001)),
            UploadSent(*base, frame_bytes=100, copies=1, t_sent=0.0, wire_bytes=100),
            MessageLost(*base, direction="uplink", count=1),
        ]
        c.ingest_events(events)
        c.clock("runner", 1.0, 1.0, 0.0, {"phone": 5})
        c.protocol_errors("malformed")
    out = subprocess.run([promtool, "check", "metrics"], input=c.exposition(), capture_output=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (out.stdout, out.stderr)
