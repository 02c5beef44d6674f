"""DeviceGroup: many virtual devices with one SLM copy, talking DEALER to the verifier."""

from __future__ import annotations

import os
import pickle
import secrets
import threading
import time
from dataclasses import replace

import zmq

from agents import protocol, security, wire
from agents.actors.clock import POLL_MS, ClockParams, poll_ms
from agents.actors.process import max_rss_bytes, memory, set_threads
from agents.device import DeviceGroupCore, DeviceSpec, RunParams
from agents.record import pack_devices
from agents.security import ClientKeys


class DeviceGroup:
    """Hosts many virtual devices with one SLM copy; talks DEALER to the verifier.

    Recovery (docs/design.md section 9; the Ray driver drives it, testbed.run.recovery):
    - this group died: a new incarnation for the same devices re-executes them from their prompts
      (deterministic: keyed randomness, batch-invariant SLM forwards, and the verifier, which forgot
      their sessions, verifies every upload anew). `skip_steps` keeps it from emitting again the
      events the driver already drained. Its ZeroMQ identity is new; the driver hands the devices
      over to it on the verifier (Verifier.handover) before it runs.
    - the verifier died: `detach` drops the socket (and any verdict still unread in it) and
      returns every device's committed session for the new verifier (VerifierCore.restore);
      `reattach` connects to the new endpoint and resends every upload still unanswered.
    """

    def __init__(
        self,
        group_id: int,
        specs: list[DeviceSpec],
        run: RunParams,
        slm_spec,
        policy_specs: dict,
        endpoint: str | None,
        clock: ClockParams,
        threads: int = 1,
        dtype: str | None = None,
        device: str = "cpu",
        record: bool = False,
        incarnation: int = 0,
        turn: str | None = None,
    ):
        from agents.lm import BatchedLM, ComputeTurn
        from agents.models import load_model
        from policies import load_policy

        t0 = time.perf_counter()
        set_threads(threads)
        self.group_id = group_id
        self.clock = clock
        self.endpoint = endpoint
        # Unique per incarnation: sessions belong to an identity, and a restarted group's must differ.
        self.zmq_identity = f"group-{group_id}.{incarnation}-{os.getpid()}-{secrets.token_hex(4)}".encode()
        self.curve = None
        policies = {name: load_policy(spec) for name, spec in policy_specs.items()}
        drafts = any(policies[s.policy_name].drafts for s in specs)
        slm = BatchedLM(load_model(slm_spec, dtype=dtype, device=device)) if drafts else None
        if slm is not None and turn:  # the content pass: forwards take turns on the cores (agents.lm)
            slm.turn = ComputeTurn(turn)
        # record: the virtual clock's content pass (agents.engine); run() returns what was emitted.
        self.core = (DeviceGroupCore.content_pass if record else DeviceGroupCore)(specs, run, slm, policies)
        self.record = record
        self.core.timings.add("startup.model_load", time.perf_counter() - t0)
        self.stats_lock = threading.Lock()
        self.new_events: list = []  # agents.events not drained yet
        self.lag_s = 0.0
        # Verifier restart: the driver's detach/reattach calls meet the run loop through these.
        self.handshake = threading.Lock()
        self.running = False
        self.detach_request, self.detached, self.reattached = threading.Event(), threading.Event(), threading.Event()
        self.snapshot: list | None = None

    def drain(self) -> dict:
        """The events (agents.events) emitted since the last call: the only way they leave the group."""
        with self.stats_lock:
            events, self.new_events = self.new_events, []
        return {"events": events, "lag_s": self.lag_s}

    def ready(self) -> bool:
        return True

    def identity(self) -> bytes:
        return self.zmq_identity

    def detach(self, timeout_s: float = 120.0) -> list:
        """The verifier died: stop using its socket and return every device's committed session
        (agents.device.SessionState). The run loop then waits for `reattach`."""
        with self.handshake:
            if not self.running:  # finished (or not started): nothing moves
                return self.core.session_states()
            self.detach_request.set()
        if not self.detached.wait(timeout_s):
            raise TimeoutError(f"group {self.group_id}: the run loop did not detach within {timeout_s} s")
        return self.snapshot

    def reattach(self, endpoint: str, curve: ClientKeys | None = None) -> None:
        """The new verifier's endpoint (after `detach`); unanswered uploads are resent there."""
        self.endpoint = endpoint
        if curve is not None:
            self.curve = curve
        self.reattached.set()

    def _connect(self):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.zmq_identity)
        if self.curve is not None:
            security.configure_client(sock, self.curve)
        sock.connect(self.endpoint)
        return sock

    def _detach_point(self, sock):
        """In the run loop: hand the driver the committed sessions, wait for the new endpoint, connect
        and resend what is unanswered. Verdicts still unread on the old socket are dropped: the
        snapshot does not have them, so the new verifier answers those uploads again."""
        sock.close()
        self.snapshot = self.core.session_states()
        self.detached.set()
        self.reattached.wait()
        self.detach_request.clear()
        self.detached.clear()
        self.reattached.clear()
        sock = self._connect()
        for upload in self.core.unanswered():
            sock.send_multipart(wire.encode(upload))
        return sock

    def run(
        self,
        t0: float | None = None,
        endpoint: str | None = None,
        curve: ClientKeys | None = None,
        skip_steps: dict[int, int] | None = None,
    ) -> dict:
        """Emulate every device to the end. `t0`: the wall clock's emulated zero (real time),
        given once every actor is up so model loading does not count as lag. `endpoint`: the
        verifier's, when it was not known at construction (groups start while the verifier loads).
        `curve`: this group's CURVE keys when the verifier requires them (agents.security).
        `skip_steps`: per device, the steps (agents.events: token positions, the final flush at
        max_new_tokens) whose events a previous incarnation already delivered: not emitted again."""
        if t0 is not None:
            self.clock = replace(self.clock, t0=t0)
        if endpoint is not None:
            self.endpoint = endpoint
        if curve is not None:
            self.curve = curve
        with self.handshake:
            self.running = True
        sock = self._connect()
        shaped = self.clock.shaped(sock)  # wall clock: uploads wait out their emulated arrival
        skip: dict[int, int] = dict(skip_steps or {})
        try:
            for o in self.core.opens():
                sock.send_multipart(wire.encode(o))
            self._opened()
            while not self.core.done:
                if self.detach_request.is_set():  # the verifier died (see detach)
                    sock = self._detach_point(sock)
                    shaped = self.clock.shaped(sock)
                    continue
                timeout = self._step(sock, shaped)
                with self.core.timings("wait"):
                    incoming = sock.poll(timeout)
                if incoming:
                    self._receive(sock)
                self._publish(skip)
            self._publish(skip)
        finally:
            sock.close()
            with self.handshake:
                self.running = False
                if self.detach_request.is_set() and not self.detached.is_set():
                    self.snapshot = self.core.session_states()
                    self.detached.set()
        # No rows: every token left as an event through drain().
        return {
            "lag_s": self.lag_s,
            "max_rss_bytes": max_rss_bytes(),
            "memory": memory(),
            "timings": self.core.timings.snapshot(),
            "lm": self.core.slm.describe() if self.core.slm else None,
            "content": pack_devices(self.core.recorded()) if self.record else None,  # ~60 B a token
            # for a verifier restart after this group ended; pickled: the driver holds every group's
            # until the end, ~30 bytes a token as bytes and ~300 as objects
            "sessions": pickle.dumps(self.core.session_states(), protocol=pickle.HIGHEST_PROTOCOL),
        }

    def _step(self, sock, shaped) -> int:
        """Move every device that can, send their uploads; returns how long to wait for verdicts (ms).

        Wall clock: a device moves when its emulated time comes (after its SLM step or the downlink
        of its verdict); lag is how late real time is when it does. Content pass: devices step in
        lockstep, every one at once (the largest SLM batch)."""
        wall = self.clock.kind == "wall"
        now = self.clock.now() if wall else None
        lockstep_wait = self.record and self.core.awaiting_verdicts()
        if self.core.has_work() and not lockstep_wait and (not wall or self.core.next_time() <= now):
            if wall:
                self.lag_s = max(0.0, now - self.core.next_time())
            uploads = self.core.step(now)
            with self.core.timings("transport", len(uploads)):
                for upload in uploads:
                    parts = wire.encode(upload)
                    if wall:
                        shaped.schedule(parts, [upload.stamp.t_arrive])
                    else:
                        sock.send_multipart(parts)
        if wall:
            shaped.flush()
            return min(self.clock.ms_until(self.core.next_time()), poll_ms(shaped.timeout()))
        return 0 if self.core.has_work() and not lockstep_wait else POLL_MS

    def _receive(self, sock) -> None:
        """Apply every verdict waiting on the socket."""
        t_recv = time.perf_counter()
        while True:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._received()
            msg = wire.decode(parts)
            if not isinstance(msg, wire.Verdict):
                raise protocol.ProtocolError(f"unexpected {type(msg).__name__} from the verifier")
            self.core.on_verdict(msg)
        self.core.timings.add("transport", time.perf_counter() - t_recv)

    def _publish(self, skip: dict[int, int]) -> None:
        """Hand the devices' new events to drain(), less those of steps already delivered (a restart)."""
        events = self.core.drain_events()
        self._drained(events)
        if skip:
            events = [e for e in events if e.step >= skip.get(e.device, 0)]
        if events:
            with self.stats_lock:
                self.new_events.extend(events)

    # Fault-injection points for tests (no-ops here; tests/testbed/chaos.py overrides them): the run
    # loop calls them where a real fault would strike.
    def _opened(self) -> None:
        """The devices' sessions were just opened."""

    def _received(self) -> None:
        """A verdict was just read from the socket, before it is handled."""

    def _drained(self, events: list) -> None:
        """The devices' events of one round, before they are published."""
