"""Partitions of a library replay, each replayed apart: in this process one after another, or in
parallel as Ray tasks (docs/design.md section 8).

A partition is the devices one verifier serves (testbed.run.replay.partitions). It folds its own events
into its own collector and writes its own rows (tokens.parts/<verifier>.parquet), so nothing per token
crosses a process: the driver absorbs each partition's collector state (testbed.metrics.Collector.absorb)
as it finishes, and joins the files at the end (testbed.results.concat_parts). The same function replays
a partition in both places (`replay_one`), so the two give the same tokens.parquet and metrics.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testbed.run.options import RunOptions
from testbed.run.plan import Plan


@dataclass
class PartitionResult:
    """One partition replayed: what the driver's sinks take in (testbed.sinks.Sinks.partition)."""

    verifier: str
    devices: int
    tokens: int
    path: Path | None  # its rows, sorted by device and token index (None: no row)
    collector: object  # testbed.metrics.CollectorState
    batch_sizes: list[int]
    ended: set[int]
    timings: dict
    wall_s: float
    max_rss_bytes: int = 0  # its process's peak so far
    pid: int = 0


def replay_one(p: Plan, slot, server, ids: np.ndarray, out_dir: Path, policies: dict, source=None) -> PartitionResult:
    """Replay the devices `ids` against the verifier `slot` (agents.routing.VerifierSlot; its profile
    `server`) with a collector and a results writer of their own; content from `source`
    (testbed.run.replay.replay_partition)."""
    from agents.actors import max_rss_bytes
    from testbed.metrics import Collector, verifier_label
    from testbed.results import ResultsWriter
    from testbed.run.replay import replay_partition
    from testbed.sinks import tally

    t0 = time.perf_counter()
    folder = Path(out_dir) / "tokens.parts"
    verifier = slot.name
    label = verifier_label(slot.name, slot.pool, len(p.verifiers))
    collector = Collector(p.scenario.name, vocab_size=p.run.vocab_size, verifier=label)
    writer = ResultsWriter(folder / f"{verifier}.shards", "tokens")
    ended: set[int] = set()
    batch_sizes: list[int] = []
    tokens = 0

    def on_events(events: list) -> None:
        nonlocal tokens
        tokens += tally(events, ended, batch_sizes)
        collector.ingest_events(events)
        writer.add(events)

    timings = replay_partition(p, server, ids, policies, on_events, source)
    writer.close()
    path = None
    if writer.rows:
        path = folder / f"{verifier}.parquet"
        writer.merge(path, frame=False)
    else:
        writer.discard()
    collector.close()
    return PartitionResult(
        verifier,
        len(ids),
        tokens,
        path,
        collector.state(),
        batch_sizes,
        ended,
        timings,
        time.perf_counter() - t0,
        max_rss_bytes(),
        os.getpid(),
    )


def _replay_chunk(p: Plan, chunk: list[tuple[object, object, np.ndarray]], out_dir: str) -> list[PartitionResult]:
    """A Ray task: several partitions, one after another (a task per partition would cost more in
    scheduling than a small partition takes)."""
    from policies import load_policy

    policies = {name: load_policy(spec) for name, spec in p.policy_specs.items()}
    return [replay_one(p, slot, server, ids, Path(out_dir), policies) for slot, server, ids in chunk]


def replay_here(p: Plan, opts: RunOptions, sinks, parts, source=None) -> dict:
    """Every partition in this process, one after another (content from `source`: replay_one)."""
    from policies import load_policy

    policies = {name: load_policy(spec) for name, spec in p.policy_specs.items()}
    results = []
    for slot, server, ids in parts:
        results.append(replay_one(p, slot, server, ids, opts.out_dir, policies, source))
        sinks.partition(results[-1])
    return _status(results, workers=1)


def chunks(parts: list, min_devices: int = 2000) -> list[list]:
    """Partitions grouped into tasks of at least min_devices devices each (a partition of a few devices
    takes less time than a task's scheduling; one of a thousand takes seconds), in order."""
    out: list[list] = [[]]
    n = 0
    for part in parts:
        if n >= min_devices:
            out.append([])
            n = 0
        out[-1].append(part)
        n += len(part[2])
    return [c for c in out if c]


def replay_on_ray(p: Plan, opts: RunOptions, sinks, parts) -> dict:
    """Every partition as Ray tasks (chunks), their results absorbed as they finish, so the live metrics
    move every few seconds. A local Ray is started (and stopped) when none is up; opts.address joins a
    cluster, whose nodes must see opts.out_dir (a shared folder)."""
    import ray

    owned = not ray.is_initialized()
    if owned:
        ray.init(address=opts.address or "local", include_dashboard=False, configure_logging=False)
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # retried when its worker dies: a partition replays to the same rows, its files are rewritten
        task = ray.remote(num_cpus=1, max_retries=3)(_replay_chunk)
        plan_ref = ray.put(p)
        pending = [task.remote(plan_ref, chunk, str(opts.out_dir)) for chunk in chunks(parts)]
        results: list[PartitionResult] = []
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for part in ray.get(done[0]):
                results.append(part)
                sinks.partition(part)
        order = {slot.name: i for i, (slot, _, _) in enumerate(parts)}
        sinks.parts.sort(key=lambda path: order[path.name.removesuffix(".parquet")])  # verifier order
        return _status(results, workers=cpus)
    finally:
        if owned:
            ray.shutdown()


def _status(results: list[PartitionResult], workers: int) -> dict:
    """The status entries of the replayed partitions. peak_rss_bytes: the sum of the peaks of the worker
    processes that replayed them (testbed.run.write adds this driver's: the run's total)."""
    from agents.timing import merge

    peaks: dict[int, int] = {}
    for r in results:
        if r.pid != os.getpid():
            peaks[r.pid] = max(peaks.get(r.pid, 0), r.max_rss_bytes)
    return {
        "timings": merge(*(r.timings for r in results)),
        "peak_rss_bytes": sum(peaks.values()),
        "partitions": {
            "count": len(results),
            "workers": workers,
            "worker_processes": len(peaks),
            "devices_max": max((r.devices for r in results), default=0),
            "replay_s_sum": round(sum(r.wall_s for r in results), 3),
        },
    }
