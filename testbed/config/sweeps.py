"""Overrides and sweeps: a scenario with some fields replaced (override, what CLI options do),
and the runs of a `sweep:` block (sweep_points, expand_sweep), each named after its values.

Keys are those of testbed.config.schema.set_key; every result is validated again.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from testbed.config.errors import Problem, ScenarioError
from testbed.config.io import parse_scenario
from testbed.config.schema import Scenario, set_key


def override(s: Scenario, changes: dict[str, Any] | None = None, /, **kw: Any) -> Scenario:
    """A copy of `s` with fields replaced and re-validated: override(s, clock="wall", address=None).
    Keys as in schema.set_key: clock, seed, address, devices_per_group, metrics_port, policy (all tiers),
    "tiers.phone.count", "server.max_batch", ... A None value means "leave unchanged" (CLI options)."""
    d = s.resolved_dict()
    for key, value in {**(changes or {}), **kw}.items():
        if value is None:
            continue
        try:
            set_key(d, key, value, s)
        except KeyError as e:
            raise ScenarioError([Problem(key, e.args[0])], "override") from None
    return parse_scenario(d, source="override")


def _label(key: str, value: Any, index: int) -> str:
    leaf = key.split(".")[-1]
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict) and isinstance(value.get("name"), str):
        params = [f"{k}={v}" for k, v in value.items() if k != "name" and isinstance(v, (str, int, float, bool))]
        text = "-".join([value["name"], *params])
    elif isinstance(value, (int, float, bool)):
        text = f"{leaf}={value}"
    else:
        text = f"{leaf}{index}"
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def sweep_points(s: Scenario) -> list[dict[str, Any]]:
    """The {key: value} combination of each run of expand_sweep(s), in the same order."""
    if not s.sweep:
        return [{}]
    keys = list(s.sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(s.sweep[k] for k in keys))]


def expand_sweep(s: Scenario) -> list[Scenario]:
    """One scenario per combination of `sweep` values (cartesian product, keys in file order),
    each named <name>-<labels> (e.g. paper-hlm, paper-u-hlm) and without `sweep`."""
    if not s.sweep:
        return [s]
    runs, names = [], set()
    for point in sweep_points(s):
        d = {**s.resolved_dict(), "sweep": None}
        labels = []
        for key, value in point.items():
            set_key(d, key, value, s)
            labels.append(_label(key, value, s.sweep[key].index(value)))
        name = f"{s.name}-{'-'.join(labels)}"[:200]
        if name in names:
            name = f"{name[:190]}-{len(runs)}"
        names.add(name)
        d["name"] = name
        runs.append(parse_scenario(d, source=f"{s.name} sweep"))
    return runs
