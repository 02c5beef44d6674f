"""Plan: a checked scenario resolved into what the engines take (docs/design.md section 3).

Devices get their prompt, link profile and policy label (agents.device.DeviceSpec); the run its
parameters (agents.device.RunParams: seed, lengths, stop rule); the models their dtype and the
content forwards their thread count, both pinned if `auto`, so scenario.yaml repeats the run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agents.device import DeviceSpec, RunParams
from agents.verifier import ServerProfile
from testbed.scenario import Scenario, devices, policy_name, resolve_link


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
    content: Any = None  # a library replay's testbed.content.plan.LibraryContent (then slm, llm are None)
    # Several verifiers (docs/design.md section 8): each (agents.routing.VerifierSlot, ServerProfile), index =
    # position; empty = the one verifier of `server`. verifier_of: each spec's verifier index (p.specs order),
    # fixed at session open by the scenario's router; None = every device on verifier 0.
    verifiers: list = field(default_factory=list)
    verifier_of: np.ndarray | None = None

    def __post_init__(self):
        if not self.verifiers:
            from agents.routing import VerifierSlot

            self.verifiers = [(VerifierSlot(0, "verifier", "verifier", float(self.server.max_batch)), self.server)]


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
    from agents.models import model_dtype
    from agents.models.hardware import resolve_threads
    from testbed.preflight import preflight
    from testbed.prompts import prompt_index

    if s.replays_library:  # no model: the content is a library's (testbed.content)
        from testbed.content.plan import plan_library

        return plan_library(s)
    checked = checked or preflight(s, engine=engine, address=address)
    prompts, vocab = checked.prompts, checked.vocab_size
    policy_specs, tier_label = policy_labels(s)
    specs = []
    for d in devices(s):
        p = prompts[prompt_index(d.device_id, len(prompts))]
        specs.append(
            DeviceSpec(
                d.device_id,
                d.tier,
                tier_label[d.tier],
                d.slm_ms_per_token,
                resolve_link(d.link),
                p.index,
                tuple(p.token_ids),
            )
        )
    run = RunParams(
        seed=s.seed,
        max_new_tokens=s.generation.max_new_tokens,
        temperature=s.generation.temperature,
        vocab_size=vocab,
        batch_slm=s.actors.batch_slm,
        stop=stop_rule(s),
    )
    threads = resolve_threads(s.actors.threads)
    role_threads = forward_threads(s, threads, engine)  # auto's dtype probe runs at the count used
    verifiers, verifier_of = route_devices(s, specs)
    return Plan(
        s,
        specs,
        run,
        verifiers[0][1] if len(verifiers) == 1 else s.server.profile(),  # one verifier: its own profile
        policy_specs,
        s.models.slm,
        s.models.llm,
        model_dtype(s.models.slm, s.models.dtype, s.actors.group_device, role_threads["slm"]),
        model_dtype(s.models.llm, s.models.dtype, s.actors.verifier_device, role_threads["llm"]),
        threads,
        verifiers=verifiers,
        verifier_of=verifier_of,
    )


def policy_labels(s: Scenario) -> tuple[dict[str, object], dict[str, str]]:
    """(label -> policy spec, tier name -> its policy's label): a preset's name, or name@tier where
    tiers use the same preset with other parameters (the tokens table's `policy` column)."""
    policy_specs: dict[str, object] = {}
    tier_label: dict[str, str] = {}
    for t in s.tiers:
        label = policy_name(t.policy)
        if label in policy_specs and policy_specs[label] != t.policy:
            label = f"{label}@{t.name}"  # same preset, other parameters: keep them apart
        policy_specs[label] = t.policy
        tier_label[t.name] = label
    return policy_specs, tier_label


def route_devices(s: Scenario, specs: list[DeviceSpec]) -> tuple[list, np.ndarray]:
    """The scenario's verifiers and each spec's verifier index, by its router (agents.routing), at
    session open: from each device's id, tier, its tier's region and its policy label."""
    from agents.routing import RoutedDevice, route

    region = {t.name: t.region for t in s.tiers}
    verifiers = s.verifiers()
    devices = [RoutedDevice(d.device, d.tier, region[d.tier], d.policy_name) for d in specs]
    return verifiers, route(s.routing, devices, [slot for slot, _ in verifiers])


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
    if p.content is not None:  # a library replay: its sequences' length is the library's
        return override(p.scenario, {"generation.max_new_tokens": p.run.max_new_tokens})
    if p.scenario.models.dtype == "auto" and p.slm_dtype == p.llm_dtype:
        changes["models.dtype"] = p.slm_dtype
    if p.scenario.actors.threads == "auto":
        changes["actors.threads"] = p.threads
    return override(p.scenario, changes) if changes else p.scenario


def compute_info(p: Plan, lms: Mapping[str, Any], engine: str = "local") -> dict:
    """How the run computed: machine, dtypes, threads, each model's forward layout. threads: the
    scenario's actors.threads ("requested"), what it resolved to ("content"), and the torch threads
    each role's forwards ran at ("slm", "llm"; each model's own "threads" is what torch reported)."""
    from agents.models.hardware import machine_info

    a = p.scenario.actors
    return {
        "machine": machine_info(),
        "dtype": {"requested": p.scenario.models.dtype, "slm": p.slm_dtype, "llm": p.llm_dtype},
        "threads": {
            "requested": a.threads,
            "content": p.threads,
            **forward_threads(p.scenario, p.threads, engine),
            "group": a.group_threads,
            "verifier": a.verifier_threads,
            # other work on the cores slows split forwards many times (agents.models.hardware)
            "machine_load_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        "device": {"group": a.group_device, "verifier": a.verifier_device},
        "batch_slm": a.batch_slm,
        **{role: lm for role, lm in lms.items() if lm},
    }


def load_lms(p: Plan):
    """The run's (SLM, LLM) as agents.lm.BatchedLM, in the plan's dtypes, on the scenario's devices."""
    from agents.lm import BatchedLM
    from agents.models import load_model

    a = p.scenario.actors
    return (
        BatchedLM(load_model(p.slm, dtype=p.slm_dtype, device=a.group_device)),
        BatchedLM(load_model(p.llm, dtype=p.llm_dtype, device=a.verifier_device)),
    )
