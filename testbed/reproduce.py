"""`testbed reproduce paper` and `testbed reproduce fleet`: the CU-HLM / U-HLM experiments as one
resumable study each, with one report next to the papers' headline numbers.

Papers: CU-HLM, arXiv 2505.11788 (Oh et al., "Communication-Efficient Hybrid Language Model via
Uncertainty-Aware Opportunistic and Compressed Transmission"); U-HLM, arXiv 2412.12687 (Oh et al.,
"Uncertainty-Aware Hybrid Inference with On-Device Small and Remote Large Language Models").

The paper study (`run_paper`)
-----------------------------
Setting: the papers' single device on a wireless Shannon-rate uplink, repeated for every HumanEval
problem of the --size: device i decodes problem i (PAPER_YAML below). Token
throughput as the papers define it: the inverse of the per-token delay, SLM compute + uplink + LLM
compute (+ the verdict's downlink) for a transmitted token, the SLM step alone for a skipped one.

Why the summary's per-device throughput is exactly that: a device's tokens are sequential (the next
draft starts when the previous token is committed), so its span, first draft start to last commit,
is the sum of its per-token delays and tokens / span = 1 / mean per-token delay (testbed.results
device_throughput). The study's throughput of a policy is the same over all its tokens, 1 / (mean
per-token delay over every token of every device) = total tokens / sum of the devices' spans
(`paper_throughput`, from each device's tokens and span in the point's tokens.parquet). Devices
stop at eos or a stop sequence and so generate different numbers of tokens: the harmonic mean of
the per-device throughputs would weigh a 5-token device like a 256-token one, and is the study's
throughput only when every device generates the same number of tokens.

Devices must not distort each other's timing (the paper has one): `isolate_devices` gives the
verifier a zero-time profile with max_batch >= devices and max_wait 0, so a request is answered at
its arrival and never waits for another device's batch, and moves the LLM's compute for one
verification at batch 1 (the server profile's verify_seconds(1, 1), 16.3 ms) onto each device's
downlink delay. Each device's trace is then the one it would have alone (tested). What this drops
from verify_seconds: its per-token term for the skipped tokens piggybacked on an upload (0.3 ms
each), i.e. the LLM's step is charged once per verification, as in the papers' delay model.
Content (tokens, decisions, betas) is unaffected: it never depends on timing.

Points (one run directory each under OUT/points/, in this order):
- calibration (OUT/calibration): `hlm` on the same prompts with every uncertainty estimator
  recorded per token, as `testbed calibrate` does: the fit beta ~ a*u + b per estimator, the binned
  reliability curve, and the offline k* (policies.truncation.calibrate_offline_k on the SLM
  distributions x of a deterministic subsample of its tokens, with their observed betas). The
  temperature estimator's fit (a, b) parameterises every policy below unless --a/--b pin it
  (falls back to the paper's a, b if the fit is degenerate or a <= 0).
- llm-only (the accuracy reference), hlm, slm-only (estimator on, to record u), u-hlm and cu-hlm
  (risk-averse u_th = -b/a), cu-hlm-offline (k = k*), cu-hlm-adaptive at each risk budget of the
  size, cu-hlm risk-prone (u_th = (0.5 - b)/a), cu-hlm at each fixed u_th of the size (the u_th
  sweep; with risk-averse and risk-prone it spans risk-averse to risk-prone and beyond; u_th = 0 and
  u_th = -1 are always in it: both sides of the risk-averse flip, testbed.calibration_ci), cu-hlm
  risk-averse at each theta of the size (the theta sweep; cu-hlm itself is theta = 0.1), and
  rand-hlm skipping at u-hlm's measured skip rate (the papers' random-skip baseline).
- Every point is scored for HumanEval pass@1 (testbed.accuracy.score_run) relative to llm-only, and
  compared with it paired (the same problems and seeds: the per-problem difference of pass rates with
  its standard error, McNemar's exact test or, with several samples per problem, the sign test) and
  next to the bound fidelity implies, |delta pass@1| <= mean over sequences of min(1, summed per-token
  TV) (`tv_accuracy_bound`). With Size.samples = n, devices = problems x n (device i decodes problem
  i mod problems, each with its own keyed randomness) and pass@1 is the unbiased estimator.

Resumability: a point is finished when its point.json (written last) names the same scenario
(sha256 of its resolved YAML) and its summary.json is complete (every token, not interrupted, and
the accuracy block when it is scored). A finished point is read back, never recomputed; anything
else (a run cut short, a changed parameter) is deleted and run again. One line per point is logged:
[done/total] name: ran|cached in s (elapsed s).

The fleet study (`run_fleet`)
-----------------------------
The same policies on heterogeneous fleets (FLEET_YAML below: its tier counts
are proportions, scaled to each fleet size) sharing one verifier with real batching: system
throughput, Jain fairness and mean verifier batch size vs fleet size. Its own calibration point
gives a, b and k*; rand-hlm matches u-hlm's skip rate at each size. Not scored for accuracy.

The reports (figures and one HTML page per study, OUT/report/) are drawn by testbed.reproduce_report;
the paper study's includes the calibration's bootstrap intervals (testbed.calibration_ci) and the
channel sweep, throughput over HLM's at any uplink rate from the points' tokens (testbed.channel_sweep;
`testbed reproduce sweep OUT` on an existing study).

Sizes (`SIZES`; each one's `why` says why): smoke (tiny models, 4 problems, 8 tokens: seconds, for CI),
small (the Qwen pair on HumanEval/40..55, up to 256 tokens ending at eos / the HumanEval stop
sequences, 12 points: about an hour on a 2-core CPU with native bf16, several on an fp32-only one, see
`estimate`), medium (all 164 problems, 256 tokens with stops: an overnight CPU run, resumable), full
(all 164 problems x 5 samples, 256 tokens: a GPU machine, scripts/reproduce_full_gpu.sh).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from testbed.scenario import Scenario, override, parse_scenario, scenario_yaml
from testbed.calibration_ci import FLIP_U_TH

# --------------------------------------------------------------------------------------------- papers
# Headline numbers as the abstracts state them (CU-HLM vs standard HLM; U-HLM vs HLM without skipping).
PAPER = {
    "cu-hlm": {"throughput_ratio_hlm": 206.0, "skip_rate": 0.748, "vocab_compression": 0.974,
               "pass_at_1_relative": 0.974},
    "u-hlm": {"throughput_ratio_hlm": 2.54, "skip_rate": 0.4593, "pass_at_1_relative": 0.9754},
    "fit": {"a": 0.815, "b": -0.066, "models": "TinyLlama-1.1B / Llama-2-7B",
            "u_th_risk_averse": 0.081, "u_th_risk_prone": 0.81},
}
# `testbed calibrate` on the Qwen pair (HumanEval, 8 prompts x 48 tokens): a reference, not used.
QWEN_CALIBRATE_FIT = {"a": 0.491, "b": -0.002}

POLICIES = ("llm-only", "slm-only", "hlm", "rand-hlm", "u-hlm", "cu-hlm", "cu-hlm-offline", "cu-hlm-adaptive")
RISK_PRONE_BETA_TOL = 0.5  # policies.rejection: u_th = (beta_tol - b) / a
DEFAULT_THETA, DEFAULT_ETA = 0.1, 1.0  # cu-hlm's preset defaults (policies.policy)
ESTIMATOR = "temperature"  # the papers' estimator; its fit parameterises the policies


@dataclass(frozen=True)
class Size:
    name: str
    models: dict | None  # None: the bundled scenario's (the Qwen pair)
    offset: int  # HumanEval problems offset .. offset + count - 1 (accuracy needs a contiguous slice)
    count: int | None  # None: to the end
    max_new_tokens: int
    calibration_tokens: int
    kstar_tokens: int  # tokens whose SLM distribution calibrates the offline k*
    u_th: tuple[float, ...]  # fixed thresholds of the u_th sweep (cu-hlm)
    theta: tuple[float, ...]  # distortion budgets of the theta sweep (cu-hlm, risk-averse)
    risks: tuple[float, ...]  # cu-hlm-adaptive risk budgets
    fleet_sizes: tuple[int, ...]
    fleet_tokens: int
    why: str = ""
    # cu-hlm-adaptive runs at every risk budget with each of these estimators: temperature (cu-hlm's u,
    # so the learned rule alone differs) and max (1 - max x: deterministic and continuous, so the
    # learned threshold can sit between tokens that temperature perturbation gives the same u)
    adaptive_estimators: tuple[str, ...] = ("temperature", "max")
    # samples per problem: devices = problems x samples, device i decodes problem i mod problems with its
    # own keyed randomness, so a problem's samples are independent (unbiased pass@1, testbed.accuracy)
    samples: int = 1


TINY = {"slm": "tiny:slm", "llm": "tiny:llm", "dtype": "float32"}
SIZES: dict[str, Size] = {
    "smoke": Size("smoke", TINY, 0, 4, 8, 8, 32, (0.3, 1.0), (0.5,), (0.05,), (2, 6), 8,
                  "tiny random models, 4 problems x 8 tokens: the whole pipeline in seconds (CI)"),
    "small": Size("small", None, 40, 16, 256, 16, 128, (0.25,), (), (0.01,), (4, 16), 24,
                  "the Qwen pair on HumanEval/40..55, up to 256 new tokens ending at eos / the HumanEval stop "
                  "sequences (generation.stop), so completions can finish. 16 problems fill one 16-row GEMM tile "
                  "(the batch costs what batch 1 does), and a point costs its longest completion in token-steps: "
                  "of all 16-problem windows this one has the shortest longest canonical solution (74 Qwen "
                  "tokens), but at temperature 1 one completion in 16 runs on to 256 (measured), so most points "
                  "cost ~256 steps (~7 min with bf16). Hence 13 points: calibration, every policy once, the "
                  "adaptive policy with the max estimator at risk 0.01 (the README's claim), the u_th sweep at "
                  "risk-averse (cu-hlm), 0.25, risk-prone and both sides of the risk-averse flip (0: every u = 0 "
                  "token skipped; -1: none), no theta sweep: about an hour on a 2-core CPU with native bf16 "
                  "(estimate). On 16 problems the paired exact test needs at least 6 "
                  "discordant problems, all one way (p = 0.031): it tells apart large differences only; "
                  "--size medium for small ones",
                  adaptive_estimators=("max",)),
    "medium": Size("medium", None, 0, None, 256, 16, 256, (0.1, 0.25, 0.5), (0.02, 0.5), (0.005, 0.02),
                   (4, 16), 24,
                   "all 164 HumanEval problems, up to 256 new tokens with stops: an overnight CPU run (resumable: "
                   "rerun to continue), the small study's points with a finer u_th sweep, two theta and two risk "
                   "budgets; 164 paired problems resolve pass@1 differences of a few points"),
    "full": Size("full", None, 0, None, 256, 64, 256, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
                 (0.005, 0.01, 0.03, 0.3, 1.0), (0.01, 0.05), (16, 64, 256), 128,
                 "all 164 problems x 5 samples each (820 devices, unbiased pass@1), up to 256 tokens with stops: "
                 "a GPU machine (scripts/reproduce_full_gpu.sh)", samples=5),
}


# --------------------------------------------------------------------------------------------- scenarios

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
# skipped, whatever the other devices do (testbed/reproduce.py, isolate_devices). Run literally
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
    d["server"] = {**d["server"], "verify_ms": {"base": 0.0, "per_token": 0.0, "per_sequence": 0.0},
                   "max_batch": max(1, s.n_devices), "max_wait_ms": 0.0}
    return parse_scenario(d, source=f"{s.name} (isolated devices)")


def _n_prompts(size: Size) -> int:
    from testbed.prompts import HUMANEVAL_SIZE

    return size.count if size.count is not None else HUMANEVAL_SIZE - size.offset


def _sized(name: str, size: Size, max_new_tokens: int, sets: dict[str, Any] | None) -> Scenario:
    d = base_scenario(name).resolved_dict()
    if size.models:
        d["models"] = {**d["models"], **size.models}
    d["prompts"] = {"source": "humaneval", "offset": size.offset, "count": size.count}
    d["generation"] = {**d["generation"], "max_new_tokens": max_new_tokens}
    return override(parse_scenario(d, source=name), sets or {})


def paper_setting(size: Size, sets: dict[str, Any] | None = None) -> Scenario:
    """reproduce-paper at `size` (size.samples devices per problem), `sets` applied; devices not yet isolated."""
    s = _sized("reproduce-paper", size, size.max_new_tokens, sets)
    d = s.resolved_dict()
    if size.samples < 1:
        raise ValueError(f"size {size.name}: samples per problem must be >= 1, got {size.samples}")
    n = _n_prompts(size) * size.samples  # device i decodes problem i mod problems (testbed.prompts.prompt_index)
    d["tiers"] = [{**d["tiers"][0], "count": n}]
    d["actors"] = {**d["actors"], "devices_per_group": n}
    return parse_scenario(d, source="reproduce-paper")


def _link_text(s: Scenario) -> str:
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
    s = _sized("reproduce-fleet", size, size.fleet_tokens, sets)
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


# --------------------------------------------------------------------------------------------- fit


@dataclass
class Fit:
    """What parameterises the policies: the rejection model and the offline k*."""

    a: float
    b: float
    source: str  # "calibration" | "given" | "paper (fallback: ...)"
    kstar: int

    @property
    def u_th_risk_averse(self) -> float:
        return -self.b / self.a

    @property
    def u_th_risk_prone(self) -> float:
        return (RISK_PRONE_BETA_TOL - self.b) / self.a


def choose_fit(calibration: dict, a: float | None, b: float | None) -> Fit:
    kstar = int(calibration["kstar"]["k"])
    if a is not None and b is not None:
        return Fit(float(a), float(b), "given", kstar)
    f = calibration["fits"].get(ESTIMATOR) or {}
    if f.get("a") is not None and f["a"] > 0:
        return Fit(float(f["a"]), float(f["b"]), f"calibration ({ESTIMATOR} estimator)", kstar)
    why = f.get("error") or f"fitted a = {f.get('a')} <= 0"
    return Fit(PAPER["fit"]["a"], PAPER["fit"]["b"], f"paper (fallback: {why})", kstar)


def reliability(u: np.ndarray, beta: np.ndarray, a: float | None, b: float | None, bins: int = 10) -> list[dict]:
    """Per u bin: n, mean u, mean observed beta and mean predicted clip(a u + b, 0, 1). Each distinct u
    is its own bin when there are few (temperature perturbation: u = j / K), else quantile bins."""
    u, beta = np.asarray(u, float), np.asarray(beta, float)
    m = np.isfinite(u) & np.isfinite(beta)
    u, beta = u[m], beta[m]
    if not len(u):
        return []
    values = np.unique(u)
    if len(values) <= 25:
        groups = [(v, v, u == v) for v in values]
    else:
        edges = np.unique(np.quantile(u, np.linspace(0, 1, bins + 1)))
        idx = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, len(edges) - 2)
        groups = [(edges[i], edges[i + 1], idx == i) for i in range(len(edges) - 1)]
    out = []
    for lo, hi, sel in groups:
        if not sel.any():
            continue
        pred = None if a is None else float(np.clip(a * u[sel] + b, 0.0, 1.0).mean())
        out.append({"u_lo": float(lo), "u_hi": float(hi), "n": int(sel.sum()), "u_mean": float(u[sel].mean()),
                    "beta_observed": float(beta[sel].mean()), "beta_predicted": pred})
    return out


# --------------------------------------------------------------------------------------------- calibration


def calibrate_point(s: Scenario, out_dir: Path, kstar_tokens: int, theta: float = DEFAULT_THETA,
                    eta: float = DEFAULT_ETA) -> dict:
    """`hlm` on the scenario's prompts, every draft verified, u of every estimator recorded per token
    (as testbed.calibrate) and the SLM distributions x of a deterministic subsample of tokens kept
    for the offline k*. Writes samples.parquet and calibration.json into out_dir; returns the latter."""
    import pandas as pd
    import torch

    from agents.engine import run_virtual
    from agents.lm import BatchedLM
    from agents.models import load_model
    from agents.verifier import ServerProfile
    from policies import load_policy
    from policies.rejection import DegenerateFitError, fit_rejection_model
    from policies.truncation import calibrate_offline_k
    from policies.uncertainty import ESTIMATORS, make_estimator
    from testbed.calibrate import RecordingPolicy
    from testbed.calibration_ci import add_intervals
    from testbed.run import plan

    p = plan(s)
    n_tokens = len(p.specs) * p.run.max_new_tokens
    stride = max(1, math.ceil(n_tokens / max(1, kstar_tokens)))

    class Recorder(RecordingPolicy):
        """RecordingPolicy that also keeps x of every stride-th token (by device and token index)."""

        kept: dict

        def decide_batch(self, logits, ctxs):
            for c in ctxs:
                if (c.device * p.run.max_new_tokens + c.token_index) % stride == 0:
                    self.kept[(c.device, c.token_index)] = np.asarray(c.probs, dtype=np.float32).copy()
            return super().decide_batch(logits, ctxs)

    a = s.actors
    torch.set_num_threads(p.threads)  # as the runs' content pass (testbed.run.local)
    policy = Recorder(load_policy({"name": "hlm", "estimator": "none"}), {n: make_estimator(n) for n in ESTIMATORS})
    policy.kept = {}
    slm = BatchedLM(load_model(p.slm, dtype=p.slm_dtype, device=a.group_device))
    llm = BatchedLM(load_model(p.llm, dtype=p.llm_dtype, device=a.verifier_device))
    # timing is irrelevant here (a generic server profile); every tier runs the recorder
    result = run_virtual(p.specs, p.run, ServerProfile(), slm, llm, {label: policy for label in p.policy_specs})
    rows = pd.DataFrame(result.rows)
    u = pd.DataFrame([{"device": d, "token_index": t, **{f"u_{k}": v for k, v in vals.items()}}
                      for (d, t), vals in policy.samples.items()])
    samples = rows[["device", "prompt_index", "token_index", "token_id", "draft_id", "beta"]].merge(
        u, on=["device", "token_index"]).sort_values(["device", "token_index"], kind="stable").reset_index(drop=True)
    fits: dict[str, dict] = {}
    curves: dict[str, list] = {}
    for name in ESTIMATORS:
        try:
            f = fit_rejection_model(samples[f"u_{name}"], samples["beta"])
            fits[name] = {"a": f.a, "b": f.b, "pearson_r": None if math.isnan(f.pearson_r) else f.pearson_r,
                          "n": f.n, "u_th_risk_averse": -f.b / f.a if f.a > 0 else None}
        except DegenerateFitError as e:
            fits[name] = {"a": None, "b": None, "pearson_r": None, "n": len(samples), "u_th_risk_averse": None,
                          "error": str(e)}
        curves[name] = reliability(samples[f"u_{name}"], samples["beta"], fits[name]["a"], fits[name]["b"])
    add_intervals(fits, samples)  # bootstrap over devices: fits[name]["ci"] (testbed.calibration_ci)
    beta_of = {(int(r.device), int(r.token_index)): (float(r.beta), int(r.draft_id)) for r in samples.itertuples()}
    keys = sorted(k for k in policy.kept if k in beta_of and math.isfinite(beta_of[k][0]))
    if keys:
        k = calibrate_offline_k(np.stack([policy.kept[k] for k in keys]), [beta_of[k][1] for k in keys],
                                [beta_of[k][0] for k in keys], theta, eta)
    else:
        k = p.run.vocab_size
    doc = {"scenario": s.name, "models": {"slm": str(s.models.slm), "llm": str(s.models.llm)},
           "prompts": f"humaneval[{s.prompts.offset}:{'' if s.prompts.count is None else s.prompts.offset + s.prompts.count}]",
           "devices": len(p.specs), "max_new_tokens": p.run.max_new_tokens, "tokens": int(len(samples)),
           "vocab_size": p.run.vocab_size, "fits": fits, "reliability": curves,
           "kstar": {"k": int(k), "theta": theta, "eta": eta, "tokens": len(keys), "stride": stride}}
    out_dir.mkdir(parents=True, exist_ok=True)
    samples.to_parquet(out_dir / "samples.parquet", index=False)
    (out_dir / "calibration.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return doc


# --------------------------------------------------------------------------------------------- points


@dataclass
class Point:
    name: str  # directory under points/ (or "calibration")
    group: str  # calibration | policy | u_th | theta | fleet
    label: str  # shown in tables
    build: Callable[["Study"], Scenario]
    policy: str = ""  # preset name
    meta: dict = field(default_factory=dict)  # u_th, theta, risk, fleet_size (filled by build)
    scored: bool = True  # HumanEval pass@1 relative to the reference


class Study:
    """Runs points in order, each at most once (resumable), one log line per point."""

    def __init__(self, out: Path, engine: str = "local", log: Callable[[str], None] | None = None,
                 total: int = 0):
        self.out = Path(out)
        self.engine = engine
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.total = total
        self.done = 0
        self.t0 = time.time()
        self.summaries: dict[str, dict] = {}
        self.statuses: dict[str, str] = {}
        self.calibration: dict | None = None
        self.fit: Fit | None = None
        self.reference: Path | None = None
        self.llm_ms: float | None = None  # paper study: the LLM step charged on each downlink
        self.setting_text = ""  # paper study: the devices' links as the scenario states them

    def point_dir(self, name: str) -> Path:
        return self.out / ("calibration" if name == "calibration" else f"points/{name}")

    def _line(self, name: str, status: str, seconds: float) -> None:
        self.done += 1
        self.statuses[name] = status
        self.log(f"[{self.done:>{len(str(self.total))}}/{self.total}] {name}: {status} in {seconds:.1f} s "
                 f"(elapsed {time.time() - self.t0:.1f} s)")

    @staticmethod
    def finished(d: Path, digest: str, scored: bool, with_reference: bool, summary_file: str = "summary.json") -> bool:
        try:
            mark = json.loads((d / "point.json").read_text(encoding="utf-8"))
            summary = json.loads((d / summary_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if mark.get("scenario_sha256") != digest:
            return False
        if summary_file != "summary.json":
            return True
        if not summary.get("complete") or summary.get("interrupted"):
            return False
        if scored:
            acc = summary.get("accuracy")
            if not acc or (with_reference and ("pass_at_1_relative" not in acc or "paired" not in acc)):
                return False
        return True

    def _mark(self, d: Path, digest: str, seconds: float) -> None:
        tmp = d / "point.json.tmp"
        tmp.write_text(json.dumps({"scenario_sha256": digest, "seconds": round(seconds, 3),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}), encoding="utf-8")
        tmp.replace(d / "point.json")

    def run_calibration(self, s: Scenario, kstar_tokens: int) -> dict:
        d = self.point_dir("calibration")
        digest = hashlib.sha256((scenario_yaml(s) + f"\nkstar_tokens={kstar_tokens} theta={DEFAULT_THETA} "
                                 f"eta={DEFAULT_ETA}").encode()).hexdigest()
        t = time.time()
        if self.finished(d, digest, False, False, "calibration.json"):
            doc, status = json.loads((d / "calibration.json").read_text(encoding="utf-8")), "cached"
        else:
            if d.exists():
                shutil.rmtree(d)
            doc = calibrate_point(s, d, kstar_tokens)
            self._mark(d, digest, time.time() - t)
            status = "ran"
        self._line("calibration", status, time.time() - t)
        self.calibration = doc
        return doc

    def run_point(self, point: Point) -> dict:
        from testbed.run import RunOptions, run_scenario

        s = point.build(self)
        d = self.point_dir(point.name)
        humaneval = s.prompts.source == "humaneval"
        scored = point.scored and humaneval
        with_ref = scored and self.reference is not None and self.reference != d
        digest = scenario_hash(s)
        t = time.time()
        if self.finished(d, digest, scored, with_ref):
            status = "cached"
        else:
            if d.exists():
                shutil.rmtree(d)
            run_scenario(s, RunOptions(out_dir=d, engine=self.engine, progress=False, report=False, accuracy=False))
            if scored:
                from testbed.accuracy import score_run

                score_run(d, reference=self.reference if with_ref else None, progress=False)
            self._mark(d, digest, time.time() - t)
            status = "ran"
        self.summaries[point.name] = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        self._line(point.name, status, time.time() - t)
        return self.summaries[point.name]


# --------------------------------------------------------------------------------------------- table rows


def device_tokens_spans(tokens: Any, emulated_seconds: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per device (sorted by id): tokens generated and span, first t_draft_start to last t_commit, the
    span testbed.figures.device_throughput divides by (emulated_seconds where unknown). tokens: the
    tokens table or the path of a point's tokens.parquet."""
    import pandas as pd

    df = pd.read_parquet(tokens, columns=["device", "t_draft_start", "t_commit"]) if isinstance(
        tokens, (str, Path)) else tokens
    g = df.groupby("device", sort=True)
    span = (g["t_commit"].max() - g["t_draft_start"].min()).to_numpy(np.float64)
    if emulated_seconds is not None:
        span = np.where(np.isfinite(span) & (span > 0), span, emulated_seconds)
    return g.size().to_numpy(np.float64), span


