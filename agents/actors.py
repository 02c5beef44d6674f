"""Ray actors: `DeviceGroup` (many virtual devices, one SLM) and `Verifier` (ZeroMQ ROUTER,
one LLM). Both wrap the transport-free cores of agents.device and agents.verifier; this
module only moves frames and, in the wall clock, waits real time.

ZeroMQ messages are multipart: [wire frame, emulation stamp]. The wire frame is what a real
device and server would exchange (agents.protocol); the stamp carries what only an
emulation has: emulated send/arrival times and the draft probabilities x_d used to
measure beta; one type per message, agents.wire).

Clocks (docs/design.md section 2), one code path:
- virtual: uploads carry the emulated arrival the link model computed; the verifier
  releases a batch only when no earlier arrival can still come (VerifierCore.next_batch).
- wall: emulated time = (real time - t0) * time_scale. Groups sleep until a device's
  emulated time before drafting and hold each message until its emulated arrival; the
  verifier stamps arrivals with the real clock, releases batches when the clock reaches
  their start, and holds verdicts until the emulated verification ends.
"""
from __future__ import annotations

import collections
import math
import os
import pickle
import random
import secrets
import signal
import threading
import time
from dataclasses import dataclass, replace

import zmq

from agents import protocol, security, wire
from agents.device import DeviceGroupCore, DeviceSpec, RunParams
from agents.engine import PackedVerdicts, pack_devices
from agents.events import TokenCommitted
from agents.security import ClientKeys, ServerKeys
from agents.verifier import ServerProfile, VerifierCore

POLL_MS = 50


def _ms(seconds: float | None) -> int:
    return POLL_MS if seconds is None else min(POLL_MS, math.ceil(seconds * 1000))


@dataclass(frozen=True)
class ClockParams:
    kind: str = "virtual"  # virtual | wall
    time_scale: float = 1.0  # emulated seconds per real second (wall only)
    t0: float = 0.0  # real time (time.time()) of emulated zero (wall only)
    chaos_delay_s: float = 0.0  # tests: random real delay before handling each message
    stall_group: int = -1  # tests: this group opens its sessions, then hangs (the runner's stall check)

    def now(self) -> float:
        return (time.time() - self.t0) * self.time_scale

    def ms_until(self, t: float, cap: int = POLL_MS) -> int:
        """Real milliseconds until emulated time t (0 if past, at most `cap`)."""
        if math.isinf(t):
            return cap
        return max(0, min(cap, math.ceil((self.t0 + t / self.time_scale - time.time()) * 1000)))

    def shaped(self, sock):
        """The wall clock's delivery schedule for a socket (netem's shaped transport, fed
        with arrival times the devices' link models already computed)."""
        from netem.transport import ShapedSender, zmq_deliver

        return ShapedSender(zmq_deliver(sock), time_scale=1.0 / self.time_scale, epoch=self.t0, clock=time.time)

    def chaos(self, rng: random.Random) -> None:
        if self.chaos_delay_s > 0:
            time.sleep(rng.random() * self.chaos_delay_s)


def max_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory() -> dict:
    """This process's memory now: resident anonymous (private: activations, KV caches, converted
    weights) vs file-backed (memory-mapped safetensors, shared by every process loading the same
    folder), and the peak."""
    out = {"peak_rss_bytes": max_rss_bytes()}
    try:
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key.lower().replace("rss", "rss_") + "_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


