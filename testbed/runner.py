"""Run a scenario: local Ray (or a cluster via --address), or the single-process engine.

The runner resolves the scenario into device specs, places one Verifier and the
DeviceGroup actors, shows live progress, and writes the results: tokens.parquet,
summary.json and the resolved scenario.yaml (and the report). Every actor and socket is
cleaned up on exit, on error and on Ctrl-C; partial results are kept.
"""
from __future__ import annotations

import collections
import json
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from agents.device import DeviceSpec, RunParams
from agents.verifier import ServerProfile
from testbed import results
from testbed.sinks import Sinks
from testbed.scenario import Scenario, device_groups, devices, dump_scenario, policy_name, resolve_link


@dataclass
class RunOptions:
    out_dir: Path
    engine: str = "ray"  # ray | local
    address: str | None = None
    progress: bool = True
    chaos_delay_s: float = 0.0  # tests: random real delays in actors (the trace must not change)
    # Chaos tests (ray engine): (actor, tokens) pairs: kill -9 the actor once that many tokens are
    # committed: "verifier" by the driver, once it has drained that many of the run's; "group:<id>"
    # by the group itself, at that many of its own devices' (so always mid-run, however busy the
    # driver). The runner then restarts it (_run_ray). Each fires once, on the first incarnation.
    chaos_kill: tuple[tuple[str, int], ...] = ()
    # A "verifier" kill at or past the run's token count (devices x max_new_tokens, or fewer when a
    # sequence stops early) fires after every group has finished, before the verifier's content log is read.
    # Chaos tests: kill -9 during a recovery, once each: "verifier" right before the next handover
    # (a group's restart) or restore (the verifier's), "group:<id>" the group's new incarnation as
    # soon as it is made.
    chaos_kill_in_recovery: tuple[str, ...] = ()
    chaos_stall_group: int = -1  # tests (ray engine): this group opens its sessions, then hangs
    report: bool = True
    # Prometheus exporter, as the scenario's metrics.port/host: None = off, 0 (or -1) = any free port.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    linger_s: float = 0.0
    collector: object | None = None  # a testbed.metrics.Collector to feed (else one is made for metrics_port)
    profile: bool = False  # also time the compute limit (testbed.profile) after the run
    accuracy: bool = True  # HumanEval prompts: score pass@1 by executing the tests (testbed.accuracy)


@dataclass
class Plan:
    """A scenario resolved into what the engines take."""

    scenario: Scenario
    specs: list[DeviceSpec]
    run: RunParams
    server: ServerProfile
    policy_specs: dict[str, object]
    slm: object
    llm: object
    slm_dtype: str = "float32"  # resolved (never auto)
    llm_dtype: str = "float32"
    threads: int = 1  # actors.threads resolved (never auto): torch threads of the content forwards


def forward_threads(s: Scenario, threads: int, engine: str = "local") -> dict[str, int]:
    """torch threads per role ("slm", "llm") as the run's forwards compute. The virtual clock's content
    pass (the local engine, or Ray's actors in turn) runs every forward at `threads` (actors.threads
    resolved): groups and verifier take turns, so the one computing has all the cores, and one count
    for every engine and layout keeps the content equal (fp32 rounding depends on it). The Ray wall
    clock computes groups and verifier at once: actors.group_threads / verifier_threads."""
    if engine == "ray" and s.clock == "wall":
        return {"slm": s.actors.group_threads, "llm": s.actors.verifier_threads}
    return {"slm": threads, "llm": threads}


def plan(s: Scenario, checked=None, *, engine: str = "ray", address: str | None = None) -> Plan:
    """Resolve `s` for the engines. Runs testbed.preflight first (unless `checked`, its result, is
    given), so a scenario that would fail at run time raises ScenarioError before any per-device work."""
    from agents.hardware import resolve_threads
    from agents.models import model_dtype
    from testbed.preflight import preflight
    from testbed.prompts import prompt_index

    checked = checked or preflight(s, engine=engine, address=address)
    prompts, vocab = checked.prompts, checked.vocab_size
    policy_specs: dict[str, object] = {}
    labels: dict[int, str] = {}
    for t in s.tiers:
        label = policy_name(t.policy)
        if label in policy_specs and policy_specs[label] != t.policy:
            label = f"{label}@{t.name}"  # same preset, other parameters: keep them apart
        policy_specs[label] = t.policy
        labels[id(t)] = label
    tier_label = {t.name: labels[id(t)] for t in s.tiers}
    specs = []
    for d in devices(s):
        p = prompts[prompt_index(d.device_id, len(prompts))]
        specs.append(DeviceSpec(d.device_id, d.tier, tier_label[d.tier], d.slm_ms_per_token, resolve_link(d.link),
                                p.index, tuple(p.token_ids)))
    run = RunParams(seed=s.seed, max_new_tokens=s.generation.max_new_tokens,
                    temperature=s.generation.temperature, vocab_size=vocab, batch_slm=s.actors.batch_slm,
                    stop=stop_rule(s))
    threads = resolve_threads(s.actors.threads)
    role_threads = forward_threads(s, threads, engine)  # auto's dtype probe runs at the count used
    return Plan(s, specs, run, s.server.profile(), policy_specs, s.models.slm, s.models.llm,
                model_dtype(s.models.slm, s.models.dtype, s.actors.group_device, role_threads["slm"]),
                model_dtype(s.models.llm, s.models.dtype, s.actors.verifier_device, role_threads["llm"]), threads)