def paper_throughput(summary: dict, tokens: Any = None) -> float | None:
    """The study's token throughput of a point: 1 / (mean per-token delay over every token of every
    device) = total tokens / sum of device spans (module docstring). With `tokens` (the point's tokens
    table or its tokens.parquet) it is computed from each device's tokens and span, exact whatever
    number of tokens each device generated (generation stops at eos / stop sequences). Without, from
    the summary alone: the harmonic mean of the per-device throughputs, which is the same number only
    when every device generated the same number of tokens."""
    if tokens is not None:
        n, span = device_tokens_spans(tokens, summary.get("emulated_seconds"))
        ok = np.isfinite(span) & (span > 0)
        return float(n[ok].sum() / span[ok].sum()) if ok.any() else None
    x = [v for v in (summary.get("throughput_tokens_per_s") or {}).get("devices", {}).values() if v]
    return len(x) / sum(1.0 / v for v in x) if x else None


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


def tv_accuracy_bound(tokens: Any) -> float | None:
    """The bound on |pass@1 - llm-only's pass@1| that fidelity implies (docs/design.md section 7): a [0, 1]
    metric of a sequence moves by at most the TV distance between the sequence's law and the LLM's, which
    is at most min(1, sum of the per-token TVs); averaged over the devices (sequences) with a fidelity_tv
    for every token. None where no device has one (or the table has no fidelity_tv)."""
    import pandas as pd

    if isinstance(tokens, (str, Path)):
        try:
            df = pd.read_parquet(tokens, columns=["device", "fidelity_tv"])
        except (KeyError, ValueError, OSError):
            return None
    else:
        if "fidelity_tv" not in tokens:
            return None
        df = tokens[["device", "fidelity_tv"]]
    g = df.groupby("device", sort=True)["fidelity_tv"]
    known = g.count() == g.size()
    if not known.any():
        return None
    return float(np.minimum(1.0, g.sum()[known]).mean())


