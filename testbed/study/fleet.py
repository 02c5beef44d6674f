"""`testbed reproduce fleet`: the paper's policies on heterogeneous fleets sharing one verifier with real
batching (docs/design.md section 8).

The fleet base scenario (testbed.study.scenarios FLEET_YAML: its tier counts are proportions, scaled to
each fleet size) runs every policy at each fleet size of the --size: system throughput, Jain fairness
and mean verifier batch size vs fleet size. Its own calibration point gives a, b and k*; rand-hlm
matches u-hlm's skip rate at each size. Not scored for accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.scenario import Scenario, parse_scenario
from testbed.study.analysis import fleet_row
from testbed.study.fit import choose_fit
from testbed.study.points import Point, Study, StudyResult
from testbed.study.report import write_fleet_report
from testbed.study.scenarios import fleet_base, n_prompts, policy_spec, sized, with_policy
from testbed.study.sizes import FLEET_POLICIES, SIZES, Size


def fleet_points(size: Size, sets: dict[str, Any] | None) -> list[Point]:
    """Every policy at every fleet size, rand-hlm after u-hlm (it skips at u-hlm's measured rate)."""
    pts = []
    for n in size.fleet_sizes:
        base = fleet_base(size, n, sets)
        order = [p for p in FLEET_POLICIES if p != "rand-hlm"] + ["rand-hlm"]  # rand-hlm after u-hlm
        for name in order:

            def build(st: Study, name=name, n=n, base=base) -> Scenario:
                params: dict[str, Any] = {}
                if name == "cu-hlm-adaptive":
                    params["risk"] = size.risks[0]
                if name == "rand-hlm":
                    params["skip_rate"] = round(float(st.summaries[f"u-hlm-n{n}"].get("skip_rate") or 0.0), 4)
                return with_policy(base, policy_spec(name, st.fit, **params), f"reproduce-fleet-{name}-n{n}")

            pts.append(Point(f"{name}-n{n}", "fleet", name, build, name, {"fleet_size": n}, scored=False))
    return pts


def fleet_calibration(size: Size, sets: dict[str, Any] | None) -> Scenario:
    """The calibration point's scenario: hlm on one device per problem of the first tier."""
    d = sized("reproduce-fleet", size, size.calibration_tokens, sets).resolved_dict()
    d["tiers"] = [{**d["tiers"][0], "count": n_prompts(size), "policy": "hlm"}]
    d["name"] = "reproduce-fleet-calibration"
    return parse_scenario(d)


def run_fleet(
    size: str | Size = "smoke",
    out: str | Path = "runs/reproduce-fleet",
    *,
    engine: str = "local",
    sets: dict[str, Any] | None = None,
    a: float | None = None,
    b: float | None = None,
    log: Callable[[str], None] | None = None,
) -> StudyResult:
    """The fleet study (module docstring); returns the table rows and the report path."""
    size = SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    points = fleet_points(size, sets)
    study = Study(out, engine, log, total=len(points) + 1)
    study.log(
        f"reproduce fleet --size {size.name}: fleet sizes {', '.join(map(str, size.fleet_sizes))}, "
        f"{size.fleet_tokens} tokens per device, {len(points) + 1} points -> {out}"
    )
    study.run_calibration(fleet_calibration(size, sets), size.kstar_tokens)
    study.fit = choose_fit(study.calibration, a, b)
    for p in points:
        study.run_point(p)
    rows = [fleet_row(p, study.summaries[p.name]) for p in points]
    report = write_fleet_report(study, size, rows)
    return StudyResult(out, report, rows, study.fit, study.statuses)
