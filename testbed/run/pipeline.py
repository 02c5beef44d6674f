"""One run, top to bottom: validate -> plan -> engine (local | Ray) -> sinks -> write.

    validate  testbed.preflight: every check before Ray starts or anything is written
    plan      testbed.run.plan (on Ray: while Ray starts, testbed.run.ray_setup)
    engine    testbed.run.local.run_local | testbed.run.ray_driver.RayDriver; content libraries:
              testbed.run.replay.run_replay
    sinks     testbed.sinks.Sinks: metrics collector, streaming results writer, progress
    write     tokens.parquet, summary.json, scenario.yaml; pass@1 and the report (testbed.run.write)

Every actor and socket is cleaned up on exit, on error and on Ctrl-C; the partial results are kept.
"""

from __future__ import annotations

import json
import time

from testbed.run.options import RunOptions
from testbed.run.plan import Plan, plan, resolved_scenario
from testbed.run.write import write_run
from testbed.scenario import Scenario, dump_scenario
from testbed.sinks import Sinks

ENGINES = ("ray", "local")


def run_scenario(s: Scenario, opts: RunOptions) -> dict:
    """Run one scenario to the end; returns the summary (also written to opts.out_dir)."""
    from testbed.preflight import preflight

    t0 = time.time()
    if opts.engine not in ENGINES:
        raise ValueError(f"engine must be ray or local, got {opts.engine!r}")
    checked = preflight(s, engine=opts.engine, address=opts.address)  # a bad scenario leaves no trace
    p, ray_owned, ray_s = _plan(s, opts, checked)
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
        status = _engine(p, opts, sinks, ray_owned, ray_s)
        ok = True
    finally:
        sinks.close()
        write_run(p, opts, sinks, status, ok, time.time() - t0)
        sinks.linger(opts.linger_s)
    return json.loads((opts.out_dir / "summary.json").read_text())


def _plan(s: Scenario, opts: RunOptions, checked) -> tuple[Plan, bool, float]:
    """(plan, whether this run started Ray, Ray's start-up seconds)."""
    if opts.engine == "ray" and not s.replays_library:  # a library replay starts Ray itself, if at all
        from testbed.run.ray_setup import plan_while_ray_starts

        return plan_while_ray_starts(s, opts, checked)
    return plan(s, checked, engine=opts.engine), False, 0.0


def _engine(p: Plan, opts: RunOptions, sinks: Sinks, ray_owned: bool, ray_s: float) -> dict:
    if p.content is not None:  # content libraries: no model runs (testbed.run.replay)
        from testbed.run.replay import run_replay

        return run_replay(p, opts, sinks)
    if opts.engine == "local":
        from testbed.run.local import run_local

        return run_local(p, opts, sinks)
    from testbed.run.ray_driver import RayDriver

    return (opts.driver or RayDriver)(p, opts, sinks, ray_owned, ray_s).run()