def _paired_cells(point: Point, acc: dict) -> dict:
    """The accuracy columns of a row: unbiased pass@1 over problems and the paired comparison with
    llm-only (testbed.accuracy.paired); llm-only's own row is the reference (difference 0, no test)."""
    unb = acc.get("unbiased") or {}
    pr = acc.get("paired") or {}
    ref = point.policy == "llm-only" and "pass_at_1" in acc
    return {
        "pass_at_1": unb.get("pass_at_1", acc.get("pass_at_1")),
        "pass_at_1_stderr": unb.get("stderr", acc.get("stderr")),
        "n_problems": unb.get("n_problems", acc.get("n_prompts")), "samples_per_problem": unb.get("samples_per_problem"),
        "pass_at_1_diff": 0.0 if ref else pr.get("diff"), "pass_at_1_diff_stderr": None if ref else pr.get("stderr"),
        "pass_at_1_diff_ci95": None if ref else pr.get("ci95"), "paired_test": None if ref else pr.get("test"),
        "mcnemar_p": None if ref else pr.get("mcnemar_p"), "discordant": None if ref else pr.get("discordant"),
        "distinguishable_95": None if ref else pr.get("distinguishable_95"),
    }


def _row(point: Point, summary: dict, hlm_throughput: float | None, tokens: Any = None) -> dict:
    """One table row; tokens (the point's tokens table or tokens.parquet) gives the exact throughput and
    the TV bound on accuracy (without it: the summary's harmonic mean, no bound)."""
    acc = summary.get("accuracy") or {}
    thr = paper_throughput(summary, tokens)
    rel, rel_se = acc.get("pass_at_1_relative"), acc.get("pass_at_1_relative_stderr")
    if point.policy == "llm-only" and acc.get("pass_at_1"):
        rel, rel_se = 1.0, None  # the reference itself
    return {
        "point": point.name, "label": point.label, "group": point.group, "policy": point.policy, **point.meta,
        "throughput_tokens_per_s": thr,
        "throughput_ratio_hlm": thr / hlm_throughput if thr and hlm_throughput else None,
        "skip_rate": summary.get("skip_rate"), "vocab_compression": summary.get("vocab_compression"),
        "acceptance_rate": summary.get("acceptance_rate"), "uplink_bytes_per_token": summary.get("uplink_bytes_per_token"),
        **_paired_cells(point, acc), "pass_at_1_relative": rel, "pass_at_1_relative_stderr": rel_se,
        "fidelity_tv": summary.get("fidelity_tv_mean"), "fidelity_tv_sequence": summary.get("fidelity_tv_sequence_mean"),
        "fidelity_tv_branch": summary.get("fidelity_tv_branch_mean"),
        "pass_at_1_tv_bound": None if tokens is None else tv_accuracy_bound(tokens),
        "tokens": summary.get("tokens"), "devices": summary.get("devices"),
    }


