"""`testbed validate FILE_OR_NAME [--json] [--resolved]`: check a scenario without running it."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def validate(
    file_or_name: Annotated[
        str, typer.Argument(metavar="FILE_OR_NAME", help="A scenario YAML file or a bundled scenario name.")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    resolved: Annotated[bool, typer.Option("--resolved", help="Print the fully resolved scenario YAML.")] = False,
) -> None:
    """Validate a scenario file without running it: schema, links, policies, models and prompts."""
    from testbed.preflight import preflight
    from testbed.prompts import PromptError
    from testbed.scenario import Problem, ScenarioError, expand_sweep, load_scenario, scenario_yaml

    try:
        s = load_scenario(file_or_name)
        runs = expand_sweep(s)
        # What `testbed run` checks before it starts: prompts (every JSONL line), vocabularies,
        # positions, memory, the bind address. A sweep: every run, the first failing one named.
        for r in runs:
            where = file_or_name if len(runs) == 1 else f"{file_or_name} (sweep run {r.name})"
            n_prompts = len(preflight(r, source=where).prompts)
    except (ScenarioError, PromptError) as e:
        problems = e.problems if isinstance(e, ScenarioError) else [Problem("prompts", str(e))]
        source = getattr(e, "source", None) or file_or_name
        if json_out:
            print(
                json.dumps(
                    {
                        "ok": False,
                        "scenario": file_or_name,
                        "errors": [{"path": p.path, "message": p.message, "line": p.line} for p in problems],
                    },
                    indent=2,
                )
            )
        else:
            print(str(e) if isinstance(e, ScenarioError) else f"invalid scenario {source}: {e}", file=sys.stderr)
        raise typer.Exit(1) from None

    if resolved:
        print(scenario_yaml(s), end="")
        return
    if json_out:
        print(
            json.dumps(
                {
                    "ok": True,
                    "scenario": s.name,
                    "devices": s.n_devices,
                    "prompts": n_prompts,
                    "tiers": [{"name": t.name, "count": t.count, "policy": t.policy, "link": t.link} for t in s.tiers],
                    "runs": [r.name for r in runs],
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"{s.name}: valid ({s.n_devices} devices, {n_prompts} prompts, {s.clock} clock)")
    for col in ("tier", "devices", "SLM ms/token", "link", "policy"):
        table.add_column(col)
    for t in s.tiers:
        link = (
            t.link
            if isinstance(t.link, str)
            else " / ".join(
                f"{d} {t.link[d].get('rate_mbps', '?')} Mbit/s {t.link[d].get('delay_ms', 0)} ms"
                for d in ("uplink", "downlink")
            )
        )
        pol = t.policy if isinstance(t.policy, str) else t.policy["name"]
        table.add_row(t.name, str(t.count), f"{t.slm_ms_per_token:g}", link, pol)
    console = Console()
    console.print(table)
    if len(runs) > 1:
        console.print(f"sweep: {len(runs)} runs: {', '.join(r.name for r in runs)}")
