"""Calibrate the rejection model beta ~ a*u + b on a model pair (docs/design.md section 1, step 3).

The reference engine decodes HumanEval prompts with `hlm` (every draft verified, full
distribution) so beta = max(0, 1 - y_d/x_d) is observed for every token; alongside, every
uncertainty estimator is evaluated on the same draft. One least-squares fit per estimator.

This is the one calibration run (`record_betas`, `fit_estimators`): `testbed calibrate` (`calibrate`)
and the studies' calibration point (testbed.study.calibration) both call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from policies.base import Decision, DecisionContext, Policy, TokenBatch


class RecordingPolicy(Policy):
    """Wraps a policy and records u of every estimator for each (device, token index). With keep_every > 0
    it also keeps the SLM distribution x of every keep_every-th token (device-major order), for the
    offline k* of the studies (testbed.study.calibration)."""

    def __init__(self, inner: Policy, estimators: dict, keep_every: int = 0, max_new_tokens: int = 0):
        self.inner, self.estimators = inner, estimators
        self.name, self.drafts, self.uses_llm = inner.name, inner.drafts, inner.uses_llm
        self.samples: dict[tuple[int, int], dict[str, float]] = {}
        self.keep_every, self.max_new_tokens = keep_every, max_new_tokens
        self.kept: dict[tuple[int, int], np.ndarray] = {}

    def decide(self, logits, ctx: DecisionContext) -> Decision:
        return self.decide_batch(np.asarray(logits)[None], [ctx])[0]

    def decide_batch(self, logits, ctxs):
        if self.keep_every:
            for c in ctxs:
                if (c.device * self.max_new_tokens + c.token_index) % self.keep_every == 0:
                    self.kept[(c.device, c.token_index)] = np.asarray(c.probs, dtype=np.float32).copy()
        batch = TokenBatch.from_contexts(logits, ctxs)
        values = {name: np.asarray(est(batch), dtype=np.float64) for name, est in self.estimators.items()}
        for i, c in enumerate(ctxs):
            self.samples[(c.device, c.token_index)] = {name: float(v[i]) for name, v in values.items()}
        return self.inner.decide_batch(logits, ctxs)


SAMPLE_COLUMNS = ("device", "token_index", "token_id", "draft_id", "beta")


@dataclass
class Recording:
    """What the calibration run observed: per token its beta and u of every estimator, and the SLM
    distributions kept for the offline k*."""

    samples: pd.DataFrame  # the engine's rows (columns) merged with u_<estimator>, in the engine's row order
    kept: dict[tuple[int, int], np.ndarray]  # (device, token_index) -> x


def record_betas(
    specs, run, slm, llm, labels, columns: tuple[str, ...] = SAMPLE_COLUMNS, keep_every: int = 0, progress=None
) -> Recording:
    """The calibration run: `hlm` (every draft verified, full distribution) on every device of `specs`, so
    beta = max(0, 1 - y_d/x_d) is observed for every token, with every estimator's u of the same draft.
    Timing is irrelevant here (a generic server profile); every tier label in `labels` runs the recorder.
    The virtual clock's content pass forwards every device at once (agents.engine)."""
    from agents.engine import run_virtual
    from agents.verifier import ServerProfile
    from policies import load_policy
    from policies.uncertainty import ESTIMATORS, make_estimator

    # hlm without its own estimator: the recorder computes every estimator once per token.
    policy = RecordingPolicy(
        load_policy({"name": "hlm", "estimator": "none"}),
        {name: make_estimator(name) for name in ESTIMATORS},
        keep_every,
        run.max_new_tokens,
    )
    result = run_virtual(
        specs, run, ServerProfile(), slm, llm, {label: policy for label in labels}, on_content=progress
    )
    rows = pd.DataFrame(result.rows)
    u = pd.DataFrame(
        [
            {"device": d, "token_index": t, **{f"u_{k}": v for k, v in vals.items()}}
            for (d, t), vals in policy.samples.items()
        ]
    )
    return Recording(rows[list(columns)].merge(u, on=["device", "token_index"]), policy.kept)


def fit_estimators(samples: pd.DataFrame) -> dict:
    """Least squares beta ~ a*u + b per estimator (policies.rejection.fit_rejection_model): its
    RejectionFit, or the DegenerateFitError that says why there is none."""
    from policies.rejection import DegenerateFitError, fit_rejection_model
    from policies.uncertainty import ESTIMATORS

    fits: dict = {}
    for name in ESTIMATORS:
        try:
            fits[name] = fit_rejection_model(samples[f"u_{name}"], samples["beta"])
        except DegenerateFitError as e:
            fits[name] = e
    return fits