def cu_hlm_frontier(rows: list[dict]) -> list[dict]:
    """cu-hlm's threshold sweep (risk-averse, fixed u_th, risk-prone; theta at its default) as the upper
    concave hull of its (fidelity, skip rate) points: what cu-hlm can reach at each fidelity. Mixing two
    thresholds at random (per sequence, with probability lam) skips lam s_1 + (1 - lam) s_2 and, as TV is
    convex, costs at most lam f_1 + (1 - lam) f_2, so every point of a hull segment is attainable or
    bettered; the Pareto staircase of the measured points lies at or below it and would understate
    cu-hlm. Sorted by fidelity; a point under the hull (dominated, or beaten by a mixture) is left out."""
    pts = sorted((r for r in rows if r["policy"] == "cu-hlm" and r["group"] in ("policy", "u_th")
                  and r.get("fidelity_tv") is not None and r.get("skip_rate") is not None),
                 key=lambda r: (r["fidelity_tv"], -r["skip_rate"]))
    hull: list[dict] = []
    for r in pts:
        if hull and r["skip_rate"] <= hull[-1]["skip_rate"]:
            continue  # no more skipping for more distortion
        while len(hull) >= 2 and _below_chord(hull[-2], hull[-1], r):
            hull.pop()
        hull.append(r)
    return hull


