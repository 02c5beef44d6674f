"""Scenario files: which models, prompts, fleet, links, policies and server a run uses.

A scenario is a YAML file validated on load into the pydantic models of testbed.config.schema:

    name: smoke
    seed: 7
    clock: virtual                 # virtual | wall
    time_scale: 1.0                # wall clock only: emulated seconds per real second
    models: {slm: tiny, llm: tiny}
    prompts: {source: humaneval, count: 8}     # or {texts: [...]} or {file: prompts.jsonl}
    generation: {max_new_tokens: 32, temperature: 1.0}
    server: {verify_ms: {base: 20.0, per_token: 0.5, per_sequence: 2.0}, max_batch: 8, max_wait_ms: 2.0}
    tiers:
      - {name: phone, count: 6, slm_ms_per_token: 30.0, policy: {name: cu-hlm},
         link: {uplink: {rate_mbps: 2, delay_ms: 20}, downlink: {rate_mbps: 20, delay_ms: 20}}}
      - {name: laptop, count: 2, slm_ms_per_token: 12.0, link: wifi-weak, policy: u-hlm}
    actors: {devices_per_group: 4}
    metrics: {port: 9400}          # Prometheus exporter; absent = none, 0 = any free port
    sweep: {policy: [hlm, u-hlm, cu-hlm]}      # optional: one run per value (expand_sweep)

Every error names the field path (`tiers[1].link.uplink.rate_mbps`), what was expected and,
when the scenario came from a file, the file and line. Links are checked by `netem` (and
refused when they lose every packet) and policies by `policies.load_policy`; what needs the
models, the prompts or this machine (vocabularies, positions, memory, the bind address) is
checked by testbed.preflight, which `testbed validate` and `testbed run` call before anything
starts, so a scenario that validates will not fail mid-run for these reasons.

This module is the public API; the code lives in testbed.config, one module per concern
(errors, checks, schema, io, sweeps, devices: see its docstring).
"""

from __future__ import annotations

from testbed.config.checks import host_problem
from testbed.config.devices import TierDevice, device_groups, devices, policy_name, resolve_link
from testbed.config.errors import Problem, ScenarioError, format_path
from testbed.config.io import (
    bundled_dir,
    bundled_scenarios,
    dump_scenario,
    load_scenario,
    parse_scenario,
    read_yaml,
    scenario_path,
    scenario_yaml,
)
from testbed.config.schema import (
    HUMANEVAL_SIZE,
    NAME_PATTERN,
    SHORTCUTS,
    TIER_WIDE_KEYS,
    Actors,
    Generation,
    Metrics,
    Models,
    Prompts,
    Scenario,
    Server,
    Tier,
    VerifyTime,
)
from testbed.config.sweeps import expand_sweep, override, sweep_points

__all__ = [
    # schema
    "Scenario",
    "Models",
    "Prompts",
    "Generation",
    "VerifyTime",
    "Server",
    "Tier",
    "Actors",
    "Metrics",
    "NAME_PATTERN",
    "SHORTCUTS",
    "TIER_WIDE_KEYS",
    "HUMANEVAL_SIZE",
    "host_problem",
    # errors
    "Problem",
    "ScenarioError",
    "format_path",
    # files
    "load_scenario",
    "parse_scenario",
    "read_yaml",
    "scenario_path",
    "scenario_yaml",
    "dump_scenario",
    "bundled_dir",
    "bundled_scenarios",
    # overrides and sweeps
    "override",
    "sweep_points",
    "expand_sweep",
    # devices
    "TierDevice",
    "devices",
    "device_groups",
    "policy_name",
    "resolve_link",
]
