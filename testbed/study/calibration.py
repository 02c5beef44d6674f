"""The calibration point of a study (OUT/calibration): `hlm` on the study's prompts with every
uncertainty estimator recorded per token (the calibration run of `testbed calibrate`,
testbed.calibrate.record_betas): the fit beta ~ a*u + b per estimator (docs/design.md section 1,
step 3), the binned reliability curve, the bootstrap intervals (testbed.study.bootstrap), and the
offline k* (policies.truncation.calibrate_offline_k on the SLM distributions x of a deterministic
subsample of its tokens, with their observed betas; docs/design.md section 1, step 5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from testbed.scenario import Scenario
from testbed.study.sizes import DEFAULT_ETA, DEFAULT_THETA

SAMPLE_COLUMNS = ("device", "prompt_index", "token_index", "token_id", "draft_id", "beta")


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
        out.append(
            {
                "u_lo": float(lo),
                "u_hi": float(hi),
                "n": int(sel.sum()),
                "u_mean": float(u[sel].mean()),
                "beta_observed": float(beta[sel].mean()),
                "beta_predicted": pred,
            }
        )
    return out


def fit_entry(f, n_tokens: int) -> dict:
    """One estimator's entry of the study's calibration.json: a RejectionFit, or the error that says why
    there is none (testbed.calibrate.fit_estimators)."""
    if isinstance(f, Exception):
        return {"a": None, "b": None, "pearson_r": None, "n": n_tokens, "u_th_risk_averse": None, "error": str(f)}
    return {
        "a": f.a,
        "b": f.b,
        "pearson_r": None if math.isnan(f.pearson_r) else f.pearson_r,
        "n": f.n,
        "u_th_risk_averse": -f.b / f.a if f.a > 0 else None,
    }


def offline_kstar(kept: dict, samples, theta: float, eta: float, vocab_size: int) -> tuple[int, int]:
    """k* from the kept SLM distributions whose beta was observed (|V| when none was); (k*, tokens used)."""
    from policies.truncation import calibrate_offline_k

    beta_of = {(int(r.device), int(r.token_index)): (float(r.beta), int(r.draft_id)) for r in samples.itertuples()}
    keys = sorted(k for k in kept if k in beta_of and math.isfinite(beta_of[k][0]))
    if not keys:
        return vocab_size, 0
    k = calibrate_offline_k(
        np.stack([kept[k] for k in keys]), [beta_of[k][1] for k in keys], [beta_of[k][0] for k in keys], theta, eta
    )
    return int(k), len(keys)


def _slice_text(s: Scenario) -> str:
    end = "" if s.prompts.count is None else s.prompts.offset + s.prompts.count
    return f"humaneval[{s.prompts.offset}:{end}]"


def calibrate_point(
    s: Scenario, out_dir: Path, kstar_tokens: int, theta: float = DEFAULT_THETA, eta: float = DEFAULT_ETA
) -> dict:
    """The calibration run on the scenario's devices (module docstring), the x of every stride-th token
    kept for the offline k*. Writes samples.parquet and calibration.json into out_dir; returns the latter."""
    import torch

    from agents.lm import BatchedLM
    from agents.models import load_model
    from testbed.calibrate import fit_estimators, record_betas
    from testbed.run import plan
    from testbed.study.bootstrap import add_intervals

    p = plan(s)
    stride = max(1, math.ceil(len(p.specs) * p.run.max_new_tokens / max(1, kstar_tokens)))
    torch.set_num_threads(p.threads)  # as the runs' content pass (testbed.run.local)
    slm = BatchedLM(load_model(p.slm, dtype=p.slm_dtype, device=s.actors.group_device))
    llm = BatchedLM(load_model(p.llm, dtype=p.llm_dtype, device=s.actors.verifier_device))
    rec = record_betas(p.specs, p.run, slm, llm, list(p.policy_specs), SAMPLE_COLUMNS, keep_every=stride)
    samples = rec.samples.sort_values(["device", "token_index"], kind="stable").reset_index(drop=True)
    fits = {name: fit_entry(f, len(samples)) for name, f in fit_estimators(samples).items()}
    curves = {name: reliability(samples[f"u_{name}"], samples["beta"], f["a"], f["b"]) for name, f in fits.items()}
    add_intervals(fits, samples)  # bootstrap over devices: fits[name]["ci"]
    k, kept = offline_kstar(rec.kept, samples, theta, eta, p.run.vocab_size)
    doc = {
        "scenario": s.name,
        "models": {"slm": str(s.models.slm), "llm": str(s.models.llm)},
        "prompts": _slice_text(s),
        "devices": len(p.specs),
        "max_new_tokens": p.run.max_new_tokens,
        "tokens": int(len(samples)),
        "vocab_size": p.run.vocab_size,
        "fits": fits,
        "reliability": curves,
        "kstar": {"k": k, "theta": theta, "eta": eta, "tokens": kept, "stride": stride},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    samples.to_parquet(out_dir / "samples.parquet", index=False)
    (out_dir / "calibration.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return doc