def _below_chord(a: dict, b: dict, c: dict) -> bool:
    """b lies on or under the segment from a to c in the (fidelity, skip) plane."""
    (fa, sa), (fb, sb), (fc, sc) = ((r["fidelity_tv"], r["skip_rate"]) for r in (a, b, c))
    return (sb - sa) * (fc - fa) <= (sc - sa) * (fb - fa)


def equal_fidelity(rows: list[dict]) -> list[dict]:
    """Each cu-hlm-adaptive point against cu-hlm's threshold sweep at the same fidelity: the skip rate
    cu-hlm reaches at the adaptive point's fidelity, linearly interpolated along the upper concave hull
    of its points (cu_hlm_frontier: random mixing of thresholds attains it); the pass@1 of the two
    bracketing cu-hlm points. Below cu-hlm's lowest fidelity no threshold reaches it: `cu_hlm_skip_rate`
    is then that lowest point's skip rate and `bound` says cu-hlm cannot do better than that at any
    fidelity so low."""
    front = cu_hlm_frontier(rows)
    out = []
    if not front:
        return out
    f = np.array([r["fidelity_tv"] for r in front], float)
    s = np.array([r["skip_rate"] for r in front], float)
    for r in rows:
        if r["policy"] != "cu-hlm-adaptive" or r.get("fidelity_tv") is None or r.get("skip_rate") is None:
            continue
        x = float(r["fidelity_tv"])
        if x > f[-1]:
            continue  # beyond the sweep: nothing to compare with
        i = int(np.searchsorted(f, x))  # front[i - 1].fidelity < x <= front[i].fidelity
        lo, hi = front[max(i - 1, 0)], front[i]
        skip = float(np.interp(x, f, s))
        out.append({"point": r["point"], "estimator": r.get("estimator"), "risk": r.get("risk"), "fidelity_tv": x,
                    "skip_rate": r["skip_rate"], "pass_at_1": r.get("pass_at_1"),
                    "pass_at_1_stderr": r.get("pass_at_1_stderr"), "vocab_compression": r.get("vocab_compression"),
                    "cu_hlm_skip_rate": skip, "skip_gain": r["skip_rate"] - skip, "bound": bool(x < f[0]),
                    "cu_hlm_bracket": [lo["point"], hi["point"]],
                    "cu_hlm_pass_at_1": [lo.get("pass_at_1"), hi.get("pass_at_1")]})
    return out


