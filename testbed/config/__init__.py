"""The scenario implementation, one module per concern; import the public API from
testbed.scenario, which re-exports it.

Dependencies run one way (each module imports only those above it):

    errors   Problem, ScenarioError, pydantic errors -> field-path problems, line lookup
    checks   field checks that ask agents.models, netem, policies, the resolver, agents.models.hardware
    schema   the pydantic models (Scenario and its parts) and set_key, the override/sweep keys
    io       YAML in (with line index) and out, bundled scenarios, parse/load/dump
    sweeps   override, sweep_points, expand_sweep
    devices  TierDevice, devices, device_groups, resolve_link, policy_name

testbed.prompts uses schema (Prompts) and errors; nothing here imports testbed.prompts.
"""