class DeviceGroup:
    """Hosts many virtual devices with one SLM copy; talks DEALER to the verifier.

    Recovery (docs/design.md section 9; the runner drives it, testbed.runner._run_ray):
    - this group died: a new incarnation for the same devices re-executes them from their prompts
      (deterministic: keyed randomness, batch-invariant SLM forwards, and the verifier, which forgot
      their sessions, verifies every upload anew). `skip_steps` keeps it from emitting again the
      events the driver already drained. Its ZeroMQ identity is new; the driver hands the devices
      over to it on the verifier (Verifier.handover) before it runs.
    - the verifier died: `detach` drops the socket (and any verdict still unread in it) and
      returns every device's committed session for the new verifier (VerifierCore.restore);
      `reattach` connects to the new endpoint and resends every upload still unanswered.
    """

    def __init__(self, group_id: int, specs: list[DeviceSpec], run: RunParams, slm_spec, policy_specs: dict,
                 endpoint: str | None, clock: ClockParams, threads: int = 1, dtype: str | None = None, device: str = "cpu",
                 record: bool = False, incarnation: int = 0, turn: str | None = None):
        from agents.lm import BatchedLM, ComputeTurn
        from agents.models import load_model
        from policies import load_policy

        t0 = time.perf_counter()
        _set_threads(threads)
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
        self.core = DeviceGroupCore(specs, run, slm, policies, record=record)
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

    def chaos_kill(self) -> None:
        """Chaos tests (RunOptions.chaos_kill): kill -9 this actor's process, mid-run."""
        os.kill(os.getpid(), signal.SIGKILL)

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

    def run(self, t0: float | None = None, endpoint: str | None = None, curve: ClientKeys | None = None,
            skip_steps: dict[int, int] | None = None, die_at_tokens: int | None = None) -> dict:
        """Emulate every device to the end. `t0`: the wall clock's emulated zero (real time),
        given once every actor is up so model loading does not count as lag. `endpoint`: the
        verifier's, when it was not known at construction (groups start while the verifier loads).
        `curve`: this group's CURVE keys when the verifier requires them (agents.security).
        `skip_steps`: per device, the steps (agents.events: token positions, the final flush at
        max_new_tokens) whose events a previous incarnation already delivered: not emitted again.
        `die_at_tokens` (chaos tests, RunOptions.chaos_kill): kill -9 this process once its devices
        have committed that many tokens. Counted here, not by the driver, so the kill always lands
        mid-run: a driver busy with another restart may otherwise see the group only once it is done."""
        if t0 is not None:
            self.clock = replace(self.clock, t0=t0)
        if endpoint is not None:
            self.endpoint = endpoint
        if curve is not None:
            self.curve = curve
        with self.handshake:
            self.running = True
        sock = self._connect()
        rng = random.Random(self.group_id)
        wall = self.clock.kind == "wall"
        shaped = self.clock.shaped(sock)  # wall clock: uploads wait out their emulated arrival
        skip: dict[int, int] = dict(skip_steps or {})
        self.die_at_tokens, self.tokens_committed = die_at_tokens, 0
        timings = self.core.timings
        try:
            for o in self.core.opens():
                sock.send_multipart(wire.encode(o))
            if self.group_id == self.clock.stall_group:
                threading.Event().wait()  # for ever: ray.kill ends it
            while not self.core.done:
                if self.detach_request.is_set():  # the verifier died (see detach)
                    sock = self._detach_point(sock)
                    shaped = self.clock.shaped(sock)
                    continue
                # Wall clock: a device moves when its emulated time comes (after its SLM step
                # or the downlink of its verdict); lag is how late real time is when it does.
                now = self.clock.now() if wall else None
                # Content pass: step in lockstep, every device at once (the largest SLM batch).
                lockstep_wait = self.record and self.core.awaiting_verdicts()
                if self.core.has_work() and not lockstep_wait and (not wall or self.core.next_time() <= now):
                    if wall:
                        self.lag_s = max(0.0, now - self.core.next_time())
                    uploads = self.core.step(now)
                    with timings("transport", len(uploads)):
                        for upload in uploads:
                            parts = wire.encode(upload)
                            if wall:
                                shaped.schedule(parts, [upload.stamp.t_arrive])
                            else:
                                sock.send_multipart(parts)
                if wall:
                    shaped.flush()
                    timeout = min(self.clock.ms_until(self.core.next_time()), _ms(shaped.timeout()))
                else:
                    timeout = 0 if self.core.has_work() and not lockstep_wait else POLL_MS
                with timings("wait"):
                    incoming = sock.poll(timeout)
                if incoming:
                    t_recv = time.perf_counter()
                    while True:
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.clock.chaos(rng)
                        msg = wire.decode(parts)
                        if not isinstance(msg, wire.Verdict):
                            raise protocol.ProtocolError(f"unexpected {type(msg).__name__} from the verifier")
                        self.core.on_verdict(msg)
                    timings.add("transport", time.perf_counter() - t_recv)
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
        return {"lag_s": self.lag_s, "max_rss_bytes": max_rss_bytes(), "memory": memory(),
                "timings": timings.snapshot(), "lm": self.core.slm.describe() if self.core.slm else None,
                "content": pack_devices(self.core.recorded()) if self.record else None,  # ~60 B a token
                # for a verifier restart after this group ended; pickled: the driver holds every group's
                # until the end, ~30 bytes a token as bytes and ~300 as objects
                "sessions": pickle.dumps(self.core.session_states(), protocol=pickle.HIGHEST_PROTOCOL)}

    def _publish(self, skip: dict[int, int]) -> None:
        """Hand the devices' new events to drain(), less those of steps already delivered (a restart)."""
        events = self.core.drain_events()
        if self.die_at_tokens is not None:
            self.tokens_committed += sum(isinstance(e, TokenCommitted) for e in events)
            if self.tokens_committed >= self.die_at_tokens:
                self.chaos_kill()
        if skip:
            events = [e for e in events if e.step >= skip.get(e.device, 0)]
        if events:
            with self.stats_lock:
                self.new_events.extend(events)