# --------------------------------------------------------------------------------------------- the paper study


def paper_points(size: Size, base: Scenario) -> list[Point]:
    """Every point of the paper study after the calibration, in run order."""

    def pol(name: str, label: str, group: str = "policy", meta_fn=None, **params):
        def build(st: Study) -> Scenario:
            extra = {k: (v(st) if callable(v) else v) for k, v in params.items()}
            if meta_fn is not None:
                point.meta.update(meta_fn(st))
            return with_policy(base, policy_spec(name, st.fit, **extra), f"reproduce-{label}")

        point = Point(label, group, label, build, name)
        return point

    def thr(rule: str):
        return lambda st: {"u_th": st.fit.u_th_risk_averse if rule == "risk-averse" else st.fit.u_th_risk_prone}

    pts = [pol("llm-only", "llm-only"), pol("hlm", "hlm"), pol("slm-only", "slm-only"),
           pol("u-hlm", "u-hlm", meta_fn=thr("risk-averse")),
           pol("cu-hlm", "cu-hlm", meta_fn=lambda st: {**thr("risk-averse")(st), "theta": DEFAULT_THETA}),
           pol("cu-hlm-offline", "cu-hlm-offline", meta_fn=lambda st: {"k": st.fit.kstar})]
    for est in size.adaptive_estimators:
        for r in size.risks:
            label = f"cu-hlm-adaptive-risk{r:g}" if est == ESTIMATOR else f"cu-hlm-adaptive-{est}-risk{r:g}"
            params = {"risk": r} if est == ESTIMATOR else {"risk": r, "estimator": est}
            pts.append(pol("cu-hlm-adaptive", label, meta_fn=lambda st, r=r, est=est: {"risk": r, "estimator": est},
                           **params))
    pts.append(pol("cu-hlm", "cu-hlm-risk-prone", "u_th", meta_fn=thr("risk-prone"), threshold="risk-prone"))
    # + both sides of the risk-averse flip, skip every u = 0 token / skip nothing (testbed.calibration_ci)
    for v in size.u_th + tuple(v for v in FLIP_U_TH if v not in size.u_th):
        pts.append(pol("cu-hlm", f"cu-hlm-uth{v:g}", "u_th", meta_fn=lambda st, v=v: {"u_th": v},
                       threshold="fixed", u_th=v))
    for v in size.theta:
        pts.append(pol("cu-hlm", f"cu-hlm-theta{v:g}", "theta",
                       meta_fn=lambda st, v=v: {"theta": v, "u_th": st.fit.u_th_risk_averse}, theta=v))
    pts.append(pol("rand-hlm", "rand-hlm", meta_fn=lambda st: {"skip_rate_target": _rand_rate(st)},
                   skip_rate=_rand_rate))
    return pts


def _rand_rate(st: Study) -> float:
    """rand-hlm skips at u-hlm's measured rate (rounded, so the scenario is stable)."""
    return round(float(st.summaries["u-hlm"].get("skip_rate") or 0.0), 4)


@dataclass
class StudyResult:
    out: Path
    report: Path
    rows: list[dict]
    fit: Fit
    statuses: dict[str, str]


def run_paper(size: str | Size = "smoke", out: str | Path = "runs/reproduce-paper", *, engine: str = "local",
              sets: dict[str, Any] | None = None, a: float | None = None, b: float | None = None,
              log: Callable[[str], None] | None = None) -> StudyResult:
    """The paper study (module docstring); returns the table rows and the report path."""
    size = SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    base = paper_base(size, sets)
    points = paper_points(size, base)
    study = Study(out, engine, log, total=len(points) + 1)
    setting = paper_setting(size, sets)
    study.llm_ms = llm_ms(setting)
    study.setting_text = _link_text(setting)
    study.log(f"reproduce paper --size {size.name}: {base.n_devices} devices ({size.samples} per problem, "
              f"humaneval[{size.offset}:{'' if size.count is None else size.offset + size.count}]), "
              f"{size.max_new_tokens} tokens each, {len(points) + 1} points -> {out}")
    cal_s = with_policy(_sized_tokens(base, size.calibration_tokens), "hlm", "reproduce-calibration")
    study.run_calibration(cal_s, size.kstar_tokens)
    study.fit = choose_fit(study.calibration, a, b)
    for p in points:
        study.run_point(p)
        if p.name == "llm-only":
            study.reference = study.point_dir("llm-only")
    from testbed.reproduce_report import write_paper_report  # here: it imports this module

    rows = paper_rows(points, study)
    report = write_paper_report(study, size, base, points, rows)
    return StudyResult(out, report, rows, study.fit, study.statuses)


