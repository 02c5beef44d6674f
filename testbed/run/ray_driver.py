"""The Ray engine's driver: one Verifier actor, the DeviceGroup actors, in four named steps.

    start   place the actors, load the models, hand out the endpoint and CURVE keys, run the groups
    poll    drain the groups' events into the sinks; see who died, who finished, whether it stalled
    recover restart dead actors by deterministic replay (testbed.run.recovery)
    finish  collect every actor's results; in the virtual clock replay the content in emulated time

The virtual clock runs in two passes (docs/design.md section 2): the actors compute the content
(agents.engine's content pass, groups and verifier taking turns on the cores), and `finish` replays
it in the driver. The wall clock is one pass: the groups' events are the trace.

Fault-injection tests subclass the driver (tests/testbed/chaos.py): actor classes and their extra
options, and the no-op points `in_recovery`, `after_poll`, `before_results`.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path

from agents.actors import ClockParams, DeviceGroup, Verifier
from testbed.run import recovery
from testbed.run.failures import RunFailed, stall_message
from testbed.run.options import RunOptions
from testbed.run.plan import Plan, compute_info, forward_threads
from testbed.run.ray_setup import actor_resources, turn_path
from testbed.scenario import device_groups


@dataclass
class ErrorCounts:
    """Protocol errors (and CURVE refusals) over every verifier of the run: a dead verifier's last
    reported counts are kept, its successor's add to them."""

    before: int = 0
    last: int = 0
    codes_before: collections.Counter = field(default_factory=collections.Counter)
    last_codes: dict = field(default_factory=dict)
    refused_before: collections.Counter = field(default_factory=collections.Counter)
    last_refused: dict = field(default_factory=dict)

    def seen(self, status: dict) -> None:
        self.last, self.last_codes, self.last_refused = (
            status["errors"],
            status["error_codes"],
            status["curve_refused"] or {},
        )

    def verifier_died(self) -> None:
        self.before, self.last = self.before + self.last, 0
        self.codes_before.update(self.last_codes)
        self.refused_before.update(self.last_refused)
        self.last_codes, self.last_refused = {}, {}

    @property
    def total(self) -> int:
        return self.before + self.last

    @property
    def codes(self) -> collections.Counter:
        return self.codes_before + collections.Counter(self.last_codes)


def _every_group_served(first: dict | None, lm: dict | None) -> dict | None:
    """The SLM as the groups describe it: the first group's layout, with the prompt tokens that
    every group's prefix cache served (the compute limit leaves those out of the prefill bound)."""
    if first is None or lm is None:
        return first or lm
    if (first.get("prefix_cache") or {}).get("tokens_served") is None or not lm.get("prefix_cache"):
        return first
    cache = {
        **first["prefix_cache"],
        "tokens_served": first["prefix_cache"]["tokens_served"] + lm["prefix_cache"]["tokens_served"],
    }
    return {**first, "prefix_cache": cache}


