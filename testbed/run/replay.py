"""The library replay engine: a fleet whose content comes from content libraries, in emulated time,
with no model (docs/design.md section 8).

Devices are partitioned by the verifier that serves them (the routing decided at session open:
testbed.run.plan), and partitions are independent: no device of one ever meets another's verifier
queue. Each partition is one agents.engine.replay_content (the virtual clock's timing replay, the very
code a model run replays its own content with) over its devices' recorded content
(testbed.content.plan.LibraryContent), so a library recorded by a run and replayed with the same
timing settings gives that run's trace.

    local   partitions one after another in this process
    ray     partitions in parallel as Ray tasks
Either way each partition folds its own metrics and writes its own rows (testbed.run.partitions), and
the driver absorbs them as they finish.
"""

from __future__ import annotations

import time

import numpy as np

from testbed.run.options import RunOptions
from testbed.run.plan import Plan


def partitions(p: Plan) -> list[tuple[object, object, np.ndarray]]:
    """(verifier: its agents.routing.VerifierSlot, its agents.verifier.ServerProfile, the device ids it
    serves), for every verifier that serves a device."""
    if p.verifier_of is None:
        return [(p.verifiers[0][0], p.server, np.arange(len(p.specs)))]
    order = np.argsort(p.verifier_of, kind="stable")
    bounds = np.searchsorted(p.verifier_of[order], np.arange(len(p.verifiers) + 1))
    out = []
    for v, (slot, profile) in enumerate(p.verifiers):
        ids = np.sort(order[bounds[v] : bounds[v + 1]])
        if len(ids):
            out.append((slot, profile, ids))
    return out


def replay_partition(p: Plan, server, ids: np.ndarray, policies: dict, on_events, source=None) -> dict:
    """Replay one partition's devices against its verifier, their content from `source` (a
    testbed.content.plan.LibraryContent, by default the plan's, or a model run's agents.record.Content);
    returns its timings (agents.timing)."""
    from agents.engine import replay_content

    specs = [p.specs[int(i)] for i in ids]
    content = (source if source is not None else p.content).select([int(i) for i in ids])
    result = replay_content(specs, p.run, server, policies, content, on_events=on_events, history=False)
    return result.group_timings


def run_replay(p: Plan, opts: RunOptions, sinks) -> dict:
    """Replay every partition into `sinks`; the run's status entries (testbed.run.write)."""
    from agents.models.hardware import machine_info
    from testbed.profile import breakdown
    from testbed.run.partitions import replay_here, replay_on_ray

    t0 = time.perf_counter()
    parts = partitions(p)
    if opts.engine == "ray" and len(parts) > 1:
        status = replay_on_ray(p, opts, sinks, parts)
    else:
        status = replay_here(p, opts, sinks, parts)
    sinks.clock(0.0, 0)
    t_end = time.perf_counter()
    libraries = sorted({t.content.library for t in p.scenario.tiers})
    return {
        "compute": {"machine": machine_info(), "content": {"libraries": libraries, "dtype": p.llm_dtype}},
        "profile": breakdown(0.0, t_end - t0, {}, status.pop("timings"), {}),
        **status,
    }