def _sized_tokens(s: Scenario, max_new_tokens: int) -> Scenario:
    return override(s, {"generation.max_new_tokens": max_new_tokens})


def paper_rows(points: list[Point], study: Study) -> list[dict]:
    import pandas as pd

    def tokens(name: str):
        path = study.point_dir(name) / "tokens.parquet"
        cols = ["device", "t_draft_start", "t_commit", "fidelity_tv"]
        try:
            return pd.read_parquet(path, columns=cols)
        except (KeyError, ValueError):  # no fidelity_tv (older runs)
            return pd.read_parquet(path, columns=cols[:3])

    tables = {p.name: tokens(p.name) for p in points}
    hlm = paper_throughput(study.summaries["hlm"], tables["hlm"])
    return [_row(p, study.summaries[p.name], hlm, tables[p.name]) for p in points]


# --------------------------------------------------------------------------------------------- the fleet study


FLEET_POLICIES = ("llm-only", "slm-only", "hlm", "rand-hlm", "u-hlm", "cu-hlm", "cu-hlm-offline", "cu-hlm-adaptive")


def fleet_points(size: Size, sets: dict[str, Any] | None) -> list[Point]:
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


def run_fleet(size: str | Size = "smoke", out: str | Path = "runs/reproduce-fleet", *, engine: str = "local",
              sets: dict[str, Any] | None = None, a: float | None = None, b: float | None = None,
              log: Callable[[str], None] | None = None) -> StudyResult:
    size = SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    points = fleet_points(size, sets)
    study = Study(out, engine, log, total=len(points) + 1)
    study.log(f"reproduce fleet --size {size.name}: fleet sizes {', '.join(map(str, size.fleet_sizes))}, "
              f"{size.fleet_tokens} tokens per device, {len(points) + 1} points -> {out}")
    cal_base = _sized("reproduce-fleet", size, size.calibration_tokens, sets)
    d = cal_base.resolved_dict()
    n_cal = _n_prompts(size)
    d["tiers"] = [{**d["tiers"][0], "count": n_cal, "policy": "hlm"}]
    d["name"] = "reproduce-fleet-calibration"
    study.run_calibration(parse_scenario(d), size.kstar_tokens)
    study.fit = choose_fit(study.calibration, a, b)
    for p in points:
        study.run_point(p)
    from testbed.reproduce_report import write_fleet_report  # here: it imports this module

    rows = [_fleet_row(p, study.summaries[p.name]) for p in points]
    report = write_fleet_report(study, size, rows)
    return StudyResult(out, report, rows, study.fit, study.statuses)


def _fleet_row(point: Point, s: dict) -> dict:
    lat = s.get("token_latency_s") or {}
    return {"point": point.name, "label": point.label, "policy": point.policy, **point.meta,
            "system_throughput_tokens_per_s": (s.get("throughput_tokens_per_s") or {}).get("system"),
            "jain_fairness": s.get("jain_fairness"), "verifier_batch_size_mean": s.get("verifier_batch_size_mean"),
            "skip_rate": s.get("skip_rate"), "vocab_compression": s.get("vocab_compression"),
            "uplink_bytes_per_token": s.get("uplink_bytes_per_token"), "latency_p95_s": lat.get("p95"),
            "fidelity_tv": s.get("fidelity_tv_mean"), "devices": s.get("devices"), "tokens": s.get("tokens")}


# --------------------------------------------------------------------------------------------- estimate

# One generated token-step (SLM + LLM, every device of a 16-row tile at once) on a 2-core CPU, per CPU
# class. bf16: measured on a 2-core Intel Xeon with AVX512-BF16 and AMX at 2 threads (actors.threads
# auto): the small study's hlm point, 146 token-steps with prefill and exact fidelity, took 71 s, and
# the whole study about 19 min (~0.5 s a step; it was ~1.7 s at 1 thread on an AMD EPYC with
# AVX512-BF16). fp32: a CPU without native bf16 (AVX2 only) runs the forwards ~3.5x slower (scaled,
# not measured here).
CPU_CLASSES = {"bf16": "native bf16 (AVX512-BF16 / AMX)", "fp32": "fp32 only (AVX2, no native bf16)"}
STEP_S = {"bf16": 0.5, "fp32": 1.8}
PREFILL_TILE_S = {"bf16": 0.1, "fp32": 0.3}  # one 16-row tile of prompt prefill through both models (GEMMs only)
STEP_WEIGHT = {"llm-only": 0.75, "slm-only": 0.25}  # by parameter count: the LLM ~3/4 of a step, the SLM ~1/4
TILE = 16  # rows of one packed GEMM tile: up to 16 devices cost what one does
# Completion lengths when generation stops (eos / HumanEval stop sequences). Measured: slm-only on
# HumanEval/40..55 with 256 tokens (temperature 1, bf16 on a 2-core Xeon with AMX-BF16): 15 of 16
# completions stopped, after 0.3-2.8x their canonical solution's Qwen tokens (the longest at 131, 1.8x a
# 74-token canonical; median 30); one (HumanEval/41, 6 canonical tokens) never did and ran to 256.
# A finishing completion: canonical x factor + margin, (expected, pessimistic); RAMBLE_P: the chance
# that a device runs to max_new_tokens instead (1 in 16 measured).
COMPLETION_FACTOR = (1.8, 2.8)
COMPLETION_MARGIN = (16, 16)
RAMBLE_P = 1 / 16