def stop_rule(s: Scenario):
    """The scenario's agents.stop.StopRule: the SLM tokenizer's end ids (testbed.accuracy.end_token_ids,
    the ones scoring cuts at) when generation.stop_at_eos, and generation.stop, decoded with that
    tokenizer (the pair shares it, preflight checks)."""
    from agents.stop import StopRule
    from testbed.accuracy import end_token_ids
    from testbed.preflight import _key, _tokenizer

    g = s.generation
    tokenizer = _tokenizer(_key(s.models.slm)) if g.stop_at_eos or g.stop else None
    eos = end_token_ids(tokenizer) if g.stop_at_eos else set()
    return StopRule(frozenset(eos), tuple(g.stop or ()), _key(s.models.slm) if g.stop else None)


def resolved_scenario(p: Plan) -> Scenario:
    """The scenario as run: models.dtype and actors.threads pinned to what auto chose (the dtype when
    both models agree), so scenario.yaml repeats the run, content included, on another machine."""
    from testbed.scenario import override

    changes: dict = {}
    if p.scenario.models.dtype == "auto" and p.slm_dtype == p.llm_dtype:
        changes["models.dtype"] = p.slm_dtype
    if p.scenario.actors.threads == "auto":
        changes["actors.threads"] = p.threads
    return override(p.scenario, changes) if changes else p.scenario


