"""CURVE on the verifier socket (docs/design.md section 9, issue 11 item 2): a real Verifier with
CURVE on loopback (run under shared/bin/offline), real pyzmq clients. A client with no keys, one
with the wrong server key and one whose key is not on the allow-list are all refused in the
handshake; none reaches the verifier, and a legitimate CURVE session then gets exactly the
verdicts it gets on a plain verifier with nobody else there."""

from __future__ import annotations

import time

import pytest
import zmq
from test_hostile import Client, assert_serving, baseline, lm, open_parts, run_session, serve, step_upload  # noqa: F401
from zmq.utils.monitor import recv_monitor_message

from agents import security, wire
from agents.security import ClientKeys, Keypair, RunKeys


class CurveClient(Client):
    """test_hostile's Client, with CURVE keys (None: plain) and a monitor of its handshakes."""

    def __init__(self, endpoint: str, identity: bytes, keys: ClientKeys | None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        if keys is not None:
            security.configure_client(self.sock, keys)
        self.monitor = self.sock.get_monitor_socket()
        self.sock.connect(endpoint)

    def try_send(self, parts) -> None:
        """Send without blocking: a DEALER whose handshakes fail has no peer, and would block."""
        try:
            self.sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def handshakes(self, seconds: float = 1.0) -> set[str]:
        """Names of the handshake events seen within `seconds` (HANDSHAKE_SUCCEEDED, _FAILED_...)."""
        seen, t0 = set(), time.time()
        while time.time() - t0 < seconds:
            if self.monitor.poll(50):
                name = zmq.Event(recv_monitor_message(self.monitor)["event"]).name
                if name.startswith("HANDSHAKE"):
                    seen.add(name)
        return seen

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close()
        super().close()


def test_curve_refuses_clients_without_the_run_keys_and_serves_the_legitimate_one(serve, lm):  # noqa: F811 - fixtures
    want = baseline(serve, lm)  # a plain verifier, one client: the verdicts to expect
    keys = RunKeys.new(1)
    v = serve(curve=keys.for_server())
    hostile = {
        "no keys": None,
        "wrong server key": ClientKeys(Keypair.new().public, keys.clients[0]),  # even with an allowed keypair
        "key not on the allow-list": ClientKeys(keys.server.public, Keypair.new()),
    }
    clients = {name: CurveClient(v.endpoint, name.encode(), k) for name, k in hostile.items()}
    good = CurveClient(v.endpoint, b"group-0", keys.for_client(0))
    try:
        for c in clients.values():  # each tries to take the legitimate device's session first
            c.try_send(open_parts(7))
            c.try_send(wire.encode(step_upload(lm, 7, 0)))
        for name, c in clients.items():
            seen = c.handshakes()
            assert "HANDSHAKE_SUCCEEDED" not in seen and any(e.startswith("HANDSHAKE_FAILED") for e in seen), (
                name,
                seen,
            )
            assert c.silent(0.2), name
        assert v.allow_list.denied >= 1  # the unlisted key reached the ZAP handler and was refused there
        # Verifier.status (and summary.json "curve_refused"): every refused handshake is counted, the
        # two that never reach ZAP (no keys: mechanism mismatch; wrong server key: HELLO does not decrypt)
        # included; a client retrying counts once per attempt.
        refused = v.status()["curve_refused"]
        assert refused["denied_keys"] == v.allow_list.denied
        assert refused["handshakes_refused"] >= len(hostile) and refused["handshakes_refused"] >= refused["denied_keys"]
        print(f"\ncurve_refused after the three hostile clients: {refused}")
        # Nothing reached the verifier: no session, no error reply, no count.
        assert_serving(v, errors=0)
        assert not v.core.sessions and not v.admission.owners
        assert good.handshakes() == {"HANDSHAKE_SUCCEEDED"}
        assert run_session(good, lm, [7]) == want
        for c in clients.values():  # still refused, still silent, after the run
            c.try_send(open_parts(8))
            assert c.silent(0.3)
        assert_serving(v, errors=0)
        assert set(v.admission.owners) == {7}
    finally:
        for c in [*clients.values(), good]:
            c.close()


def test_curve_mode_resolution():
    assert security.curve_on("auto", "0.0.0.0") and security.curve_on("auto", "10.1.2.3")
    assert not security.curve_on("auto", "127.0.0.1") and not security.curve_on("auto", "::1")
    assert security.curve_on("on", "127.0.0.1") and not security.curve_on("off", "localhost")
    with pytest.raises(ValueError, match="loopback only"):
        security.curve_on("off", "0.0.0.0")
    k = Keypair.new()
    assert k.secret.decode() not in repr(k) and len(k.public) == 40
