"""The Policy composition and the named presets (docs/design.md section 1 and its baselines).

A HybridPolicy is estimator -> skip rule -> truncator -> quantiser, each a swappable part
built from a flat PolicyConfig (or passed in directly). Per token it answers skip, or
transmit with k entries at prob_bits bits.

Presets (each a PolicyConfig with documented defaults; every field can be overridden):

| name           | skip                               | upload                   | prob_bits |
|----------------|------------------------------------|--------------------------|-----------|
| llm-only       | (no drafts: the LLM samples)       | nothing (k = 0)          | -         |
| slm-only       | always (the LLM is never used)     | nothing                  | -         |
| hlm            | never                              | full distribution        | 32        |
| rand-hlm       | at random, rate skip_rate = 0.5    | full distribution        | 32        |
| u-hlm          | u <= u_th, risk-averse (-b/a)      | full distribution        | 32        |
| cu-hlm         | u <= u_th, risk-averse             | online k*(t), theta=0.1, eta=1 | 8   |
| cu-hlm-offline | u <= u_th, risk-averse             | one k* (k=64, or calibrated) | 8     |

Why these defaults: hlm/rand-hlm/u-hlm upload float32 (prob_bits=32), so with nothing
skipped or truncated the hybrid output is exactly the LLM's (docs/design.md step 7) and every
deviation of the others is measurable against them; the CU-HLM presets use the paper's
b_prob = 8. Uncertainty is the paper's temperature perturbation (K=20, theta_max=2.0) with
its rejection model a=0.815, b=-0.066 unless overridden (fit your own with
`testbed calibrate`). theta=0.1 with eta=1 allows the tail an L1 distance from its uniform
spread of 0.1 * D, D in [l(-1), l(0)] = [0.31, 0.69], i.e. 0.031 .. 0.069 (a testbed
choice; the paper's values were not at hand). The offline k=64 is a placeholder until
calibrated (the `calibration` parameter, or calibration data passed by the caller).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from policies.base import (
    PROB_BITS,
    Array,
    Decision,
    DecisionContext,
    Estimator,
    Policy,
    SkipRule,
    TokenBatch,
    Truncator,
)
from policies.law import DecisionLaw, u_grid
from policies.rejection import PAPER_A, PAPER_B, THRESHOLD_RULES, RejectionModel, threshold
from policies.skip import SKIP_RULES, AlwaysSkip, ConstantSkip, NeverSkip, RandomSkip, ThresholdSkip
from policies.truncation import TRUNCATIONS, Full, OnlineKStar, TopK, TopP, calibrate_offline_k
from policies.uncertainty import ESTIMATORS, ProbsEstimator, TemperaturePerturbation, make_estimator


@dataclass(frozen=True)
class PolicyConfig:
    estimator: str = "temperature"  # temperature | entropy | max | margin | none
    K: int = 20  # temperature perturbation: number of perturbed samples
    theta_max: float = 2.0  # ... temperatures uniform in (0, theta_max]
    skip: str = "uncertainty"  # never | always | random | uncertainty (u <= u_th)
    skip_rate: float = 0.5  # skip=random: probability of skipping
    threshold: str = "risk-averse"  # risk-averse | risk-prone | fixed
    u_th: float | None = None  # threshold=fixed: the threshold itself
    beta_tol: float = 0.5  # threshold=risk-prone: tolerated predicted rejection
    a: float = PAPER_A  # rejection model beta ~ a*u + b
    b: float = PAPER_B
    truncation: str = "full"  # full | top-k | top-p | online | offline
    k: int | None = None  # top-k / offline: entries sent
    top_p: float = 0.9  # top-p: mass to reach
    theta: float = 0.1  # online/offline k*: distortion budget
    eta: float = 1.0  # online/offline k*: smoothing of l(z)
    calibration: str | None = None  # offline: .npz with probs [N,V], drafts [N], betas [N]
    prob_bits: int = 8  # 8 | 16 | 32 (32 = float32, no quantisation)

    def u_th_value(self) -> float:
        """The skip threshold this config resolves to (skip=uncertainty)."""
        return threshold(self.threshold, self.a, self.b, u_th=self.u_th, beta_tol=self.beta_tol)


FIELDS = {f.name: f for f in dataclasses.fields(PolicyConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Check a parameter's type against PolicyConfig; ints are accepted for floats."""
    kind = FIELDS[name].type
    if value is None:
        if "None" in kind:
            return None
        raise ValueError(f"{name} may not be null")
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def _one_of(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def validate(c: PolicyConfig, given: frozenset[str] = frozenset(), calibrated: bool = False) -> None:
    """Raise ValueError for a config that cannot run, or for a `given` (user-set) parameter
    that has no effect in this configuration (almost always a mistake in a scenario).
    `calibrated`: the offline k* will come from calibration data given by the caller."""
    _one_of("estimator", c.estimator, (*ESTIMATORS, "none"))
    _one_of("skip", c.skip, SKIP_RULES)
    _one_of("threshold", c.threshold, THRESHOLD_RULES)
    _one_of("truncation", c.truncation, TRUNCATIONS)
    if c.prob_bits not in PROB_BITS:
        raise ValueError(f"prob_bits must be one of {PROB_BITS} (32 = no quantisation), got {c.prob_bits}")
    if c.K < 1:
        raise ValueError(f"K must be >= 1, got {c.K}")
    if not c.theta_max > 0:
        raise ValueError(f"theta_max must be > 0, got {c.theta_max}")
    if not 0 <= c.skip_rate <= 1:
        raise ValueError(f"skip_rate must be in [0, 1], got {c.skip_rate}")
    if not 0 <= c.beta_tol < 1:
        raise ValueError(f"beta_tol must be in [0, 1), got {c.beta_tol}")
    if c.k is not None and c.k < 1:
        raise ValueError(f"k must be >= 1, got {c.k}")
    if not 0 < c.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {c.top_p}")
    if not c.theta >= 0:
        raise ValueError(f"theta must be >= 0, got {c.theta}")
    if not c.eta > 0:
        raise ValueError(f"eta must be > 0, got {c.eta}")
    needs_u = c.skip == "uncertainty" or c.truncation == "online"
    if needs_u and c.estimator == "none":
        raise ValueError(
            f"skip={c.skip!r}/truncation={c.truncation!r} needs an uncertainty estimator, got estimator='none'"
        )
    if c.skip == "uncertainty":
        if c.threshold == "fixed" and c.u_th is None:
            raise ValueError("threshold 'fixed' needs u_th")
        c.u_th_value()  # a <= 0 raises here, at load time
    if c.truncation == "online" and not c.a > 0:
        raise ValueError(f"online truncation needs a rejection model with a > 0, got a = {c.a}")
    if c.truncation == "top-k" and c.k is None:
        raise ValueError("truncation 'top-k' needs k")
    if c.truncation == "offline" and c.k is None and c.calibration is None and not calibrated:
        raise ValueError("truncation 'offline' needs k or calibration")

    relevant = in_effect(c, calibrated)
    for name in sorted(given):
        if name not in relevant:
            raise ValueError(
                f"parameter {name!r} has no effect here "
                f"(skip={c.skip!r}, truncation={c.truncation!r}, estimator={c.estimator!r})"
            )


def as_checked(c: PolicyConfig, estimator: Callable[..., Any] | None) -> PolicyConfig:
    """The config that validation sees: a supplied estimator stands in for the one the config names,
    so check it as if it named a working one (temperature) rather than, say, 'none'."""
    return c if estimator is None else dataclasses.replace(c, estimator="temperature")


def in_effect(c: PolicyConfig, calibrated: bool = False) -> list[str]:
    """The PolicyConfig fields that change what this config does, in field order."""
    sends = c.skip != "always"
    by_uncertainty = c.skip == "uncertainty" and c.threshold != "fixed"
    offline_calibrated = c.truncation == "offline" and (c.calibration is not None or calibrated)
    budget = sends and (c.truncation == "online" or offline_calibrated)
    effect = {
        "estimator": True,
        "K": c.estimator == "temperature",
        "theta_max": c.estimator == "temperature",
        "skip": True,
        "skip_rate": c.skip == "random",
        "threshold": c.skip == "uncertainty",
        "u_th": c.skip == "uncertainty" and c.threshold == "fixed",
        "beta_tol": c.skip == "uncertainty" and c.threshold == "risk-prone",
        "a": by_uncertainty or (sends and c.truncation == "online"),
        "b": by_uncertainty or (sends and c.truncation == "online"),
        "truncation": sends,
        "k": sends and c.truncation in ("top-k", "offline"),
        "top_p": sends and c.truncation == "top-p",
        "theta": budget,
        "eta": budget,
        "calibration": sends and c.truncation == "offline",
        "prob_bits": sends,
    }
    return [n for n in FIELDS if effect[n]]


def load_calibration(source: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs [N, V], drafts [N], betas [N]) from an .npz path or a mapping/object with those."""
    if isinstance(source, (str, os.PathLike)):
        with np.load(source) as f:
            return f["probs"], f["drafts"], f["betas"]
    get = source.__getitem__ if isinstance(source, dict) else lambda n: getattr(source, n)
    return np.asarray(get("probs")), np.asarray(get("drafts")), np.asarray(get("betas"))


# --------------------------------------------------------------------------- the composition


class HybridPolicy(Policy):
    """estimator -> skip rule -> truncator -> quantiser. Parts default to the ones the config
    names; pass `estimator`, `skip_rule` or `truncator` to swap one in (any callables with
    the signatures of policies.uncertainty / policies.skip / policies.truncation parts)."""

    def __init__(
        self,
        name: str = "hybrid",
        config: PolicyConfig | None = None,
        *,
        estimator: Estimator | None = None,
        skip_rule: SkipRule | None = None,
        truncator: Truncator | None = None,
    ):
        config = config or PolicyConfig()
        validate(as_checked(config, estimator))  # fail at construction, not mid-run
        self.name = name
        self.config = config
        self.uses_llm = config.skip != "always"
        self.estimator: Estimator | None = estimator or (
            None if config.estimator == "none" else make_estimator(config.estimator, config.K, config.theta_max)
        )
        self.skip_rule: SkipRule = skip_rule or _skip_rule(config)
        self.truncator: Truncator = truncator or _truncator(config)

    def decide(self, logits: Array | None, ctx: DecisionContext) -> Decision:
        return self.decide_batch(None if logits is None else torch.as_tensor(logits).reshape(1, -1), [ctx])[0]

    def decide_batch(self, logits: Array | None, ctxs: list[DecisionContext]) -> list[Decision]:
        if not ctxs:
            return []
        batch = TokenBatch.from_contexts(logits, ctxs)
        n = len(batch)
        u = np.full(n, np.nan) if self.estimator is None else np.asarray(self.estimator(batch), dtype=np.float64)
        laws = [self.law(batch, i, u[i]) for i in range(n)]  # before the skip rule: it may learn from u
        send = ~np.asarray(self.skip_rule(u, batch), dtype=bool)
        k = np.zeros(n, dtype=np.int64)
        if send.any():
            k[send] = self.truncator(batch.select(send), u[send])
        bits = self.config.prob_bits
        return [Decision(bool(send[i]), float(u[i]), int(k[i]), bits, law=laws[i]) for i in range(n)]

    def law(self, batch: TokenBatch, i: int, u: float) -> DecisionLaw | None:
        """Row i's decision as a function of the u its draft could have had (policies.law); None when
        a part cannot say (a plug-in estimator whose u matters, a skip rule without p_skip, a
        truncator without law)."""
        tp = self.estimator if isinstance(self.estimator, TemperaturePerturbation) else None
        grid = u_grid(tp.K) if tp is not None else np.array([u])
        p_skip = getattr(self.skip_rule, "p_skip", None)
        trunc = getattr(self.truncator, "law", None)
        if p_skip is None or trunc is None:
            return None
        p = np.asarray(p_skip(grid, batch.keys[i]), dtype=np.float64)
        kind, value = trunc(batch, i, grid) if self.uses_llm else ("k", batch.vocab_size)
        online = kind == "beta"
        known = tp is not None or self.estimator is None or isinstance(self.estimator, ProbsEstimator)
        if not known:  # a plug-in estimator's u may depend on the draft in ways we cannot see: only a
            probe = np.array([0.0, 0.25, 0.5, 1.0, u])  # decision that ignores u has a law then
            if online or np.ptp(np.asarray(p_skip(probe, batch.keys[i]), dtype=np.float64)) > 0:
                return None
        c = self.config
        return DecisionLaw(
            p,
            c.prob_bits,
            k=None if online else int(value),
            beta=np.asarray(value, dtype=np.float64) if online else None,
            theta=c.theta,
            eta=c.eta,
            K=tp.K if tp is not None else 0,
            theta_max=tp.theta_max if tp is not None else c.theta_max,
        )

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def __repr__(self) -> str:
        return f"HybridPolicy({self.name!r}, {self.config})"


class LLMOnlyPolicy(Policy):
    """No drafts: the LLM samples every token itself; nothing but the token context is
    uploaded (k = 0, prob_bits = 0)."""

    name = "llm-only"
    drafts = False

    def decide(self, logits: Array | None, ctx: DecisionContext) -> Decision:
        return Decision(transmit=True, uncertainty=float("nan"), k=0, prob_bits=0, llm_samples=True)

    def decide_batch(self, logits: Array | None, ctxs: list[DecisionContext]) -> list[Decision]:
        return [self.decide(None, c) for c in ctxs]


def _skip_rule(c: PolicyConfig) -> ConstantSkip | RandomSkip | ThresholdSkip:
    if c.skip == "never":
        return NeverSkip()
    if c.skip == "always":
        return AlwaysSkip()
    if c.skip == "random":
        return RandomSkip(c.skip_rate)
    return ThresholdSkip(c.u_th_value())


def _truncator(c: PolicyConfig) -> Full | TopP | OnlineKStar | TopK:
    if c.truncation == "full":
        return Full()
    if c.truncation == "top-p":
        return TopP(c.top_p)
    if c.truncation == "online":
        return OnlineKStar(c.theta, c.eta, RejectionModel(c.a, c.b))
    if c.k is None:  # validate lets offline + calibration through: Preset.build calibrates k first
        raise ValueError(f"truncation {c.truncation!r} needs k (calibrate an offline k* first)")
    return TopK(c.k)  # top-k, and offline once k is known


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)  # overrides of PolicyConfig defaults
    params: tuple[str, ...] | None = None  # overridable parameters; None = every PolicyConfig field

    def config(self) -> PolicyConfig:
        return dataclasses.replace(PolicyConfig(), **self.defaults)

    def param_defaults(self) -> dict[str, Any]:
        """The parameters in effect with their defaults (for listings). Hybrid presets also
        accept every other PolicyConfig field, which may bring more into effect."""
        c = self.config()
        full = dataclasses.asdict(c)
        names = (
            in_effect(c) if self.params is None else [n for n in self.params if n in in_effect(c) or n == "estimator"]
        )
        return {n: full[n] for n in names}

    def build(self, params: dict[str, Any] | None = None, calibration: object = None) -> Policy:
        """The policy with `params` overriding the defaults; ValueError on a bad parameter.
        `calibration` (arrays, see load_calibration) sets the offline k* when k is not given."""
        params = dict(params or {})
        allowed = self.params if self.params is not None else tuple(FIELDS)
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)}; {self.name} takes: {', '.join(allowed) or 'none'}"
            )
        if self.name == "llm-only":
            return LLMOnlyPolicy()
        values = {n: _coerce(n, v) for n, v in params.items()}
        cfg = dataclasses.replace(self.config(), **values)
        # The offline k* is calibrated from `calibration` (a parameter, or data from the
        # caller) unless the user gave k; giving both as parameters is ambiguous.
        if "k" in params and cfg.calibration is not None:
            raise ValueError("give either k or calibration for offline truncation, not both")
        source = cfg.calibration if cfg.calibration is not None else calibration
        calibrated = cfg.truncation == "offline" and source is not None and "k" not in params
        if calibrated:
            cfg = dataclasses.replace(cfg, k=None)
        validate(cfg, frozenset(params), calibrated)
        if calibrated:
            probs, drafts, betas = load_calibration(source)
            cfg = dataclasses.replace(cfg, k=calibrate_offline_k(probs, drafts, betas, cfg.theta, cfg.eta))
        return HybridPolicy(self.name, cfg)


_EST = ("estimator", "K", "theta_max")
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "llm-only",
            "No SLM: the LLM samples every token itself (drafts=False); no probabilities are uploaded.",
            params=(),
        ),
        Preset(
            "slm-only",
            "SLM alone: every draft is accepted on the device and nothing is sent (uses_llm=False). "
            "Set estimator to record u anyway.",
            {"skip": "always", "estimator": "none"},
            params=_EST,
        ),
        Preset(
            "hlm",
            "Always upload the full distribution (float32); exact speculative sampling.",
            {"skip": "never", "prob_bits": 32},
        ),
        Preset(
            "rand-hlm",
            "Skip at random with rate skip_rate (keyed 'skip' draws), else upload the full distribution.",
            {"skip": "random", "prob_bits": 32},
        ),
        Preset(
            "u-hlm", "Skip when u <= u_th (risk-averse -b/a), else upload the full distribution.", {"prob_bits": 32}
        ),
        Preset(
            "cu-hlm",
            "Skip when u <= u_th (risk-averse); else upload the online top-k*(t), 8-bit.",
            {"truncation": "online"},
        ),
        Preset(
            "cu-hlm-offline",
            "Skip when u <= u_th (risk-averse); else upload one fixed top-k* (k, or calibrated from a set), 8-bit.",
            {"truncation": "offline", "k": 64},
        ),
    ]
}