def compute_info(p: Plan, lms: Mapping[str, Any], engine: str = "local") -> dict:
    """How the run computed: machine, dtypes, threads, each model's forward layout. threads: the
    scenario's actors.threads ("requested"), what it resolved to ("content"), and the torch threads
    each role's forwards ran at ("slm", "llm"; each model's own "threads" is what torch reported)."""
    from agents.hardware import machine_info

    a = p.scenario.actors
    return {"machine": machine_info(), "dtype": {"requested": p.scenario.models.dtype, "slm": p.slm_dtype,
                                                 "llm": p.llm_dtype},
            "threads": {"requested": a.threads, "content": p.threads, **forward_threads(p.scenario, p.threads, engine),
                        "group": a.group_threads, "verifier": a.verifier_threads,
                        # other work on the cores slows split forwards many times (agents.hardware)
                        "machine_load_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
            "device": {"group": a.group_device, "verifier": a.verifier_device},
            "batch_slm": a.batch_slm, **{role: lm for role, lm in lms.items() if lm}}


def _every_group_served(first: dict | None, lm: dict | None) -> dict | None:
    """The SLM as the groups describe it: the first group's layout, with the prompt tokens that
    every group's prefix cache served (the compute limit leaves those out of the prefill bound)."""
    if first is None or lm is None:
        return first or lm
    if (first.get("prefix_cache") or {}).get("tokens_served") is None or not lm.get("prefix_cache"):
        return first
    cache = {**first["prefix_cache"], "tokens_served": first["prefix_cache"]["tokens_served"] + lm["prefix_cache"]["tokens_served"]}
    return {**first, "prefix_cache": cache}


def run_scenario(s: Scenario, opts: RunOptions) -> dict:
    """Run one scenario to the end; returns the summary (also written to opts.out_dir)."""
    from testbed.preflight import preflight

    t0 = time.time()
    if opts.engine not in ("ray", "local"):
        raise ValueError(f"engine must be ray or local, got {opts.engine!r}")
    # Every check before Ray starts or anything is written: a bad scenario leaves no trace.
    checked = preflight(s, engine=opts.engine, address=opts.address)
    if opts.engine == "ray":
        p, ray_owned, ray_s = _plan_while_ray_starts(s, opts, checked)
    else:
        p, ray_owned, ray_s = plan(s, checked, engine=opts.engine), False, 0.0
    try:
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        dump_scenario(resolved_scenario(p), opts.out_dir / "scenario.yaml")
        sinks = Sinks(p, opts)
    except BaseException:
        if ray_owned:
            import ray

            ray.shutdown()
        raise
    status, ok = {}, False
    try:
        if opts.engine == "local":
            status = _run_local(p, opts, sinks)
        elif opts.engine == "ray":
            status = _run_ray(p, opts, sinks, ray_owned, ray_s)
        else:
            raise ValueError(f"engine must be ray or local, got {opts.engine!r}")
        ok = True
    finally:
        sinks.close()
        wall = time.time() - t0
        lms = status.pop("lms", None)
        if "profile" in status:
            status["profile"]["wall_s"] = round(wall, 3)
            if opts.profile and ok:  # after the wall time: the yardstick does not count in it
                _add_compute_limit(p, status, opts.engine, *(lms or _load_lms(p)))
        # The shards become tokens.parquet. Interrupted (Ctrl-C) or failed: what was committed so far
        # (in the virtual clock, the content pass's rows without times unless the replay ran).
        df = sinks.results(opts.out_dir / "tokens.parquet")
        if not ok:
            status = {**status, **sinks.partial, "interrupted": True}
        if df is not None and len(df):
            _write(p, opts, df, sinks.batch_sizes, wall, status)
            del df  # the accuracy score and the report read tokens.parquet themselves
            if opts.accuracy and p.scenario.prompts.source == "humaneval" and not status.get("interrupted"):
                from testbed.accuracy import score_run

                score_run(opts.out_dir, progress=opts.progress)  # pass@1 from executed tests
            if opts.report:
                from testbed.report import write_report

                write_report([opts.out_dir], opts.out_dir / "report")
        sinks.linger(opts.linger_s)
    return json.loads((opts.out_dir / "summary.json").read_text())


def _write(p: Plan, opts: RunOptions, df, batch_sizes: list[int], wall: float, status: dict) -> dict:
    """summary.json from tokens.parquet's rows (`df`, already written) and the verifier's batch sizes."""
    emulated = float(df["t_commit"].max()) if len(df) else 0.0
    # complete: every device's sequence ended (eos, stop or length), not only max_new_tokens each
    ended = int((df["stop_reason"] != "").sum()) if "stop_reason" in df.columns else 0
    extra = {"scenario": p.scenario.name, "engine": opts.engine, "clock": p.scenario.clock,
             "complete": ended == len(p.specs) and df["device"].nunique() == len(p.specs)}
    extra.update(status)
    summary = results.summarize(df, emulated_seconds=emulated, wall_seconds=wall, vocab_size=p.run.vocab_size,
                                verifier_batches=batch_sizes, extra=extra)
    # This process's peak so far (replay, merge, summary; not the report after): it must not grow
    # with devices x tokens (issue 9). The Ray engine's peak_rss_bytes is its actors' sum plus this.
    from agents.actors import max_rss_bytes

    summary["driver_peak_rss_bytes"] = max_rss_bytes()
    if "peak_rss_bytes" in summary:
        summary["peak_rss_bytes"] += summary["driver_peak_rss_bytes"]
    results.write_summary(summary, opts.out_dir / "summary.json")
    return summary


# --- engines -----------------------------------------------------------------------------


def _run_local(p: Plan, opts: RunOptions, sinks: "Sinks"):
    from agents.engine import run_virtual
    from agents.lm import BatchedLM
    from agents.models import load_model
    from policies import load_policy
    from testbed.profile import breakdown

    import torch

    # actors.threads resolved, as the Ray engine's actors in the content pass: kernels split work by
    # thread count, and fp32 rounding with it; equal counts make this engine's trace the Ray engine's.
    # One process computes everything in turn, so it has every core the scenario gives it.
    torch.set_num_threads(p.threads)
    a = p.scenario.actors
    t0 = time.perf_counter()
    policies = {name: load_policy(spec) for name, spec in p.policy_specs.items()}
    slm = BatchedLM(load_model(p.slm, dtype=p.slm_dtype, device=a.group_device))
    llm = BatchedLM(load_model(p.llm, dtype=p.llm_dtype, device=a.verifier_device))
    t_loaded = time.perf_counter()
    result = run_virtual(p.specs, p.run, p.server, slm, llm, policies, on_content_events=sinks.content,
                         on_events=sinks.events, on_step=lambda group, verifier: sinks.clock(0.0, 0), history=False)
    emulation = time.perf_counter() - t_loaded
    status = {"compute": compute_info(p, {"slm": slm.describe(), "llm": llm.describe()}, "local"),
              "profile": breakdown(0.0, emulation, {"model_load": t_loaded - t0}, result.group_timings,
                                   result.verifier_timings)}
    status["lms"] = (slm, llm)  # for the compute limit (run_scenario), popped before writing
    return status


def _load_lms(p: Plan):
    from agents.lm import BatchedLM
    from agents.models import load_model

    a = p.scenario.actors
    return (BatchedLM(load_model(p.slm, dtype=p.slm_dtype, device=a.group_device)),
            BatchedLM(load_model(p.llm, dtype=p.llm_dtype, device=a.verifier_device)))


def _add_compute_limit(p: Plan, status: dict, engine: str, slm, llm) -> None:
    from testbed.profile import compute_limit

    prof = status["profile"]
    lengths = [len(d.prompt_ids) for d in p.specs]
    # prompt tokens the prefix caches served (as the run's models describe themselves; on Ray the
    # slm's is summed over every group, _every_group_served)
    served = {role: ((status.get("compute", {}).get(role) or {}).get("prefix_cache") or {}).get("tokens_served", 0)
              for role in ("slm", "llm")}
    limit = compute_limit(slm, llm, prof, lengths, len(p.specs), forward_threads(p.scenario, p.threads, engine), served)
    prof["compute_limit"] = limit
    prof["wall_over_compute_limit"] = round(prof["emulation_s"] / limit["seconds"], 3) if limit["seconds"] else None
    prof["total_wall_over_compute_limit"] = round(prof["wall_s"] / limit["seconds"], 3) if limit["seconds"] else None


def _turn_path() -> str:
    """A lock file for one run's ComputeTurn, in each machine's temp folder (cores are per machine)."""
    import secrets
    import tempfile

    return str(Path(tempfile.gettempdir()) / f"hlm-compute-turn-{secrets.token_hex(6)}.lock")


def actor_resources(s: Scenario) -> dict[str, dict]:
    """What each actor asks Ray for: no CPU reservation (actors share cores; their torch threads
    are set explicitly) and the scenario's GPU share (fractional for groups)."""
    a = s.actors
    return {"verifier": {"num_cpus": 0, "num_gpus": a.verifier_gpus, "max_concurrency": 4},
            "group": {"num_cpus": 0, "num_gpus": a.group_gpus, "max_concurrency": 2}}


def _local_gpus(s: Scenario) -> int:
    """GPUs a local Ray may hand out: those torch sees, when the scenario places work on one."""
    if s.actors.verifier_gpus == 0 and s.actors.group_gpus == 0:
        return 0
    import torch

    return torch.cuda.device_count()


def _plan_while_ray_starts(s: Scenario, opts: RunOptions, checked=None) -> tuple[Plan, bool, float]:
    """plan(s) in a thread while Ray starts in this one (each takes seconds: tokenizer, imports;
    Ray's processes). Returns (plan, whether this call started Ray, Ray's start-up seconds)."""
    import threading

    import ray

    box: dict = {}

    def work() -> None:
        try:
            box["plan"] = plan(s, checked, engine=opts.engine, address=opts.address)
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    worker = threading.Thread(target=work, name="plan", daemon=True)
    worker.start()
    owned = not ray.is_initialized()
    t = time.perf_counter()
    try:
        if owned:
            # No --address: always a new local Ray ("local"), never a cluster a stale
            # /tmp/ray/ray_current_cluster file points at.
            ray.init(address=opts.address or "local", include_dashboard=False, configure_logging=False,
                     log_to_driver=True,
                     **({} if opts.address else {"num_cpus": max(2, s.n_devices // s.actors.devices_per_group + 1),
                                                 "num_gpus": _local_gpus(s)}))
    finally:
        worker.join()
    ray_s = time.perf_counter() - t
    if "error" in box:
        if owned:
            ray.shutdown()
        raise box["error"]
    return box["plan"], owned, ray_s


class RunFailed(RuntimeError):
    """The run cannot go on: an actor died after actors.max_restarts restarts. One paragraph naming
    the actor, the device ids it hosted and the cause; the partial results are kept."""


def _id_ranges(ids) -> str:
    """Device ids as ranges: 0-3, 8, 10-11."""
    ids, out = sorted(ids), []
    for i in ids:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def _stall_message(waiting: dict, timeout_s: float, running: dict[int, list[int]], tokens: int, out_dir: Path) -> str:
    """One paragraph: which groups still run and whom the verifier waits for (Verifier.waiting_on)."""
    group_of = {d: i for i, ds in running.items() for d in ds}

    def where(devices) -> str:
        groups = sorted({group_of[d] for d in devices if d in group_of})
        on = f" (group{'s' * (len(groups) > 1)} {', '.join(map(str, groups))})" if groups else ""
        return f"{_id_ranges(devices)}{on}"

    parts = [f"The emulation stalled: nothing moved for {timeout_s:g} s (no new token, no verifier batch or forward; "
             f"actors.stall_timeout_s), after {tokens} committed tokens."]
    if running:
        parts.append(f"Groups still running: {', '.join(f'{i} (devices {_id_ranges(ds)})' for i, ds in sorted(running.items()))}.")
    if "error" in waiting:
        parts.append(f"The verifier could not say whom it waits for ({waiting['error']}).")
    else:
        idle = waiting.get("idle", {})
        # Sessions whose bound is inf have had their last verdict: they hold nothing back.
        hold = waiting.get("blocking") or sorted(d for d, t in idle.items() if math.isfinite(t))
        if hold:
            times = [f"{d} at t >= {idle[d]:.3f} s emulated" for d in hold[:8]] if waiting.get("timed") else []
            parts.append(f"The verifier is waiting for uploads from devices {where(hold)}, sessions open with nothing "
                         f"queued" + (f" ({'; '.join(times)}{'; ...' if len(hold) > 8 else ''})" if times else "") + ".")
        if waiting.get("unopened"):
            parts.append(f"Devices that never opened a session: {where(waiting['unopened'])}.")
        if waiting.get("queued"):
            parts.append(f"Devices {_id_ranges(waiting['queued'])} have uploads queued behind them.")
    parts.append(f"The partial results are in {out_dir}.")
    return " ".join(parts)


def _cause(exc: BaseException) -> str:
    """A Ray actor death in one line (Ray's message spans many, with advice around the exit detail)."""
    text = " ".join(str(exc).split())
    if "exit detail:" in text:
        text = text.split("exit detail:", 1)[1]
        for advice in (" Some common causes", " There are some potential"):
            text = text.split(advice, 1)[0]
    return f"{type(exc).__name__}: {text.strip()[:300]}"


@dataclass
class Restarts:
    """Actor restarts of one run, bounded by actors.max_restarts over all actors (summary.json
    "restarts", Prometheus hlm_actor_restarts_total)."""

    limit: int
    out_dir: Path
    verifier: int = 0
    groups: dict = field(default_factory=dict)  # group id -> restarts
    events: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.verifier + sum(self.groups.values())

    def allow(self, actor: str, devices, cause: str, tokens: int, t0: float) -> None:
        """Count one restart of `actor`, or raise RunFailed past the bound."""
        if self.total >= self.limit:
            raise RunFailed(
                f"The {actor} (hosting devices {_id_ranges(devices)}) died: {cause}. The run has already restarted "
                f"actors {self.total} time{'s' * (self.total != 1)}, the limit set by actors.max_restarts is "
                f"{self.limit}, so it stops here after {tokens} committed tokens; the partial results are in "
                f"{self.out_dir}.")
        self.events.append({"actor": actor, "devices": sorted(devices), "cause": cause, "tokens_committed": tokens,
                            "wall_s": round(time.time() - t0, 3)})
        import sys

        print(f"[{time.time() - t0:6.0f}s] {actor} died ({cause}); restarting it (restart {self.total + 1} of at most "
              f"{self.limit})", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        return {"total": self.total, "limit": self.limit, "verifier": self.verifier,
                "groups": {str(g): n for g, n in sorted(self.groups.items())}, "events": self.events}


def _run_ray(p: Plan, opts: RunOptions, sinks: "Sinks", started: bool, ray_s: float):
    """The actors: one Verifier, the DeviceGroups. A dead actor (a RayActorError from any call) is
    restarted, up to actors.max_restarts in all, by deterministic replay (docs/design.md section 9;
    agents.actors.DeviceGroup and agents.verifier say how):

    - a group: a new incarnation for the same devices re-executes them from their prompts, the
      verifier having forgotten and reserved their sessions (Verifier.handover); events of the
      steps the driver already drained are not emitted again;
    - the verifier: every group detaches and hands over its devices' committed sessions, a new
      verifier re-opens them and re-feeds its LLM caches in the original calls (Verifier.restore),
      the groups reattach and resend what is unanswered.

    An actor that dies during a recovery (a new incarnation at once, the verifier during a handover
    or a restore) is restarted in turn (`recover`), and a verifier that dies after every group has
    finished, before its content log is read, is rebuilt from the groups' final sessions; all within
    the same bound. A group killed after its run() returned but before its last drain (a kill that
    fires late while the driver was busy restarting another actor): harmless in the virtual clock
    (the trace is replayed from run()'s content); in the wall clock it runs again, since its last
    events are the trace.

    In the virtual clock the trace is then identical to a fault-free run's: what a device emits
    depends only on its own verdicts, and each verdict only on the device's context."""
    import ray
    from ray.exceptions import RayActorError

    from agents import security
    from agents.actors import ClockParams, DeviceGroup, Verifier
    from agents.events import TokenCommitted, VerifierBatch
    from agents.engine import Content, replay_content
    from agents.timing import merge
    from policies import load_policy

    from testbed.profile import breakdown

    t_ray = time.perf_counter()
    s = p.scenario
    a = s.actors
    clock = ClockParams(s.clock, s.time_scale, 0.0, opts.chaos_delay_s, opts.chaos_stall_group)
    actors = []
    turn = None  # the ComputeTurn lock file, when the actors take the cores in turns
    try:
        host = s.server.host
        if opts.address and host == "127.0.0.1":
            host = "0.0.0.0"  # reachable from other nodes of the cluster
        # Virtual clock: the actors run the content pass, the driver replays it (agents.engine).
        two_pass = s.clock == "virtual"
        # Content pass: groups and verifier take turns, so each computes on all of actors.threads
        # (a restarted actor too: the same count, the same bits). Wall clock: the split.
        role_threads = forward_threads(s, p.threads, "ray")
        # ... and where several actors have a forward ready at once (several groups), they take the
        # cores in turns (agents.lm.ComputeTurn, a lock file per machine and run) instead of splitting them.
        turn = _turn_path() if two_pass and p.threads > 1 else None
        resources = actor_resources(s)
        verifier_cls = ray.remote(**resources["verifier"])(Verifier)
        group_cls = ray.remote(**resources["group"])(DeviceGroup)
        members = {i: [d.device_id for d in m] for i, m in enumerate(device_groups(s))}
        # CURVE (agents.security): keys made here, per run, handed out as Ray arguments only. A
        # restarted actor gets the same keys, so the others need no new ones.
        try:
            curve = security.curve_on(s.server.curve, host)
        except ValueError as e:  # off with --address (0.0.0.0)
            raise RunFailed(f"{e}.") from None
        keys = security.RunKeys.new(len(members)) if curve else None

        def client_keys(i: int):
            return keys.for_client(i) if keys else None

        def make_verifier():
            v = verifier_cls.remote(
                p.llm, p.server, s.seed, p.run.vocab_size, clock, host, s.server.port,
                threads=role_threads["llm"], expected_sessions=len(p.specs), dtype=p.llm_dtype,
                device=a.verifier_device, allowed_devices=[d.device for d in p.specs],
                mode="content" if two_pass else "emulate", curve=keys.for_server() if keys else None, turn=turn)
            actors.append(v)
            return v

        def make_group(i: int, incarnation: int = 0):
            g = group_cls.remote(i, [p.specs[d] for d in members[i]], p.run, p.slm, p.policy_specs, None, clock,
                                 role_threads["slm"], p.slm_dtype, a.group_device, two_pass, incarnation, turn=turn)
            actors.append(g)
            return g

        def start_verifier(v) -> str:
            endpoint = ray.get(v.start.remote())
            if opts.address and endpoint.startswith("tcp://0.0.0.0"):
                endpoint = endpoint.replace("0.0.0.0", ray.util.get_node_ip_address(), 1)
            return endpoint

        verifier = make_verifier()
        # Groups start (worker process, SLM load) while the verifier loads its LLM; they learn
        # the endpoint when they run.
        groups = {i: make_group(i) for i in members}
        endpoint = start_verifier(verifier)
        ray.get([g.ready.remote() for g in groups.values()])  # models loaded: emulated time may start
        identities = dict(zip(groups, ray.get([g.identity.remote() for g in groups.values()])))
        t_ready = time.perf_counter()
        t0 = time.time() + 0.2
        ray.get(verifier.set_t0.remote(t0))
        steps = {d.device: 0 for d in p.specs}  # steps drained per device (a restarted group skips them)
        kills = list(opts.chaos_kill)
        # chaos tests: a group kills itself at its own token count (RunOptions.chaos_kill); first incarnations only
        die_at = {int(k[0].split(":")[1]): k[1] for k in kills if k[0] != "verifier"}
        kills = [k for k in kills if k[0] == "verifier"]
        refs = {groups[i].run.remote(t0, endpoint, client_keys(i), die_at_tokens=die_at.get(i)): i
                for i in groups}  # running groups
        finished: dict[int, dict] = {}  # group id -> its run() result
        final_drained: set[int] = set()  # finished groups drained after their run() returned
        restarts = Restarts(a.max_restarts, opts.out_dir)
        sinks.partial["restarts"] = restarts.summary()
        last_progress, last_work = time.monotonic(), None

        errors_before, last_errors = 0, 0  # what dead verifiers did (protocol errors)
        codes_before, last_codes = collections.Counter(), {}  # ... by ErrorCode name
        refused_before, last_refused = collections.Counter(), {}  # ... and clients CURVE refused
        rss = 0
        group_timings, lms, memory = [], {}, {}
        content = Content()

        final = len(p.specs) * p.run.max_new_tokens
        in_recovery = list(opts.chaos_kill_in_recovery)

        def chaos_point(target: str, actor) -> None:
            """Chaos tests: kill -9 `actor` here, in a recovery, if asked (RunOptions.chaos_kill_in_recovery)."""
            if target in in_recovery:
                in_recovery.remove(target)
                kill_now(actor)

        def kill_now(actor) -> None:
            ray.wait([actor.chaos_kill.remote()], timeout=30)  # resolves (with its error) once the process is gone

        class Lost(Exception):
            """An actor died during a recovery call: `who` is "verifier" or a group id."""

            def __init__(self, who, exc: BaseException):
                super().__init__(who)
                self.who, self.exc = who, exc

        def respawn_group(i: int, exc: BaseException) -> int:
            """Count a restart of group i and make its new incarnation (not running yet); returns the
            restart's event index. Lost(i) if the new incarnation dies at once."""
            restarts.allow(f"device group {i}", members[i], _cause(exc), sinks.tokens, sinks.t0)
            restarts.groups[i] = restarts.groups.get(i, 0) + 1
            sinks.restart("group")
            sinks.partial["restarts"] = restarts.summary()
            for ref in [r for r, j in refs.items() if j == i]:  # the dead incarnation's run() (seen via drain)
                del refs[ref]
            finished.pop(i, None)  # wall clock: a group that died before its last drain runs again
            groups[i] = make_group(i, restarts.groups[i])
            chaos_point(f"group:{i}", groups[i])
            try:
                identities[i] = ray.get(groups[i].identity.remote())
            except RayActorError as died:
                raise Lost(i, died) from None
            return len(restarts.events) - 1

        def start_group(i: int) -> None:
            """Hand group i's devices over to its new incarnation on the verifier and run it. Lost("verifier")
            if the verifier dies meanwhile (the group then waits for the next verifier's handover)."""
            chaos_point("verifier", verifier)
            try:
                ray.get(verifier.handover.remote(members[i], identities[i]))
            except RayActorError as died:
                raise Lost("verifier", died) from None
            refs[groups[i].run.remote(t0, endpoint, client_keys(i), skip_steps={d: steps[d] for d in members[i]})] = i

        def restart_verifier(exc: BaseException, skip) -> dict[int, BaseException]:
            """A new verifier rebuilt from the committed sessions of every group but those in `skip`
            (dead, or a new incarnation waiting for its handover); the groups found dead meanwhile are
            returned (restarted next, against the new verifier). Lost("verifier") if the new one dies
            too: the groups stay detached, and the next try detaches them again (idempotent)."""
            nonlocal verifier, endpoint, errors_before, last_errors, last_codes, last_refused
            restarts.allow("verifier", [d.device for d in p.specs], _cause(exc), sinks.tokens, sinks.t0)
            restarts.verifier += 1
            sinks.restart("verifier")
            sinks.partial["restarts"] = restarts.summary()
            errors_before, last_errors = errors_before + last_errors, 0  # what the dead one counted
            codes_before.update(last_codes)
            refused_before.update(last_refused)
            last_codes, last_refused = {}, {}
            states, owners, dead = [], {}, {}
            detached = {i: groups[i].detach.remote() for i in groups if i not in finished and i not in skip}
            for i in groups:
                if i in skip:
                    continue
                try:
                    got = pickle.loads(finished[i]["sessions"]) if i in finished else ray.get(detached[i])
                except RayActorError as died:
                    dead[i] = died
                    continue
                states.extend(got)
                owners.update({st.open.frame.device: identities[i] for st in got})
            v = make_verifier()
            chaos_point("verifier", v)
            try:
                ray.get(v.restore.remote(states, owners))
                new_endpoint = start_verifier(v)
                ray.get(v.set_t0.remote(t0))
            except RayActorError as died:
                raise Lost("verifier", died) from None
            verifier, endpoint = v, new_endpoint
            for i in detached:
                if i not in dead:
                    groups[i].reattach.remote(new_endpoint)
            return dead

        def recover(verifier_exc: BaseException | None, dead: dict[int, BaseException]) -> None:
            """Restart the dead verifier (first) and the dead groups, until every actor is running again.
            An actor that dies during a recovery call (a handover, a restore) is restarted in turn, all
            within actors.max_restarts (Restarts.allow raises RunFailed past it)."""
            t = time.perf_counter()
            first = len(restarts.events)
            spawn = dict(dead)  # group -> why: needs a new incarnation
            waiting: set[int] = set()  # new incarnations waiting for their handover
            while verifier_exc is not None or spawn or waiting:
                try:
                    if verifier_exc is not None:
                        exc, verifier_exc = verifier_exc, None
                        for i, died in restart_verifier(exc, set(spawn) | waiting).items():
                            spawn.setdefault(i, died)
                    elif spawn:
                        i = min(spawn)
                        respawn_group(i, spawn.pop(i))
                        waiting.add(i)
                    else:
                        i = min(waiting)
                        start_group(i)
                        waiting.discard(i)
                except Lost as lost:
                    if lost.who == "verifier":
                        verifier_exc = lost.exc
                    else:
                        waiting.discard(lost.who)
                        spawn[lost.who] = lost.exc
            for e in restarts.events[first:]:
                e["recovery_s"] = round(time.perf_counter() - t, 3)  # to every actor running again

        while refs:
            poll = 0.05 if kills else 0.5  # chaos kills fire at a token count: look often
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=poll)
            dead_groups: dict[int, BaseException] = {}
            for ref in done:
                i = refs.pop(ref)
                try:
                    result = ray.get(ref)  # raises the group's error here
                except RayActorError as exc:
                    dead_groups[i] = exc
                    continue
                finished[i] = result  # its timings, memory and content are taken after the loop
            fresh = []
            for i, ref in [(i, groups[i].drain.remote()) for i in groups]:
                try:
                    fresh.append(ray.get(ref))
                    if i in finished:
                        final_drained.add(i)  # after run() returned: nothing is left in the group
                except RayActorError as exc:
                    if i not in finished:
                        dead_groups.setdefault(i, exc)
                    elif i not in final_drained:
                        # It died after run() returned but before its last drain (a kill that fired late,
                        # e.g. after a restart kept the driver busy): the events of its last steps are
                        # lost. Virtual clock: harmless, the trace is replayed from run()'s content.
                        # Wall clock: they are the trace, so the group runs again (skipping what was drained).
                        if two_pass:
                            final_drained.add(i)
                        else:
                            dead_groups[i] = exc
            events = [e for f in fresh for e in f["events"]]
            new_rows = 0
            for e in events:
                steps[e.device] = max(steps[e.device], e.step + 1)
                new_rows += isinstance(e, TokenCommitted)
            verifier_died = None
            try:
                if not two_pass:
                    events.extend(VerifierBatch.of(b) for b in ray.get(verifier.drain_batches.remote()))
                status = ray.get(verifier.status.remote())
                last_errors, last_codes, last_refused = status["errors"], status["error_codes"], status["curve_refused"] or {}
            except RayActorError as exc:
                verifier_died, status = exc, {"lag_s": 0.0, "errors": last_errors, "failure": None}
            (sinks.content if two_pass else sinks.events)(events)
            sinks.clock(max([f["lag_s"] for f in fresh] + [status["lag_s"]]), errors_before + last_errors,
                        codes_before + collections.Counter(last_codes))
            if status["failure"]:
                raise RuntimeError(f"verifier failed:\n{status['failure']}")
            if verifier_died is not None or dead_groups:
                recover(verifier_died, dead_groups)
            # chaos tests: kill -9 an actor mid-run (a verifier kill at the run's end fires after the loop)
            for kill in [k for k in kills if k[1] <= sinks.tokens and k[1] < final]:
                kills.remove(kill)
                verifier.chaos_kill.remote()
            # Stall check: a finished group, a new row, a restart or any verifier work (a batch, a
            # prefill chunk: a large fleet's prompts take minutes with no batch) is progress.
            work = (status.get("batches", -1), sum(t["calls"] for t in status.get("timings", {}).values()))
            if done or new_rows or dead_groups or work != last_work:
                last_progress, last_work = time.monotonic(), work
            elif a.stall_timeout_s and time.monotonic() - last_progress > a.stall_timeout_s:
                try:
                    waiting = ray.get(verifier.waiting_on.remote(), timeout=30)
                except Exception as exc:  # the message still names the running groups
                    waiting = {"error": f"{type(exc).__name__}: {exc}"}
                raise RunFailed(_stall_message(waiting, a.stall_timeout_s, {i: members[i] for i in refs.values()},
                                               sinks.tokens, opts.out_dir))
        for kill in list(kills):  # chaos tests: verifier kills left fire after every group has finished
            kills.remove(kill)
            kill_now(verifier)
        for i, result in sorted(finished.items()):
            rss += result["max_rss_bytes"]
            group_timings.append(result["timings"])
            memory[f"group {i}"] = result["memory"]
            lms["slm"] = _every_group_served(lms.get("slm"), result["lm"])
            if two_pass:
                content.devices.update(result["content"])
        while True:  # the verifier may still die here, every group finished: rebuilt from their sessions
            try:
                status = ray.get(verifier.status.remote())
                if two_pass:
                    content.verdicts = ray.get(verifier.content_log.remote())  # packed (agents.engine)
                else:  # batches after the last drain (a dead verifier's since then are lost: sizes only)
                    last_batches = ray.get(verifier.drain_batches.remote())
                break
            except RayActorError as exc:
                recover(exc, {})
        status["errors"] += errors_before
        codes = codes_before + collections.Counter(status["error_codes"])
        sinks.clock(status["lag_s"], status["errors"], codes)  # errors since the last poll
        refused = (refused_before + collections.Counter(status["curve_refused"])) if curve else None
        if two_pass:
            policies = {name: load_policy(spec) for name, spec in p.policy_specs.items()}
            # The timed events (link events included) come from the replay, here.
            # history=False: the rows leave as events only, the driver keeps none of them
            replay = replay_content(p.specs, p.run, p.server, policies, content, on_events=sinks.events, history=False)
            status["timings"] = merge(status["timings"], {"replay": replay.group_timings["replay"]})
        else:
            sinks.events([VerifierBatch.of(b) for b in last_batches])
        t_end = time.perf_counter()
        # Peak memory of the run: the sum of every actor's peak (an upper bound on the
        # simultaneous peak) plus this driver's (_write adds it once the results are merged).
        rss += status["max_rss_bytes"]
        groups_t = merge(*group_timings)
        load = max([t.get("startup.model_load", {}).get("seconds", 0.0) for t in group_timings]
                   + [status["timings"].get("startup.model_load", {}).get("seconds", 0.0)])
        startup = {"ray (with planning alongside)": ray_s, "actors_ready": t_ready - t_ray, "model_load": load}
        out = {"protocol_errors": status["errors"], "protocol_errors_by_reason": dict(sorted(codes.items())),
               "curve_refused": dict(refused) if refused is not None else None,
               "lag_s": status["lag_s"], "peak_rss_bytes": rss,
               "restarts": restarts.summary(), "curve": curve,
               "compute": {**compute_info(p, {**lms, "llm": status["lm"]}, "ray"),
                           "memory": {"verifier": status["memory"], **memory}},
               "profile": breakdown(0.0, t_end - t_ready, startup, groups_t, status["timings"])}
        return out
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        if started:
            ray.shutdown()
        if turn and not opts.address:  # local Ray: the actors' lock file is this machine's
            Path(turn).unlink(missing_ok=True)
