"""Ray for one run: started while the scenario is planned, and what each actor asks of it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from testbed.run.options import RunOptions
from testbed.run.plan import Plan, plan
from testbed.scenario import Scenario


def actor_resources(s: Scenario) -> dict[str, dict]:
    """What each actor asks Ray for: no CPU reservation (actors share cores; their torch threads
    are set explicitly) and the scenario's GPU share (fractional for groups)."""
    a = s.actors
    return {
        "verifier": {"num_cpus": 0, "num_gpus": a.verifier_gpus, "max_concurrency": 4},
        "group": {"num_cpus": 0, "num_gpus": a.group_gpus, "max_concurrency": 2},
    }


def local_gpus(s: Scenario) -> int:
    """GPUs a local Ray may hand out: those torch sees, when the scenario places work on one."""
    if s.actors.verifier_gpus == 0 and s.actors.group_gpus == 0:
        return 0
    import torch

    return torch.cuda.device_count()


def turn_path() -> str:
    """A lock file for one run's ComputeTurn, in each machine's temp folder (cores are per machine)."""
    import secrets
    import tempfile

    return str(Path(tempfile.gettempdir()) / f"hlm-compute-turn-{secrets.token_hex(6)}.lock")


def plan_while_ray_starts(s: Scenario, opts: RunOptions, checked=None) -> tuple[Plan, bool, float]:
    """plan(s) in a thread while Ray starts in this one (each takes seconds: tokenizer, imports;
    Ray's processes). Returns (plan, whether this call started Ray, Ray's start-up seconds)."""
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
            ray.init(
                address=opts.address or "local",
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=True,
                **(
                    {}
                    if opts.address
                    else {"num_cpus": max(2, s.n_devices // s.actors.devices_per_group + 1), "num_gpus": local_gpus(s)}
                ),
            )
    finally:
        worker.join()
    ray_s = time.perf_counter() - t
    if "error" in box:
        if owned:
            ray.shutdown()
        raise box["error"]
    return box["plan"], owned, ray_s
