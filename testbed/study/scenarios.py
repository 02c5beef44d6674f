"""The studies' scenarios and the surgery on them: the two base scenarios (PAPER_YAML, FLEET_YAML),
sized to a --size, every device isolated for the paper's one-device timing, a policy set on every tier.

Devices must not distort each other's timing (the paper has one): `isolate_devices` gives the
verifier a zero-time profile with max_batch >= devices and max_wait 0, so a request is answered at
its arrival and never waits for another device's batch, and moves the LLM's compute for one
verification at batch 1 (the server profile's verify_seconds(1, 1), 16.3 ms) onto each device's
downlink delay. Each device's trace is then the one it would have alone (tested). What this drops
from verify_seconds: its per-token term for the skipped tokens piggybacked on an upload (0.3 ms
each), i.e. the LLM's step is charged once per verification, as in the papers' delay model.
Content (tokens, decisions, betas) is unaffected: it never depends on timing (docs/design.md section 2).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

from testbed.scenario import Scenario, override, parse_scenario, scenario_yaml
from testbed.study.fit import Fit
from testbed.study.sizes import ESTIMATOR, Size

# The studies' base scenarios. Kept here, not in testbed/scenarios/, so that the bundled list stays
# what `testbed run` users see; OUT/points/*/scenario.yaml holds each point's resolved scenario.
PAPER_YAML = """\
# The CU-HLM / U-HLM papers' setting (arXiv 2505.11788, 2412.12687) as `testbed reproduce paper`
# runs it: one device per HumanEval problem, each with its own SLM and its own wireless
# Shannon-rate link (paper-uplink: rate = W log2(1 + SNR)), one LLM at the base station.
#
# `server` here is the LLM's compute time for one verification at batch 1 (one draft):
# base + per_token + per_sequence = 16.3 ms. `testbed reproduce paper` does not run this scenario
# as is: it gives every problem its own device and removes cross-device coupling (the paper has one
# device): the verifier gets a zero-time profile with max_batch >= devices (so no request ever waits
# for another device's), and each device's downlink delay grows by that 16.3 ms instead. A token
# then takes SLM step + uplink + LLM step + downlink when transmitted and the SLM step alone when
# skipped, whatever the other devices do (testbed/study/scenarios.py, isolate_devices). Run literally
# (testbed run on a dump of it) it would have many devices queueing at a batch-1 server.
name: reproduce-paper
seed: 7
clock: virtual
models: {slm: "qwen2.5-coder:slm", llm: "qwen2.5-coder:llm", dtype: auto}
prompts: {source: humaneval, offset: 22, count: 16}   # --size picks the slice
generation: {max_new_tokens: 32, temperature: 1.0}
server: {verify_ms: {base: 15.0, per_token: 0.3, per_sequence: 1.0}, max_batch: 1, max_wait_ms: 0.0}
tiers:
  - name: device
    count: 16                  # one per problem (--size sets it)
    slm_ms_per_token: 25.0     # phone-class SLM step (as the bundled `paper` scenario)
    link: paper-uplink
    policy: hlm                # each point sets its own
actors: {devices_per_group: 16}
"""

FLEET_YAML = """\
# `testbed reproduce fleet`: the paper's policies with many heterogeneous devices sharing one
# verifier (real cross-device batching and queueing). The tier counts below are proportions
# (2 : 1 : 1); testbed reproduce fleet scales them to each fleet size of its --size. Device i
# gets the --size's HumanEval problem i mod their number.
name: reproduce-fleet
seed: 7
clock: virtual
models: {slm: "qwen2.5-coder:slm", llm: "qwen2.5-coder:llm", dtype: auto}
prompts: {source: humaneval, offset: 22, count: 16}
generation: {max_new_tokens: 24, temperature: 1.0}
# One LLM for the whole fleet: a batch costs base + per_token * tokens + per_sequence * batch.
server: {verify_ms: {base: 15.0, per_token: 0.3, per_sequence: 1.0}, max_batch: 64, max_wait_ms: 2.0}
tiers:
  - {name: phone, count: 2, slm_ms_per_token: 25.0, link: paper-uplink, policy: hlm}
  - {name: phone-cell, count: 1, slm_ms_per_token: 30.0, link: cell-rayleigh, policy: hlm}
  - {name: laptop, count: 1, slm_ms_per_token: 12.0, link: wifi-weak, policy: hlm}
actors: {devices_per_group: 64}
"""
BASES = {"reproduce-paper": PAPER_YAML, "reproduce-fleet": FLEET_YAML}


def base_scenario(name: str) -> Scenario:
    """reproduce-paper or reproduce-fleet (the YAML above), validated."""
    from testbed.scenario import read_yaml

    data, lines = read_yaml(BASES[name], name)
    return parse_scenario(data, source=name, lines=lines)


def _named_link(spec: Any) -> dict:
    """A link spec as a dict {uplink, downlink} (a named profile resolved through netem)."""
    if isinstance(spec, str):
        import netem

        d = netem.get_profile(spec).to_dict()
        return {"uplink": d["uplink"], "downlink": d["downlink"]}
    return {k: v for k, v in spec.items() if k in ("uplink", "downlink")}


def llm_ms(s: Scenario) -> float:
    """The LLM's compute for one verification at batch 1 (one draft), in ms."""
    return s.server.profile().verify_seconds(1, 1) * 1000.0


