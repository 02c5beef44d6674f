"""The local engine: the whole emulation in this process (agents.engine.run_virtual), no Ray, no
sockets. Its trace is the reference the Ray engine reproduces (tests/testbed/test_runtime.py)."""

from __future__ import annotations

import time

from testbed.run.options import RunOptions
from testbed.run.plan import Plan, compute_info, load_lms


def run_local(p: Plan, opts: RunOptions, sinks) -> dict:
    """Run `p` to the end, its events into `sinks`; returns the run's status entries, and under
    "lms" the loaded models (for the compute limit; the pipeline pops them before writing)."""
    import torch

    from agents.engine import run_virtual
    from policies import load_policy
    from testbed.profile import breakdown

    # actors.threads resolved, as the Ray engine's actors in the content pass: kernels split work by
    # thread count, and fp32 rounding with it; equal counts make this engine's trace the Ray engine's.
    # One process computes everything in turn, so it has every core the scenario gives it.
    torch.set_num_threads(p.threads)
    t0 = time.perf_counter()
    policies = {name: load_policy(spec) for name, spec in p.policy_specs.items()}
    slm, llm = load_lms(p)
    t_loaded = time.perf_counter()
    extra: dict = {}
    if len(p.verifiers) > 1:  # several verifiers: the content once, then each verifier's partition
        from agents.engine import run_content
        from agents.timing import merge
        from testbed.run.partitions import replay_here
        from testbed.run.replay import partitions

        result = run_content(p.specs, p.run, p.server, slm, llm, policies, on_events=sinks.content, history=False)
        extra = replay_here(p, opts, sinks, partitions(p), source=result.content)
        result.group_timings = merge(result.group_timings, {"replay": extra.pop("timings")["replay"]})
    else:
        result = run_virtual(
            p.specs,
            p.run,
            p.server,
            slm,
            llm,
            policies,
            on_content_events=sinks.content,
            on_events=sinks.events,
            on_step=lambda group, verifier: sinks.clock(0.0, 0),
            history=False,
        )
    emulation = time.perf_counter() - t_loaded
    return {
        "compute": compute_info(p, {"slm": slm.describe(), "llm": llm.describe()}, "local"),
        "profile": breakdown(
            0.0, emulation, {"model_load": t_loaded - t0}, result.group_timings, result.verifier_timings
        ),
        "lms": (slm, llm),
        "content": result.content,  # the record (agents.record), for a content library; popped before writing
        **extra,
    }