class RayDriver:
    """Runs one planned scenario on Ray (`run`); a dead actor (a RayActorError from any call) is
    restarted, up to actors.max_restarts in all (testbed.run.recovery).

    A group killed after its run() returned but before its last drain (a kill that fires late while
    the driver was busy restarting another actor) is harmless in the virtual clock (the trace is
    replayed from run()'s content); in the wall clock it runs again, since its last events are the
    trace. A verifier that dies after every group has finished, before its content log is read, is
    rebuilt from the groups' final sessions."""

    group_class: type = DeviceGroup  # the actors' classes (tests: subclasses that fail on purpose)
    verifier_class: type = Verifier
    poll_s = 0.5  # how long a poll waits for a group to finish

    def __init__(self, p: Plan, opts: RunOptions, sinks, ray_owned: bool, ray_s: float):
        import ray

        self.ray = ray
        self.p, self.opts, self.sinks = p, opts, sinks
        self.ray_owned, self.ray_s = ray_owned, ray_s
        self.s = s = p.scenario
        self.clock = ClockParams(s.clock, s.time_scale)  # every actor's (t0 set once they are up)
        self.two_pass = s.clock == "virtual"  # the actors compute the content, finish() replays it
        self.members = {i: [d.device_id for d in m] for i, m in enumerate(device_groups(s))}
        self.actors: list = []  # every actor made (killed at close)
        self.turn: str | None = None  # the ComputeTurn lock file, when the actors take the cores in turns
        self.restarts = recovery.Restarts(s.actors.max_restarts, opts.out_dir)
        self.errors = ErrorCounts()
        self.groups: dict = {}
        self.identities: dict[int, bytes] = {}
        self.refs: dict = {}  # running groups: run() ref -> group id
        self.finished: dict[int, dict] = {}  # group id -> its run() result
        self.final_drained: set[int] = set()  # finished groups drained after their run() returned
        self.steps = {d.device: 0 for d in p.specs}  # steps drained per device (a restarted group skips them)
        self.last_progress, self.last_work = time.monotonic(), None

    def run(self) -> dict:
        try:
            self.start()
            while self.refs:
                self.poll()
            return self.finish()
        finally:
            self.close()

    # --- the actors ------------------------------------------------------------------------

    def group_options(self, i: int, incarnation: int) -> dict:
        """Extra constructor arguments of group i's actor (tests: fault injection)."""
        return {}

    def verifier_options(self) -> dict:
        """Extra constructor arguments of the verifier actor (tests: fault injection)."""
        return {}

    def make_verifier(self):
        p, a = self.p, self.s.actors
        v = self._verifier_cls.remote(
            p.llm,
            p.server,
            self.s.seed,
            p.run.vocab_size,
            self.clock,
            self.host,
            self.s.server.port,
            threads=self.role_threads["llm"],
            expected_sessions=len(p.specs),
            dtype=p.llm_dtype,
            device=a.verifier_device,
            allowed_devices=[d.device for d in p.specs],
            mode="content" if self.two_pass else "emulate",
            curve=self.keys.for_server() if self.keys else None,
            turn=self.turn,
            **self.verifier_options(),
        )
        self.actors.append(v)
        return v

    def make_group(self, i: int, incarnation: int = 0):
        p, a = self.p, self.s.actors
        g = self._group_cls.remote(
            i,
            [p.specs[d] for d in self.members[i]],
            p.run,
            p.slm,
            p.policy_specs,
            None,
            self.clock,
            self.role_threads["slm"],
            p.slm_dtype,
            a.group_device,
            self.two_pass,
            incarnation,
            turn=self.turn,
            **self.group_options(i, incarnation),
        )
        self.actors.append(g)
        return g

    def start_verifier(self, v) -> str:
        endpoint = self.ray.get(v.start.remote())
        if self.opts.address and endpoint.startswith("tcp://0.0.0.0"):
            endpoint = endpoint.replace("0.0.0.0", self.ray.util.get_node_ip_address(), 1)
        return endpoint

    def launch(self, i: int, **kwargs) -> None:
        """Run group i against the current verifier."""
        keys = self.keys.for_client(i) if self.keys else None
        self.refs[self.groups[i].run.remote(self.t0, self.endpoint, keys, **kwargs)] = i

    # --- fault-injection points (no-ops; tests/testbed/chaos.py) ------------------------------

    def in_recovery(self, target: str, actor) -> None:
        """During a recovery: `actor` ("verifier", or "group:<id>" for a new incarnation) was just
        made or is about to be handed devices."""

    def after_poll(self) -> None:
        """After each poll (and its recovery)."""

    def before_results(self) -> None:
        """Every group has finished; the verifier's results are read next."""

    # --- start -------------------------------------------------------------------------------

    def start(self) -> None:
        from agents import security

        t_ray = time.perf_counter()
        s, p = self.s, self.p
        self.host = s.server.host
        if self.opts.address and self.host == "127.0.0.1":
            self.host = "0.0.0.0"  # reachable from other nodes of the cluster
        # Content pass: groups and verifier take turns, so each computes on all of actors.threads
        # (a restarted actor too: the same count, the same bits). Wall clock: the split.
        self.role_threads = forward_threads(s, p.threads, "ray")
        # ... and where several actors have a forward ready at once (several groups), they take the
        # cores in turns (agents.lm.ComputeTurn, a lock file per machine and run) instead of splitting them.
        self.turn = turn_path() if self.two_pass and p.threads > 1 else None
        resources = actor_resources(s)
        self._verifier_cls = self.ray.remote(**resources["verifier"])(self.verifier_class)
        self._group_cls = self.ray.remote(**resources["group"])(self.group_class)
        # CURVE (agents.security): keys made here, per run, handed out as Ray arguments only. A
        # restarted actor gets the same keys, so the others need no new ones.
        try:
            self.curve = security.curve_on(s.server.curve, self.host)
        except ValueError as e:  # off with --address (0.0.0.0)
            raise RunFailed(f"{e}.") from None
        self.keys = security.RunKeys.new(len(self.members)) if self.curve else None
        self.verifier = self.make_verifier()
        # Groups start (worker process, SLM load) while the verifier loads its LLM; they learn
        # the endpoint when they run.
        self.groups = {i: self.make_group(i) for i in self.members}
        self.endpoint = self.start_verifier(self.verifier)
        self.ray.get([g.ready.remote() for g in self.groups.values()])  # models loaded: emulated time may start
        self.identities = dict(zip(self.groups, self.ray.get([g.identity.remote() for g in self.groups.values()])))
        self.t_ready = time.perf_counter()
        self.startup = {"ray (with planning alongside)": self.ray_s, "actors_ready": self.t_ready - t_ray}
        self.t0 = time.time() + 0.2
        self.ray.get(self.verifier.set_t0.remote(self.t0))
        for i in self.groups:
            self.launch(i)
        self.sinks.partial["restarts"] = self.restarts.summary()

    # --- poll --------------------------------------------------------------------------------

    def poll(self) -> None:
        """One round: collect finished groups, drain every group's events and the verifier's status
        into the sinks, recover dead actors, check for a stall."""
        from ray.exceptions import RayActorError

        from agents.events import TokenCommitted, VerifierBatch

        done, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=self.poll_s)
        dead_groups: dict[int, BaseException] = {}
        for ref in done:
            i = self.refs.pop(ref)
            try:
                self.finished[i] = self.ray.get(ref)  # raises the group's error here
            except RayActorError as exc:
                dead_groups[i] = exc
        fresh = self._drain_groups(dead_groups)
        events = [e for f in fresh for e in f["events"]]
        new_rows = 0
        for e in events:
            self.steps[e.device] = max(self.steps[e.device], e.step + 1)
            new_rows += isinstance(e, TokenCommitted)
        verifier_died = None
        try:
            if not self.two_pass:
                events.extend(VerifierBatch.of(b) for b in self.ray.get(self.verifier.drain_batches.remote()))
            status = self.ray.get(self.verifier.status.remote())
            self.errors.seen(status)
        except RayActorError as exc:
            verifier_died, status = exc, {"lag_s": 0.0, "failure": None}
        (self.sinks.content if self.two_pass else self.sinks.events)(events)
        self.sinks.clock(max([f["lag_s"] for f in fresh] + [status["lag_s"]]), self.errors.total, self.errors.codes)
        if status["failure"]:
            raise RuntimeError(f"verifier failed:\n{status['failure']}")
        if verifier_died is not None or dead_groups:
            recovery.recover(self, verifier_died, dead_groups)
        self.after_poll()
        self._check_stall(status, bool(done or new_rows or dead_groups))

    def _drain_groups(self, dead_groups: dict[int, BaseException]) -> list[dict]:
        """Every group's drain() (new events, lag); a group found dead goes in `dead_groups` (unless
        its last events no longer matter)."""
        from ray.exceptions import RayActorError

        fresh = []
        for i, ref in [(i, self.groups[i].drain.remote()) for i in self.groups]:
            try:
                fresh.append(self.ray.get(ref))
                if i in self.finished:
                    self.final_drained.add(i)  # after run() returned: nothing is left in the group
            except RayActorError as exc:
                if i not in self.finished:
                    dead_groups.setdefault(i, exc)
                elif i not in self.final_drained:
                    # It died after run() returned but before its last drain (a kill that fired late,
                    # e.g. after a restart kept the driver busy): the events of its last steps are
                    # lost. Virtual clock: harmless, the trace is replayed from run()'s content.
                    # Wall clock: they are the trace, so the group runs again (skipping what was drained).
                    if self.two_pass:
                        self.final_drained.add(i)
                    else:
                        dead_groups[i] = exc
        return fresh

    def _check_stall(self, status: dict, moved: bool) -> None:
        """A finished group, a new row, a restart or any verifier work (a batch, a prefill chunk: a
        large fleet's prompts take minutes with no batch) is progress; none for actors.stall_timeout_s
        is a stall: RunFailed naming whom the verifier waits for."""
        timeout = self.s.actors.stall_timeout_s
        work = (status.get("batches", -1), sum(t["calls"] for t in status.get("timings", {}).values()))
        if moved or work != self.last_work:
            self.last_progress, self.last_work = time.monotonic(), work
        elif timeout and time.monotonic() - self.last_progress > timeout:
            try:
                waiting = self.ray.get(self.verifier.waiting_on.remote(), timeout=30)
            except Exception as exc:  # the message still names the running groups
                waiting = {"error": f"{type(exc).__name__}: {exc}"}
            raise RunFailed(
                stall_message(
                    waiting,
                    timeout,
                    {i: self.members[i] for i in self.refs.values()},
                    self.sinks.tokens,
                    self.opts.out_dir,
                )
            )

    # --- finish ------------------------------------------------------------------------------

    def finish(self) -> dict:
        """Every group has finished: their results, the verifier's (rebuilt if it dies here), and in
        the virtual clock the replay that writes the timed trace. Returns the run's status entries."""
        from ray.exceptions import RayActorError

        from agents.engine import replay_content
        from agents.events import VerifierBatch
        from agents.record import Content
        from agents.timing import merge
        from policies import load_policy
        from testbed.profile import breakdown

        self.before_results()
        rss, group_timings, lms, memory, content = 0, [], {}, {}, Content()
        for i, result in sorted(self.finished.items()):
            rss += result["max_rss_bytes"]
            group_timings.append(result["timings"])
            memory[f"group {i}"] = result["memory"]
            lms["slm"] = _every_group_served(lms.get("slm"), result["lm"])
            if self.two_pass:
                content.devices.update(result["content"])
        while True:  # the verifier may still die here, every group finished: rebuilt from their sessions
            try:
                status = self.ray.get(self.verifier.status.remote())
                if self.two_pass:
                    content.verdicts = self.ray.get(self.verifier.content_log.remote())  # packed (agents.engine)
                else:  # batches after the last drain (a dead verifier's since then are lost: sizes only)
                    last_batches = self.ray.get(self.verifier.drain_batches.remote())
                break
            except RayActorError as exc:
                recovery.recover(self, exc, {})
        self.errors.seen(status)
        self.sinks.clock(status["lag_s"], self.errors.total, self.errors.codes)  # errors since the last poll
        refused = (self.errors.refused_before + collections.Counter(status["curve_refused"])) if self.curve else None
        if self.two_pass:
            p = self.p
            policies = {name: load_policy(spec) for name, spec in p.policy_specs.items()}
            # The timed events (link events included) come from the replay, here.
            # history=False: the rows leave as events only, the driver keeps none of them
            if len(p.verifiers) > 1:  # one replay per verifier's partition (testbed.run.partitions)
                from testbed.run.partitions import replay_here
                from testbed.run.replay import partitions

                replayed = replay_here(p, self.opts, self.sinks, partitions(p), source=content)
                status["partitions"] = replayed["partitions"]
                status["timings"] = merge(status["timings"], {"replay": replayed["timings"]["replay"]})
            else:
                replay = replay_content(
                    p.specs, p.run, p.server, policies, content, on_events=self.sinks.events, history=False
                )
                status["timings"] = merge(status["timings"], {"replay": replay.group_timings["replay"]})
            status["content"] = content  # for a content library (testbed.content); popped before writing
        else:
            self.sinks.events([VerifierBatch.of(b) for b in last_batches])
        t_end = time.perf_counter()
        # Peak memory of the run: the sum of every actor's peak (an upper bound on the
        # simultaneous peak) plus this driver's (the pipeline adds it once the results are merged).
        rss += status["max_rss_bytes"]
        groups_t = merge(*group_timings)
        load = max(
            [t.get("startup.model_load", {}).get("seconds", 0.0) for t in group_timings]
            + [status["timings"].get("startup.model_load", {}).get("seconds", 0.0)]
        )
        return {
            "protocol_errors": self.errors.total,
            "protocol_errors_by_reason": dict(sorted(self.errors.codes.items())),
            "curve_refused": dict(refused) if refused is not None else None,
            "lag_s": status["lag_s"],
            "peak_rss_bytes": rss,
            "restarts": self.restarts.summary(),
            "curve": self.curve,
            "compute": {
                **compute_info(self.p, {**lms, "llm": status["lm"]}, "ray"),
                "memory": {"verifier": status["memory"], **memory},
            },
            "profile": breakdown(
                0.0, t_end - self.t_ready, {**self.startup, "model_load": load}, groups_t, status["timings"]
            ),
            **{k: status[k] for k in ("content", "partitions") if k in status},  # content: popped before writing
        }

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        if self.ray_owned:
            self.ray.shutdown()
        if self.turn and not self.opts.address:  # local Ray: the actors' lock file is this machine's
            Path(self.turn).unlink(missing_ok=True)