class Verifier:
    """One LLM behind a ZeroMQ ROUTER. `start()` binds and serves in a background thread.

    Client input can only ever produce an ERROR reply and a count in `errors` (docs/design.md
    section 8): every message is decoded and checked on its own, and a session belongs to the
    ZeroMQ identity that opened it. Limits, each None for its default:
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

    def __init__(self, llm_spec, server: ServerProfile, seed: int, vocab_size: int, clock: ClockParams,
                 host: str = "127.0.0.1", port: int = 0, threads: int = 2, max_frame_bytes: int = protocol.MAX_FRAME_BYTES,
                 lm=None, expected_sessions: int = 0, allowed_devices=None, max_sessions: int | None = None,
                 max_sessions_per_identity: int | None = None, max_prompt_tokens: int | None = None,
                 max_prefill_tokens_per_identity: int | None = None, max_messages_per_poll: int = 256,
                 dtype: str | None = None, device: str = "cpu", mode: str = "emulate", curve: ServerKeys | None = None,
                 turn: str | None = None):
        from agents.lm import BatchedLM, ComputeTurn
        from agents.models import load_model

        t0 = time.perf_counter()
        _set_threads(threads)
        # `lm`: an already loaded BatchedLM (benchmarks share one model between runs).
        self.core = VerifierCore(lm or BatchedLM(load_model(llm_spec, dtype=dtype, device=device)), server, seed,
                                 vocab_size, expected_sessions, mode=mode)
        if turn and lm is None:  # the content pass: forwards take turns on the cores (agents.lm)
            self.core.llm.turn = ComputeTurn(turn)
        self.core.timings.add("startup.model_load", time.perf_counter() - t0)
        self.clock = clock
        self.host, self.port = host, port
        self.max_frame_bytes = max_frame_bytes
        self.allowed_devices = None if allowed_devices is None else frozenset(int(d) for d in allowed_devices)
        self.max_sessions = max_sessions or expected_sessions or self.DEFAULT_MAX_SESSIONS
        self.max_sessions_per_identity = max_sessions_per_identity or self.max_sessions
        self.max_prompt_tokens = max_prompt_tokens or getattr(self.core.llm, "max_positions", 1 << 20)
        self.max_prefill_tokens = max_prefill_tokens_per_identity or self.DEFAULT_MAX_PREFILL_TOKENS
        self.max_messages_per_poll = max(1, max_messages_per_poll)
        self.owners: dict[int, bytes] = {}  # device -> the identity that opened its session (verdicts go there)
        self.reserved: dict[int, bytes] = {}  # device -> the only identity that may open it (after handover)
        self.commands: collections.deque = collections.deque()  # driver calls run in the serving thread (_in_loop)
        self.identity_sessions: dict[bytes, int] = {}  # identities that opened a session: how many
        self.identity_prefill: dict[bytes, int] = {}  # ... and how many prompt tokens
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
        return {"errors": self.errors, "error_codes": {getattr(c, "name", str(c)): n for c, n in sorted(self.error_codes.items())},
                "curve_refused": self.allow_list.counts() if self.allow_list is not None else None,
                "lag_s": self.lag_s, "max_rss_bytes": max_rss_bytes(), "memory": memory(),
                "error_log": self.error_log[-20:], "failure": self.failure,
                "batches": len(self.core.batches), "timings": self.core.timings.snapshot(),
                "lm": self.core.llm.describe() if hasattr(self.core.llm, "describe") else None}

    def waiting_on(self) -> dict:
        """VerifierCore.waiting_on, plus `unopened`: the run's devices with no session yet."""
        w = self.core.waiting_on()
        w["unopened"] = sorted(self.allowed_devices - set(self.core.sessions)) if self.allowed_devices else []
        return w

    def pid(self) -> int:
        return os.getpid()

    def chaos_kill(self) -> None:
        """Chaos tests (RunOptions.chaos_kill): kill -9 this actor's process, mid-run."""
        os.kill(os.getpid(), signal.SIGKILL)

    def handover(self, devices: list[int], identity: bytes) -> None:
        """Driver-authorised, through Ray only (never a client message): the group that hosted
        `devices` died. Their sessions are forgotten (VerifierCore.reset) and reserved for
        `identity`, the restarted group's, which opens them again; no other client can."""
        def work():
            self.core.reset(devices)
            for d in devices:
                self.owners[d] = self.reserved[d] = identity

        self._in_loop(work)

    def restore(self, states: list, owners: dict[int, bytes]) -> None:
        """Driver-authorised, before start(): rebuild the sessions of a dead verifier from the
        devices' committed state (agents.device.SessionState; VerifierCore.restore). `owners`: the
        identity of the group that hosts each device (its uploads are resent there after reattach)."""
        assert self.thread is None, "restore before start"
        self.core.restore(states)
        for st in states:
            device, prompt = st.open.frame.device, st.open.frame.prompt
            identity = owners[device]
            self.owners[device] = identity
            self.identity_sessions[identity] = self.identity_sessions.get(identity, 0) + 1
            self.identity_prefill[identity] = self.identity_prefill.get(identity, 0) + len(prompt)

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
        new = self.core.batches[self.batches_seen:]
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
        sock, core, wall = self.sock, self.core, self.clock.kind == "wall"
        rng = random.Random(-1)
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
                start = core.batch_start()
                timeout = min(self.clock.ms_until(math.inf if start is None else start), _ms(self.shaped.timeout()))
            opens = []
            if sock.poll(timeout):
                for _ in range(self.max_messages_per_poll):
                    try:
                        identity, parts, extra = self._recv()
                    except zmq.Again:
                        break
                    self.clock.chaos(rng)
                    # Decoding and checking one client's message: whatever fails is answered to
                    # that client alone. What follows (prefill, the LLM forward) is not input
                    # handling: its failure is a bug and ends the run (see _serve).
                    try:
                        msg = self._admit(identity, parts, extra, opens)
                    except protocol.ProtocolError as exc:
                        self._error(identity, exc)
                        continue
                    except Exception as exc:
                        self._error(identity, protocol.ProtocolError(
                            f"internal error checking a message ({type(exc).__name__}: {exc})",
                            protocol.ErrorCode.INTERNAL))
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
                        sock.send_multipart([identity, *wire.encode(verdict)])
            if opens:
                core.open(opens)
            while (ready := core.next_batch(self.clock.now() if wall else None)) is not None:
                verdicts = core.verify(*ready)
                if wall:  # real compute slower than the profile delays the verdicts: that is lag
                    now = self.clock.now()
                    self.lag_s = max(0.0, now - core.t_free)
                    core.t_free = max(core.t_free, now)
                for verdict in verdicts:
                    if wall:
                        verdict = replace(verdict, stamp=replace(verdict.stamp, t_sent=max(verdict.stamp.t_sent, now)))
                    parts = [self.owners[verdict.frame.device], *wire.encode(verdict)]
                    if wall:
                        self.shaped.schedule(parts, [verdict.stamp.t_sent])
                    else:
                        sock.send_multipart(parts)
            if wall:
                self.shaped.flush()

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

    def _admit(self, identity: bytes, parts: list[bytes], extra: int, opens: list) -> wire.Upload | None:
        """Decode and check one message; raise ProtocolError to refuse it. An OPEN that passes
        is appended to `opens` (None is returned); an upload of the identity's own session is
        returned for core.submit."""
        if extra:
            raise protocol.ProtocolError(f"message of {len(parts) + extra} parts, the protocol has {wire.PARTS} "
                                         f"([frame, stamp]); not decoded", protocol.ErrorCode.BAD_FRAME)
        msg = wire.decode(parts)
        if isinstance(msg, wire.Open):
            self._admit_open(identity, msg, len(opens))
            opens.append(msg)
            return None
        f = msg.frame
        if not isinstance(msg, wire.Upload):
            raise protocol.ProtocolError(f"unexpected {f.TYPE.name} from a device", device=f.device, seq=f.seq)
        if self.owners.get(f.device) != identity:  # never open, or another client's: the same answer
            raise protocol.ProtocolError(f"device {f.device}: no session of this client",
                                         protocol.ErrorCode.UNKNOWN_SESSION, device=f.device, seq=f.seq)
        return msg

    def _admit_open(self, identity: bytes, o: wire.Open, pending: int) -> None:
        """Admit an OPEN against the limits and VerifierCore.check_open; the session then
        belongs to `identity`. `pending`: admitted opens not yet handed to the core."""
        E, d, prompt = protocol.ErrorCode, o.frame.device, o.frame.prompt

        def refuse(text: str, code=E.LIMIT):
            raise protocol.ProtocolError(f"device {d}: OPEN refused: {text}", code, device=d, seq=0)

        if self.allowed_devices is not None and d not in self.allowed_devices:
            refuse("not a device of this run", E.REFUSED)
        holder = self.reserved.get(d)
        if holder is not None and holder != identity:
            refuse("the device is reserved for its restarted group", E.REFUSED)
        if d in self.owners and holder is None:
            refuse("a session is already open for this device", E.REFUSED)
        if len(self.core.sessions) + pending >= self.max_sessions:
            refuse(f"the verifier holds its limit of {self.max_sessions} sessions")
        opened, prefilled = self.identity_sessions.get(identity, 0), self.identity_prefill.get(identity, 0)
        if opened >= self.max_sessions_per_identity:
            refuse(f"this client holds its limit of {self.max_sessions_per_identity} sessions")
        if len(prompt) > self.max_prompt_tokens:
            refuse(f"prompt of {len(prompt)} tokens, the limit is {self.max_prompt_tokens}")
        if prefilled + len(prompt) > self.max_prefill_tokens:
            refuse(f"this client's prompts would total {prefilled + len(prompt)} tokens, the limit is "
                   f"{self.max_prefill_tokens}")
        self.core.check_open(o)
        self.reserved.pop(d, None)
        self.owners[d] = identity
        self.identity_sessions[identity] = opened + 1
        self.identity_prefill[identity] = prefilled + len(prompt)

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