def cpu_class() -> str:
    """This machine's CPU class for the estimate: bf16 when the CPU has native bf16 (avx512_bf16 or
    amx_bf16 in /proc/cpuinfo), else fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def batch_steps(lengths: Sequence[int], tile: int = TILE) -> int:
    """Token-steps (in 16-row tiles) of one batch whose devices generate `lengths` tokens each and leave
    the batch when they stop: sum over steps of ceil(devices still generating / tile). One tile: the
    longest completion."""
    ls = np.sort(np.asarray(lengths, dtype=np.int64))
    if not len(ls):
        return 0
    steps, prev = 0, 0
    for j, L in enumerate(ls):  # from step prev to L, len(ls) - j devices are still generating
        steps += int(L - prev) * math.ceil((len(ls) - j) / tile)
        prev = int(L)
    return steps


def _token_lengths(texts: Sequence[str]) -> tuple[list[int], str]:
    try:
        from agents.models import load_tokenizer

        tok = load_tokenizer("qwen2.5-coder:slm")
        return [len(tok(t)["input_ids"]) for t in texts], "Qwen tokenizer"
    except Exception:  # noqa: BLE001 - no prepared pair: approximate
        return [max(1, int(len(t) / 3.2)) for t in texts], "chars / 3.2"


def completion_lengths(canonical: Sequence[int], max_new_tokens: int, which: int) -> list[int]:
    """Expected (which=0) or pessimistic (which=1) length per problem of a completion that finishes
    (COMPLETION_FACTOR, COMPLETION_MARGIN), capped at max_new_tokens."""
    f, m = COMPLETION_FACTOR[which], COMPLETION_MARGIN[which]
    return [min(max_new_tokens, int(math.ceil(c * f + m))) for c in canonical]


def point_steps(lengths: Sequence[int], max_new_tokens: int, which: int, p: float = RAMBLE_P) -> float:
    """Token-steps (tiles) of one point's batch whose finishing completions have `lengths`, when each device
    independently runs to max_new_tokens with probability p (it never stops). Expected (which=0): no device
    runs on with probability (1 - p)^n, else round(p n) (at least one) of them do, the longest-finishing
    ones. Pessimistic (which=1): ceil(2 p n) (at least one) run on."""
    n = len(lengths)
    if n == 0:
        return 0.0
    ls = sorted(lengths)

    def with_ramblers(k: int) -> int:
        return batch_steps(ls[:n - k] + [max_new_tokens] * k)

    if which == 1:
        return float(with_ramblers(min(n, max(1, math.ceil(2 * p * n)))))
    none = (1 - p) ** n
    return none * batch_steps(ls) + (1 - none) * with_ramblers(min(n, max(1, round(p * n))))


def estimate(kind: str, size: str | Size) -> dict:
    """Rough wall time of a study on a 2-core CPU, per CPU class (the papers' models; meaningless for tiny).

    The virtual clock computes content at full batch across devices (agents.engine), and with the packed
    forward up to 16 devices share one GEMM tile. Generation stops at eos / the HumanEval stop sequences,
    so a device leaves the batch when its completion ends: a paper point costs batch_steps of its devices'
    completion lengths (one tile: its longest completion), each problem's length estimated from its
    canonical solution (COMPLETION_FACTOR, COMPLETION_MARGIN) with a measured chance that a device never
    stops (RAMBLE_P, `point_steps`: an expected and a pessimistic count), plus the prompts' prefill. The calibration point runs calibration_tokens on every device. token_steps:
    [expected, pessimistic]; minutes per CPU class likewise; without_stops: every device to max_new_tokens
    (what a run costs where generation does not stop)."""
    size = SIZES[size] if isinstance(size, str) else size
    from testbed.prompts import humaneval_problems

    problems = humaneval_problems()[size.offset:None if size.count is None else size.offset + size.count]
    lengths, how = _token_lengths([p["prompt"] for p in problems] + [p["canonical_solution"] for p in problems])
    prompt_tokens, canonical = sum(lengths[:len(problems)]), lengths[len(problems):]
    if kind == "paper":
        names = ["llm-only", "hlm", "slm-only", "u-hlm", "cu-hlm", "cu-hlm-offline",
                 *["a"] * (len(size.risks) * len(size.adaptive_estimators)),
                 "rp", *["u"] * len(size.u_th), *["t"] * len(size.theta), "rand-hlm"]
        weight = sum(STEP_WEIGHT.get(n, 1.0) for n in names)
        devices = len(problems) * size.samples
        cal = size.calibration_tokens * math.ceil(devices / TILE)
        steps = [weight * point_steps(completion_lengths(canonical, size.max_new_tokens, w) * size.samples,
                                      size.max_new_tokens, w) + cal for w in (0, 1)]
        no_stop = weight * size.max_new_tokens * math.ceil(devices / TILE) + cal
        runs = len(names) + 1
        tiles = runs * math.ceil(prompt_tokens * size.samples / TILE)
    else:  # fleets: fleet_tokens each, short enough that no stop is assumed
        no_stop, tiles, runs, devices = 0.0, 0, 1, max(size.fleet_sizes)
        for n in size.fleet_sizes:
            no_stop += sum(STEP_WEIGHT.get(p, 1.0) for p in FLEET_POLICIES) * size.fleet_tokens * math.ceil(n / TILE)
            tiles += len(FLEET_POLICIES) * math.ceil(prompt_tokens * n / len(problems) / TILE)
            runs += len(FLEET_POLICIES)
        no_stop += size.calibration_tokens
        tiles += math.ceil(prompt_tokens / TILE)
        steps = [no_stop, no_stop]
    cpus = {}
    for c, label in CPU_CLASSES.items():
        sec = [st * STEP_S[c] + tiles * PREFILL_TILE_S[c] for st in steps]
        cpus[c] = {"cpu": label, "token_step_s": STEP_S[c], "prefill_tile_s": PREFILL_TILE_S[c],
                   "minutes": [x / 60 for x in sec],
                   "minutes_without_stops": (no_stop * STEP_S[c] + tiles * PREFILL_TILE_S[c]) / 60}
    lo, hi = cpus["bf16"]["minutes"][0] * 60, cpus["fp32"]["minutes"][1] * 60
    return {"kind": kind, "size": size.name, "runs": runs, "devices": devices, "samples": size.samples,
            "max_new_tokens": size.max_new_tokens, "token_steps": steps, "token_steps_without_stops": no_stop,
            "prompt_tokens": prompt_tokens, "prompt_tokens_from": how, "prefill_tiles": tiles,
            "longest_canonical_tokens": max(canonical) if canonical else 0, "cpu_classes": cpus,
            "this_cpu": cpu_class(), "seconds": [lo, hi], "minutes": [lo / 60, hi / 60],
            "assumptions": {"token_step_s": STEP_S, "prefill_tile_s": PREFILL_TILE_S, "step_weight": STEP_WEIGHT,
                            "tile": TILE, "completion_factor": COMPLETION_FACTOR,
                            "completion_margin": COMPLETION_MARGIN, "ramble_p": RAMBLE_P}}