@dataclass
class Calibration:
    samples: pd.DataFrame  # device, token_index, beta, u_<estimator>...
    fits: dict[str, dict]


def _fit_entry(f, n_tokens: int) -> dict:
    """One estimator's entry of calibration.json (`testbed calibrate`)."""
    from policies.rejection import risk_averse_threshold

    if isinstance(f, Exception):
        return {
            "a": None,
            "b": None,
            "pearson_r": None,
            "u_th_risk_averse": None,
            "n_tokens": n_tokens,
            "error": str(f),
        }
    u_th = risk_averse_threshold(f.a, f.b) if f.a > 0 else float("nan")
    return {"a": f.a, "b": f.b, "pearson_r": f.pearson_r, "u_th_risk_averse": u_th, "n_tokens": f.n}


def calibrate(
    slm_spec,
    llm_spec,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    progress=None,
    dtype: str = "auto",
) -> Calibration:
    """`testbed calibrate`: the calibration run on the prompts, one fit per estimator with its bootstrap
    interval over prompts (testbed.study.bootstrap)."""
    from agents.device import DeviceSpec, RunParams
    from agents.lm import BatchedLM
    from agents.models import load_model
    from netem import DuplexProfile
    from testbed.study.bootstrap import add_intervals

    slm, llm = BatchedLM(load_model(slm_spec, dtype=dtype)), BatchedLM(load_model(llm_spec, dtype=dtype))
    link = DuplexProfile.from_dict(
        {"uplink": {"rate_mbps": 100.0, "delay_ms": 1.0}, "downlink": {"rate_mbps": 100.0, "delay_ms": 1.0}}
    )
    specs = [DeviceSpec(i, "calibration", "hlm", 10.0, link, i, tuple(ids)) for i, ids in enumerate(prompt_ids)]
    run = RunParams(seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, vocab_size=llm.vocab_size)
    samples = record_betas(specs, run, slm, llm, ["hlm"], progress=progress).samples
    fits = {name: _fit_entry(f, len(samples)) for name, f in fit_estimators(samples).items()}
    add_intervals(fits, samples)  # fits[name]["ci"]: bootstrap over prompts (devices)
    return Calibration(samples, fits)


def plot_beta_fits(
    samples: pd.DataFrame, fits: dict[str, dict], path: Path, paper_estimator: str = "temperature"
) -> Path:
    """One panel per estimator: observed beta of every token against its u (columns u_<name>),
    the fitted line, and for `paper_estimator` the paper's line. Used by `testbed calibrate`
    and `testbed reproduce`."""
    from policies.rejection import PAPER_A, PAPER_B
    from testbed.figures import num
    from testbed.report import new_figure

    names = list(fits)
    fig, ax = new_figure(4.0 * len(names), 3.8, ncols=len(names))
    fig.suptitle(f"beta vs uncertainty ({len(samples)} tokens)")
    rng = np.random.default_rng(0)
    for a, name in zip(ax[0], names):
        u = samples[f"u_{name}"].to_numpy(float)
        beta = samples["beta"].to_numpy(float)
        m = np.isfinite(u) & np.isfinite(beta)
        if not m.any():
            a.text(0.5, 0.5, "n/a", ha="center", va="center", transform=a.transAxes, fontsize=12, color="gray")
            continue
        jitter = rng.uniform(-0.006, 0.006, m.sum()) * (np.ptp(u[m]) or 1.0)  # u is often discrete (j / K)
        a.scatter(u[m] + jitter, beta[m], s=7, alpha=0.3, color="#1f77b4", label=f"tokens (n={m.sum()})")
        f = fits[name]
        grid = np.linspace(float(u[m].min()), float(u[m].max()), 50)
        if f.get("a") is not None:
            r = num(f.get("pearson_r"))
            a.plot(
                grid,
                np.clip(f["a"] * grid + f["b"], 0, 1),
                color="#d62728",
                lw=2,
                label=f"fit: {f['a']:.3f} u {f['b']:+.3f}" + ("" if r is None else f", r={r:.2f}"),
            )
        if name == paper_estimator:
            a.plot(
                grid,
                np.clip(PAPER_A * grid + PAPER_B, 0, 1),
                color="gray",
                ls="--",
                label=f"paper: {PAPER_A} u {PAPER_B:+}",
            )
        a.set_title(name)
        a.set_xlabel("uncertainty u")
        a.set_ylabel("rejection probability beta")
        a.set_ylim(-0.03, 1.03)
        a.legend(fontsize=7, loc="upper left")
    fig.savefig(path)
    return path


def plot(cal: Calibration, path: Path) -> Path:
    return plot_beta_fits(cal.samples, cal.fits, path)
