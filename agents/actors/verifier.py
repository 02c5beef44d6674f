"""Verifier: one LLM behind a ZeroMQ ROUTER, serving in a background thread."""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from dataclasses import replace

import zmq

from agents import protocol, security, wire
from agents.actors.admission import Admission, Limits
from agents.actors.clock import POLL_MS, ClockParams, poll_ms
from agents.actors.process import max_rss_bytes, memory, set_threads
from agents.record import PackedVerdicts
from agents.security import ServerKeys
from agents.verifier import ServerProfile, VerifierCore


class Verifier:
    """One LLM behind a ZeroMQ ROUTER. `start()` binds and serves in a background thread.

    Client input can only ever produce an ERROR reply and a count in `errors` (docs/design.md
    section 8): every message is decoded and checked on its own (agents.actors.admission), and a
    session belongs to the ZeroMQ identity that opened it. Limits, each None for its default:
    - allowed_devices: the device ids the run has (None: any);
    - max_sessions: sessions in total (expected_sessions when given, else DEFAULT_MAX_SESSIONS);
      with expected_sessions, no session beyond the run's devices can hold batches back;
    - max_sessions_per_identity (max_sessions), max_prompt_tokens (the model's positions) and
      max_prefill_tokens_per_identity (DEFAULT_MAX_PREFILL_TOKENS): prompt tokens one client
      may have prefilled over the run;
    - max_messages_per_poll: messages read before batches get their turn again (a flood from
      one client cannot starve the batch release).
    `curve` (agents.security.ServerKeys): CURVE on the ROUTER; only the allow-listed client
    keys complete a handshake.
    """

    DEFAULT_MAX_SESSIONS = 4096
    DEFAULT_MAX_PREFILL_TOKENS = 1 << 21
    RCVHWM = 64  # messages queued per connection before libzmq stops reading it (back-pressure, no loss)
    MAX_ERROR_LOG = 1000

    def __init__(
        self,
        llm_spec,
        server: ServerProfile,
        seed: int,
        vocab_size: int,
        clock: ClockParams,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int = 2,
        max_frame_bytes: int = protocol.MAX_FRAME_BYTES,
        lm=None,
        expected_sessions: int = 0,
        allowed_devices=None,
        max_sessions: int | None = None,
        max_sessions_per_identity: int | None = None,
        max_prompt_tokens: int | None = None,
        max_prefill_tokens_per_identity: int | None = None,
        max_messages_per_poll: int = 256,
        dtype: str | None = None,
        device: str = "cpu",
        mode: str = "emulate",
        curve: ServerKeys | None = None,
        turn: str | None = None,
    ):
        from agents.lm import BatchedLM, ComputeTurn
        from agents.models import load_model

        t0 = time.perf_counter()
        set_threads(threads)
        # `lm`: an already loaded BatchedLM (benchmarks share one model between runs).
        # mode: "content", the virtual clock's content pass (agents.engine); "emulate", the wall clock's one pass
        core = {"emulate": VerifierCore, "content": VerifierCore.content_pass}[mode]
        self.core = core(
            lm or BatchedLM(load_model(llm_spec, dtype=dtype, device=device)),
            server,
            seed,
            vocab_size,
            expected_sessions,
        )
        if turn and lm is None:  # the content pass: forwards take turns on the cores (agents.lm)
            self.core.llm.turn = ComputeTurn(turn)
        self.core.timings.add("startup.model_load", time.perf_counter() - t0)
        self.clock = clock
        self.host, self.port = host, port
        self.max_frame_bytes = max_frame_bytes
        sessions = max_sessions or expected_sessions or self.DEFAULT_MAX_SESSIONS
        self.admission = Admission(
            self.core,
            Limits(
                allowed_devices=None if allowed_devices is None else frozenset(int(d) for d in allowed_devices),
                max_sessions=sessions,
                max_sessions_per_identity=max_sessions_per_identity or sessions,
                max_prompt_tokens=max_prompt_tokens or getattr(self.core.llm, "max_positions", 1 << 20),
                max_prefill_tokens=max_prefill_tokens_per_identity or self.DEFAULT_MAX_PREFILL_TOKENS,
            ),
        )
        self.max_messages_per_poll = max(1, max_messages_per_poll)
        self.commands: collections.deque = collections.deque()  # driver calls run in the serving thread (_in_loop)
        self.errors = 0
        self.error_codes: collections.Counter = collections.Counter()  # ErrorCode -> count
        self.error_log: list[str] = []
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()
        self.failure: str | None = None
        self.batches_seen = 0
        self.lag_s = 0.0
        self.curve = curve  # None: plain ZeroMQ (loopback); else CURVE with this allow-list
        self.allow_list: security.AllowList | None = None

    def start(self) -> str:
        """Bind the ROUTER and serve in a background thread; returns the endpoint."""
        ctx = zmq.Context.instance()
        if self.curve is not None:  # own context: its ZAP handler must cover this socket alone
            ctx = self.ctx = zmq.Context()
            self.allow_list = security.AllowList(ctx, self.curve.allowed)
        self.sock = ctx.socket(zmq.ROUTER)
        if self.curve is not None:
            security.configure_server(self.sock, self.curve)
            self.allow_list.watch(self.sock)  # counts refused handshakes (status()["curve_refused"])
        self.sock.setsockopt(zmq.LINGER, 0)
        # MAXMSGSIZE bounds each part (a bigger one drops the connection) and RCVHWM the
        # messages queued per connection; parts beyond wire.PARTS are discarded unread (_recv).
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes + 4096)
        self.sock.setsockopt(zmq.RCVHWM, self.RCVHWM)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 0)  # a connected client's identity cannot be taken over
        if self.port:
            self.sock.bind(f"tcp://{self.host}:{self.port}")
        else:
            self.port = self.sock.bind_to_random_port(f"tcp://{self.host}")
        self.shaped = self.clock.shaped(self.sock)
        self.thread = threading.Thread(target=self._serve, name="verifier", daemon=True)
        self.thread.start()
        return f"tcp://{self.host}:{self.port}"

    def set_t0(self, t0: float) -> None:
        """The wall clock's emulated zero, set before any device starts (see DeviceGroup.run)."""
        self.clock = replace(self.clock, t0=t0)
        self.shaped = self.clock.shaped(self.sock)  # wall clock: verdicts leave when verification ends

    def status(self) -> dict:
        """`errors`: protocol errors answered, in all and by ErrorCode name (`error_codes`, the reason
        label of hlm_protocol_errors_total); `curve_refused`: clients CURVE refused (AllowList.counts;
        None without CURVE)."""
        return {
            "errors": self.errors,
            "error_codes": {getattr(c, "name", str(c)): n for c, n in sorted(self.error_codes.items())},
            "curve_refused": self.allow_list.counts() if self.allow_list is not None else None,
            "lag_s": self.lag_s,
            "max_rss_bytes": max_rss_bytes(),
            "memory": memory(),
            "error_log": self.error_log[-20:],
            "failure": self.failure,
            "batches": len(self.core.batches),
            "timings": self.core.timings.snapshot(),
            "lm": self.core.llm.describe() if hasattr(self.core.llm, "describe") else None,
        }

    def waiting_on(self) -> dict:
        """VerifierCore.waiting_on, plus `unopened`: the run's devices with no session yet."""
        w = self.core.waiting_on()
        w["unopened"] = self.admission.unopened()
        return w

    def pid(self) -> int:
        return os.getpid()

    def handover(self, devices: list[int], identity: bytes) -> None:
        """Driver-authorised, through Ray only (never a client message): the group that hosted
        `devices` died. Their sessions are forgotten (VerifierCore.reset) and reserved for
        `identity`, the restarted group's, which opens them again; no other client can."""

        def work():
            self.core.reset(devices)
            self.admission.handover(devices, identity)

        self._in_loop(work)

    def restore(self, states: list, owners: dict[int, bytes]) -> None:
        """Driver-authorised, before start(): rebuild the sessions of a dead verifier from the
        devices' committed state (agents.device.SessionState; VerifierCore.restore). `owners`: the
        identity of the group that hosts each device (its uploads are resent there after reattach)."""
        assert self.thread is None, "restore before start"
        self.core.restore(states)
        for st in states:
            device = st.open.frame.device
            self.admission.restored(device, len(st.open.frame.prompt), owners[device])

    def _in_loop(self, work, timeout_s: float = 60.0) -> None:
        """Run `work` in the serving thread between two polls (it owns the core and the socket)."""
        if self.thread is None or not self.thread.is_alive():
            work()
            return
        done, box = threading.Event(), {}
        self.commands.append((work, done, box))
        if not done.wait(timeout_s):
            raise TimeoutError(f"the verifier's serving thread did not take a call within {timeout_s} s")
        if "error" in box:
            raise box["error"]

    def drain_batches(self) -> list:
        new = self.core.batches[self.batches_seen :]
        self.batches_seen += len(new)
        return new

    def content_log(self) -> dict:
        """mode="content": every verdict's content, for the driver's replay (agents.engine), packed."""
        return PackedVerdicts.of(self.core.log)

    def batches(self) -> list:
        return list(self.core.batches)

    def stop(self) -> None:
        self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()
        if self.allow_list is not None:
            self.allow_list.stop()
            if not self.thread.is_alive():
                self.ctx.term()

    def _serve(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # the run reports it; the socket stays answerable until stop
            import traceback

            self.failure = "".join(traceback.format_exception(exc))

    def _loop(self) -> None:
        """Serve until stop(): the driver's calls, then the clients' messages (a bounded round, so a
        flood cannot starve the batches), then every batch the batching rule releases."""
        wall = self.clock.kind == "wall"
        while not self.stop_flag.is_set():
            while self.commands:
                work, done, box = self.commands.popleft()
                try:
                    work()
                except Exception as exc:  # the caller (the driver) gets it
                    box["error"] = exc
                done.set()
            timeout = POLL_MS
            if wall:
                start = self.core.batch_start()
                timeout = min(self.clock.ms_until(math.inf if start is None else start), poll_ms(self.shaped.timeout()))
            if self.sock.poll(timeout):
                self._read_round(wall)
            self._verify_ready(wall)
            if wall:
                self.shaped.flush()

    def _read_round(self, wall: bool) -> None:
        """Admit and submit up to max_messages_per_poll client messages. The OPENs of a round are
        prefilled together, before anything that may refer to them."""
        core, opens = self.core, []
        for _ in range(self.max_messages_per_poll):
            try:
                identity, parts, extra = self._recv()
            except zmq.Again:
                break
            self._received()
            # Decoding and checking one client's message: whatever fails is answered to that client
            # alone. What follows (prefill, the LLM forward) is not input handling: its failure is a
            # bug and ends the run (see _serve).
            try:
                msg = self.admission.admit(identity, parts, extra, opens)
            except protocol.ProtocolError as exc:
                self._error(identity, exc)
                continue
            except Exception as exc:
                self._error(
                    identity,
                    protocol.ProtocolError(
                        f"internal error checking a message ({type(exc).__name__}: {exc})", protocol.ErrorCode.INTERNAL
                    ),
                )
                continue
            if msg is None:  # an admitted OPEN: its prefill waits for the others of this round
                continue
            if opens:  # open sessions before anything that may refer to them
                core.open(opens)
                opens = []
            if wall:  # the verifier's clock, not the device's link model
                msg = replace(msg, stamp=replace(msg.stamp, t_arrive=self.clock.now()))
            try:
                verdict = core.submit(msg)
            except protocol.ProtocolError as exc:
                if exc.device is None:
                    exc.device, exc.seq = msg.frame.device, msg.frame.seq
                self._error(identity, exc)
                continue
            if verdict is not None:
                self.sock.send_multipart([identity, *wire.encode(verdict)])
        if opens:
            core.open(opens)

    def _verify_ready(self, wall: bool) -> None:
        """Verify every batch the batching rule releases and send its verdicts (the wall clock holds
        each until its emulated verification ends)."""
        core = self.core
        while (ready := core.next_batch(self.clock.now() if wall else None)) is not None:
            verdicts = core.verify(*ready)
            if wall:  # real compute slower than the profile delays the verdicts: that is lag
                now = self.clock.now()
                self.lag_s = max(0.0, now - core.t_free)
                core.t_free = max(core.t_free, now)
            for verdict in verdicts:
                if wall:
                    verdict = replace(verdict, stamp=replace(verdict.stamp, t_sent=max(verdict.stamp.t_sent, now)))
                parts = [self.admission.owners[verdict.frame.device], *wire.encode(verdict)]
                if wall:
                    self.shaped.schedule(parts, [verdict.stamp.t_sent])
                else:
                    self.sock.send_multipart(parts)

    def _recv(self) -> tuple[bytes, list[bytes], int]:
        """One message: (identity, its first wire.PARTS parts, how many more it had). Parts
        beyond the protocol's are read and dropped one by one, never kept. Raises zmq.Again
        when nothing is waiting."""
        sock = self.sock
        identity = sock.recv(zmq.NOBLOCK)
        parts: list[bytes] = []
        extra = 0
        while sock.getsockopt(zmq.RCVMORE):  # the rest of a message is there once its first part is
            if len(parts) < wire.PARTS:
                parts.append(sock.recv(zmq.NOBLOCK))
            else:
                sock.recv(zmq.NOBLOCK, copy=False)
                extra += 1
        return identity, parts, extra

    def _error(self, identity: bytes, exc: protocol.ProtocolError) -> None:
        """Malformed, refused or out-of-order input: an error reply and a counter, never a crash.
        Never raises; the log keeps the latest MAX_ERROR_LOG messages."""
        self.errors += 1
        self.error_codes[exc.code] += 1
        self.error_log.append(str(exc)[:500])
        if len(self.error_log) > self.MAX_ERROR_LOG:
            del self.error_log[: len(self.error_log) - self.MAX_ERROR_LOG // 2]
        try:
            self.sock.send_multipart([identity, *wire.error_message(exc)], zmq.NOBLOCK)
        except Exception as send_exc:  # a gone or full peer: the reply is dropped, the server goes on
            self.error_log.append(f"error reply not sent: {type(send_exc).__name__}: {send_exc}"[:500])

    def _received(self) -> None:
        """A fault-injection point for tests (no-op; tests/testbed/chaos.py): a client message was
        just read, before it is admitted."""