def isolate_devices(s: Scenario) -> Scenario:
    """The papers' one-device timing for every device of `s` (module docstring): a zero-time verifier
    that never queues, the LLM's batch-1 step added to each device's downlink delay."""
    d = s.resolved_dict()
    extra = llm_ms(s)
    for t in d["tiers"]:
        link = _named_link(t["link"])
        down = dict(link["downlink"])
        down["delay_ms"] = float(down.get("delay_ms", 0.0)) + extra
        t["link"] = {"uplink": dict(link["uplink"]), "downlink": down}
    d["server"] = {
        **d["server"],
        "verify_ms": {"base": 0.0, "per_token": 0.0, "per_sequence": 0.0},
        "max_batch": max(1, s.n_devices),
        "max_wait_ms": 0.0,
    }
    return parse_scenario(d, source=f"{s.name} (isolated devices)")


def n_prompts(size: Size) -> int:
    from testbed.prompts import HUMANEVAL_SIZE

    return size.count if size.count is not None else HUMANEVAL_SIZE - size.offset


def sized(name: str, size: Size, max_new_tokens: int, sets: dict[str, Any] | None) -> Scenario:
    d = base_scenario(name).resolved_dict()
    if size.models:
        d["models"] = {**d["models"], **size.models}
    d["prompts"] = {"source": "humaneval", "offset": size.offset, "count": size.count}
    d["generation"] = {**d["generation"], "max_new_tokens": max_new_tokens}
    return override(parse_scenario(d, source=name), sets or {})


def paper_setting(size: Size, sets: dict[str, Any] | None = None) -> Scenario:
    """reproduce-paper at `size` (size.samples devices per problem), `sets` applied; devices not yet isolated."""
    s = sized("reproduce-paper", size, size.max_new_tokens, sets)
    d = s.resolved_dict()
    if size.samples < 1:
        raise ValueError(f"size {size.name}: samples per problem must be >= 1, got {size.samples}")
    n = n_prompts(size) * size.samples  # device i decodes problem i mod problems (testbed.prompts.prompt_index)
    d["tiers"] = [{**d["tiers"][0], "count": n}]
    d["actors"] = {**d["actors"], "devices_per_group": n}
    return parse_scenario(d, source="reproduce-paper")


def link_text(s: Scenario) -> str:
    from testbed.scenario import resolve_link

    t = s.tiers[0]
    link = resolve_link(t.link)
    name = f"{t.link} " if isinstance(t.link, str) else ""
    return f"{name}uplink {link.uplink.summary()}; downlink {link.downlink.summary()}"


def paper_base(size: Size, sets: dict[str, Any] | None = None) -> Scenario:
    """paper_setting with its devices isolated (what every point of the paper study runs)."""
    return isolate_devices(paper_setting(size, sets))


def fleet_counts(proportions: Sequence[int], n: int) -> list[int]:
    """Tier counts summing to n in the given proportions (largest remainder), each >= 1 when n allows."""
    total = sum(proportions)
    raw = [n * p / total for p in proportions]
    counts = [max(1 if n >= len(proportions) else 0, int(math.floor(r))) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    i = 0
    while sum(counts) < n:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts) > n:
        j = max(range(len(counts)), key=lambda k: counts[k])
        counts[j] -= 1
    return counts


def fleet_base(size: Size, n: int, sets: dict[str, Any] | None = None) -> Scenario:
    """reproduce-fleet at `size` with n devices (tiers scaled), `sets` applied."""
    s = sized("reproduce-fleet", size, size.fleet_tokens, sets)
    d = s.resolved_dict()
    counts = fleet_counts([t["count"] for t in d["tiers"]], n)
    d["tiers"] = [{**t, "count": c} for t, c in zip(d["tiers"], counts) if c > 0]
    d["name"] = f"reproduce-fleet-n{n}"
    return parse_scenario(d, source="reproduce-fleet")


def with_policy(base: Scenario, spec: str | dict, name: str) -> Scenario:
    d = base.resolved_dict()
    for t in d["tiers"]:
        t["policy"] = spec
    d["name"] = name
    return parse_scenario(d, source=name)


def scenario_hash(s: Scenario) -> str:
    return hashlib.sha256(scenario_yaml(s).encode("utf-8")).hexdigest()


def policy_spec(name: str, fit: Fit, **params: Any) -> dict:
    """The spec of a preset parameterised by the fit (a, b only where the preset takes them)."""
    spec: dict[str, Any] = {"name": name}
    if name in ("u-hlm", "cu-hlm", "cu-hlm-offline", "cu-hlm-adaptive"):
        spec.update(a=fit.a, b=fit.b)
    if name == "cu-hlm-offline":
        spec["k"] = fit.kstar
    if name == "slm-only":
        spec["estimator"] = ESTIMATOR  # record u too (the drafts are the same)
    spec.update(params)
    return spec


def sized_tokens(s: Scenario, max_new_tokens: int) -> Scenario:
    """s generating max_new_tokens per device (the calibration point runs fewer)."""
    return override(s, {"generation.max_new_tokens": max_new_tokens})
