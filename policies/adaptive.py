"""cu-hlm-adaptive: an uncertainty skip rule that needs no offline calibration (issue 8).

u-hlm / cu-hlm skip when u <= u_th with u_th = -b/a from an offline fit beta ~ a*u + b.
This policy instead learns, per device and online, from the verdicts that come back, and
targets a user-given risk budget:

    risk = expected missed rejections per token = E[beta * 1{skipped}] over ALL tokens

(probes, below, are transmitted and count as not skipped).

The rule (AdaptiveSkip; the rest is a HybridPolicy: estimator -> skip -> truncator -> quantiser):

- u is binned: bin j = floor(u / w + 1/2), w = `bin_width` (default 1/K for temperature
  perturbation, whose u is exactly j/K, so a bin is one value of u; 0.02 otherwise). Per
  device and bin it keeps n_j, the tokens it decided (u is known for every token, skipped or
  not), and S_j / W_j, the weighted sum of observed betas and of their weights.
- s0 = `prior_strength` pseudo-tokens with beta = 1/2 (an uninformed guess) are spread evenly
  over the B bins from 0 to the highest seen, a0 = s0 / B each. The risk of skipping the bins
  below c, and bin c with probability q, is estimated as
      R(c, q) = sum_{j<c} f_j m_j + q f_c m_c,
      f_j = (n_j + a0) / (n + s0),   m_j = (S_j + a0 / 2) / (W_j + a0).
  This is the plug-in (empirical) risk of exactly the rule applied, with the pseudo-tokens
  making sparse or empty bins cost something (without them a device whose first tokens all
  had high u would see "skipping every low u costs nothing"). Their bias is O(s0 / n).
- The rule is the largest (c, q) with R(c, q) <= risk / (1 - epsilon) (probes take
  (1 - epsilon) off the realised risk). q randomises inside the boundary bin with a keyed
  draw, so the budget is met even though u takes few distinct values (21 with K = 20).
  Bins above every bin seen are never skipped.
- Conservative start: nothing is skipped before `min_samples` betas were observed on the
  device; a budget of 0 never skips (and so never probes).
- Probes: a token the rule would skip is transmitted anyway with probability `epsilon`.

Why this and not the suggested alternatives: beta is clipped at 0 and far from linear in u
on real and tiny models alike, so a least-squares line mis-states the risk near the
threshold, while the plug-in needs no model of beta(u) at all (not even monotonicity; the
threshold form only makes it optimal when E[beta | u] grows with u). With shadow feedback
every past token tells what *every* threshold would have cost (counterfactual evaluation),
which a Robbins-Monro update of u_th, one noisy step per token, wastes.

Feedback (`feedback`):
- "shadow" (default): every token's beta reaches the policy: the verified draft's with its
  verdict, a skipped token's (its shadow beta) with the verdict of the next upload that
  piggybacks it. The sample is then complete, so the estimates are unbiased at every u
  without exploration. Probes are still needed here for another reason: shadows only come
  back with an upload, so a device whose rule came to cover every u would otherwise never
  hear of its skipped tokens again (seen on the tiny models: one device skipped 119 tokens
  in a row at a realised risk of 0.24 for a budget of 0.01). With epsilon > 0 a skip run
  lasts 1 / epsilon tokens on average. A deployment would need the server to return y_d (or
  beta) of piggybacked tokens on the downlink (a few bytes per skipped token); the testbed
  carries it as a measurement field and does not charge it.
- "transmitted": only verified drafts are used (a deployment needs y_d of the verified draft
  in the verdict, one number per upload). Tokens the rule skips are then seen only through
  probes. u is known for every token, so f_j stays exact and only m_j is estimated from a
  subsample; inside a bin the probe draw is independent of beta, and each observation is
  weighted 1 / P(transmitted at its decision) (inverse propensity, a Hajek mean per bin) so
  that the rule changing over time (q of the boundary bin, c) biases nothing either. Needs
  epsilon > 0; learns slower (fewer betas where it skips), so it is more conservative on
  short runs.

Online k* (truncation="online", as cu-hlm): `kstar_beta="learned"` (default) puts the
device's learned m_j in place of clip(a*u + b, 0, 1) in U_TV's denominator, falling back
to a, b until `min_samples` betas were seen; "linear" keeps cu-hlm's a, b throughout.

Which u: any estimator works (the rule needs no model of beta(u), only that skipping low u first
is sensible). With temperature perturbation u takes K + 1 values, so a whole bin of tokens is
skipped or not (q randomises the boundary bin); a continuous, deterministic u such as
`estimator: max` (1 - max x) ranks tokens more finely and costs no perturbed draws. Measured in
`testbed reproduce paper --size small` (README, exact fidelity): with `max` at risk 0.01, 49.6% skipped
at a fidelity of 0.0177 TV/token, where the upper concave hull of cu-hlm's thresholds reaches 41.9%.

Determinism (docs/design.md section 2): one policy instance serves many devices; all state is
keyed by device, fed only by that device's decisions and verdicts (which arrive in its own
order), and randomness comes only from keyed_rng(seed, device, token_index, "skip") (two
uniforms: the boundary bin's q, then the probe). Decisions therefore do not depend on
which devices share the instance, the process or a batch. A device whose token index goes
back (a replayed or repeated run on the same instance) starts from a fresh state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from policies.base import Estimator, Key, Policy, TokenBatch
from policies.policy import HybridPolicy, PolicyConfig, _coerce, as_checked, in_effect, validate
from policies.rejection import RejectionModel
from policies.rng import keyed_rng
from policies.truncation import OnlineKStar

FEEDBACK = ("shadow", "transmitted")
KSTAR_BETA = ("learned", "linear")
_MAX_BINS = 1 << 16  # u beyond this many bin widths shares the last bin
_NEVER = (-1, 0.0)  # the rule "skip nothing": no bin is < -1, bin -1 does not exist
PRIOR_BETA = 0.5  # the beta of the prior's pseudo-tokens


@dataclass
class _DeviceState:
    n: np.ndarray = field(default_factory=lambda: np.zeros(0))  # tokens decided per bin
    w: np.ndarray = field(default_factory=lambda: np.zeros(0))  # weight of observed betas per bin
    s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # weighted sum of observed betas
    decided: int = 0
    observed: int = 0
    would_skip: int = 0  # tokens the rule chose to skip (skipped + probes)
    probes: int = 0
    skipped: int = 0
    last_index: int = -1
    p_transmit: dict[int, float] = field(default_factory=dict)  # feedback=transmitted: awaiting verdict
    rule: tuple[int, float] | None = None  # cached (c, q); None when the evidence changed

    def grow(self, j: int) -> None:
        if j >= self.n.size:
            pad = max(j + 1, 2 * self.n.size, 8) - self.n.size
            self.n, self.w, self.s = (np.concatenate([a, np.zeros(pad)]) for a in (self.n, self.w, self.s))


def check_adaptive(
    risk: float,
    epsilon: float,
    feedback: str,
    min_samples: int,
    prior_strength: float,
    bin_width: float | None,
    kstar_beta: str,
) -> None:
    """ValueError naming the parameter for any value the rule cannot run with (they come from
    scenarios: the types are checked here too)."""

    def number(name: str, v: object) -> None:
        if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")

    number("risk", risk)
    if not 0.0 <= risk <= 1.0:
        raise ValueError(f"risk must be in [0, 1] (expected missed rejections per token), got {risk!r}")
    number("epsilon", epsilon)
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1) (probe probability), got {epsilon!r}")
    if feedback not in FEEDBACK:
        raise ValueError(f"feedback must be one of {', '.join(FEEDBACK)}; got {feedback!r}")
    if feedback == "transmitted" and not epsilon > 0:
        raise ValueError(
            "epsilon must be > 0 with feedback='transmitted': probes are then its only view of beta where it skips"
        )
    if isinstance(min_samples, bool) or not isinstance(min_samples, (int, np.integer)) or min_samples < 1:
        raise ValueError(f"min_samples must be an integer >= 1, got {min_samples!r}")
    number("prior_strength", prior_strength)
    if prior_strength < 0:
        raise ValueError(f"prior_strength must be >= 0, got {prior_strength!r}")
    if bin_width is not None:
        number("bin_width", bin_width)
        if not bin_width > 0:
            raise ValueError(f"bin_width must be > 0, got {bin_width!r}")
    if kstar_beta not in KSTAR_BETA:
        raise ValueError(f"kstar_beta must be one of {', '.join(KSTAR_BETA)}; got {kstar_beta!r}")


class AdaptiveSkip:
    """The skip rule of cu-hlm-adaptive (see the module docstring): callable (u, batch) ->
    skip [B] like the rules in policies.skip, plus `observe` for the verdicts."""

    def __init__(
        self,
        risk: float = 0.02,
        epsilon: float = 0.05,
        feedback: str = "shadow",
        min_samples: int = 8,
        prior_strength: float = 2.0,
        bin_width: float = 0.05,
    ):
        check_adaptive(risk, epsilon, feedback, min_samples, prior_strength, bin_width, "learned")
        self.risk = float(risk)
        self.epsilon = float(epsilon)
        self.feedback = feedback
        self.min_samples = int(min_samples)
        self.prior_strength = float(prior_strength)
        self.bin_width = float(bin_width)
        self._state: dict[int, _DeviceState] = {}

    # --- per device ----------------------------------------------------------------------
    def _st(self, device: int) -> _DeviceState:
        st = self._state.get(device)
        if st is None:
            st = self._state[device] = _DeviceState()
        return st

    def _bin(self, u: float) -> int:
        return int(min(max(math.floor(u / self.bin_width + 0.5), 0), _MAX_BINS - 1))

    def _estimates(self, st: _DeviceState) -> tuple[np.ndarray, np.ndarray] | None:
        """(f_j, m_j) for the bins 0 .. B-1, B = 1 + the highest bin seen (module docstring);
        None before min_samples betas."""
        if st.observed < self.min_samples or not st.w.sum() > 0:
            return None
        bins = int(np.flatnonzero(st.n + st.w)[-1]) + 1
        a0 = self.prior_strength / bins
        f = (st.n[:bins] + a0) / max(st.decided + self.prior_strength, 1e-300)
        m = (st.s[:bins] + a0 * PRIOR_BETA) / np.maximum(st.w[:bins] + a0, 1e-300)
        return f, m

    def rule(self, device: int) -> tuple[int, float]:
        """(c, q): bins below c are skipped, bin c with probability q (before probes)."""
        st = self._st(device)
        if st.rule is None:
            st.rule = self._rule(st)
        return st.rule

    def _rule(self, st: _DeviceState) -> tuple[int, float]:
        est = None if self.risk <= 0 or st.decided == 0 else self._estimates(st)
        if est is None:
            return _NEVER
        cost = est[0] * est[1]
        cum = np.cumsum(cost)
        target = self.risk / (1.0 - self.epsilon)
        c = int(np.searchsorted(cum, target, side="right"))  # leading bins that fit entirely
        if c >= cost.size:
            return (int(cost.size), 0.0)
        spent = float(cum[c - 1]) if c > 0 else 0.0
        return (c, float(min(max((target - spent) / cost[c], 0.0), 1.0)))

    def u_threshold(self, device: int) -> float:
        """The u below which the device skips for sure (-inf: nothing is skipped)."""
        c, _ = self.rule(device)
        return -math.inf if c <= 0 else (c - 0.5) * self.bin_width

    def expected_beta(self, device: int, u: float) -> float | None:
        """The learned E[beta | u] of the device (None before min_samples betas)."""
        est = self._estimates(self._st(device))
        if est is None or not math.isfinite(u):
            return None
        j = self._bin(u)
        return PRIOR_BETA if j >= est[1].size else float(min(max(est[1][j], 0.0), 1.0))

    def stats(self, device: int) -> dict[str, Any]:
        st = self._st(device)
        return dict(
            decided=st.decided,
            observed=st.observed,
            would_skip=st.would_skip,
            probes=st.probes,
            skipped=st.skipped,
            u_threshold=self.u_threshold(device),
            rule=self.rule(device),
        )

    # --- the rule --------------------------------------------------------------------------
    def __call__(self, u: np.ndarray, batch: TokenBatch) -> np.ndarray:
        out = np.zeros(len(batch), dtype=bool)
        for i, (seed, device, token_index) in enumerate(batch.keys):
            st = self._st(device)
            if token_index <= st.last_index:  # the device starts over: forget its old stream
                st = self._state[device] = _DeviceState()
            st.last_index = token_index
            ui = float(u[i])
            if not math.isfinite(ui):
                st.decided += 1
                st.rule = None
                continue  # no uncertainty: always transmit (and it counts as a risk-free token)
            c, q = self.rule(device)  # from the evidence before this token
            st.decided += 1
            j = self._bin(ui)
            p_skip = 1.0 if j < c else (q if j == c else 0.0)
            skip = False
            if p_skip > 0:
                r = keyed_rng(seed, device, token_index, "skip").random(2)
                if p_skip >= 1.0 or r[0] < p_skip:
                    st.would_skip += 1
                    if self.epsilon > 0 and r[1] < self.epsilon:
                        st.probes += 1
                    else:
                        skip = True
                        st.skipped += 1
            st.grow(j)
            st.n[j] += 1
            st.rule = None
            if not skip and self.feedback == "transmitted":
                st.p_transmit[token_index] = 1.0 - p_skip * (1.0 - self.epsilon)
            out[i] = skip
        return out

    def p_skip(self, u: np.ndarray, key: Key) -> np.ndarray:
        """P(skip | u) for each u, from the device's evidence before this token (the decision law,
        policies.law): the rule's bins below c for sure, bin c with probability q, times the chance
        of no probe. Called before __call__ for the same token."""
        _, device, token_index = key
        st = self._state.get(device)
        if st is None or token_index <= st.last_index:
            return np.zeros(len(u))  # a fresh state skips nothing
        c, q = self.rule(device)
        out = np.zeros(len(u))
        for i, ui in enumerate(np.asarray(u, dtype=np.float64)):
            if math.isfinite(ui):
                j = self._bin(ui)
                out[i] = 1.0 if j < c else (q if j == c else 0.0)
        return out * (1.0 - self.epsilon)

    def expected_beta_after(self, device: int, token_index: int, u: float) -> float | None:
        """expected_beta(device, u) as it will read once __call__ has counted this token's u (its bin
        may widen the prior's spread); LearnedKStar's online k* reads it then."""
        st = self._state.get(device)
        if st is None or token_index <= st.last_index:
            return None  # __call__ starts the device afresh: no betas yet
        saved = (st.n, st.w, st.s, st.decided, st.rule)
        try:
            if math.isfinite(u):
                j = self._bin(u)
                st.grow(j)
                st.n = st.n.copy()
                st.n[j] += 1
            st.decided += 1
            return self.expected_beta(device, u)
        finally:
            st.n, st.w, st.s, st.decided, st.rule = saved

    def observe(self, device: int, token_index: int, uncertainty: float, beta: float, skipped: bool) -> None:
        if not (math.isfinite(uncertainty) and math.isfinite(beta)):
            return
        st = self._st(device)
        if self.feedback == "transmitted":
            if skipped:
                return  # this mode learns from verified drafts only
            weight = 1.0 / st.p_transmit.pop(token_index, 1.0)
        else:
            weight = 1.0
        j = self._bin(float(uncertainty))
        st.grow(j)
        st.w[j] += weight
        st.s[j] += weight * float(beta)
        st.observed += 1
        st.rule = None


@dataclass(frozen=True)
class _GivenBeta:
    """A stand-in rejection model for OnlineKStar: per-row beta_d already known."""

    values: np.ndarray

    def beta(self, u: npt.ArrayLike) -> np.ndarray:
        return self.values


@dataclass(frozen=True)
class LearnedKStar:
    """Online k*(t) (policies.truncation.OnlineKStar) with each device's learned E[beta | u]
    as beta_d; `base` (cu-hlm's a*u + b) until the device has min_samples betas."""

    base: OnlineKStar
    skip: AdaptiveSkip

    def __call__(self, batch: TokenBatch, u: np.ndarray) -> np.ndarray:
        beta = np.array(self.base.model.beta(u), dtype=np.float64, copy=True).reshape(-1)
        for i, (_, device, _) in enumerate(batch.keys):
            learned = self.skip.expected_beta(device, float(u[i]))
            if learned is not None:
                beta[i] = learned
        return dataclasses.replace(self.base, model=_GivenBeta(beta))(batch, u)

    def law(self, batch: TokenBatch, i: int, u: np.ndarray) -> tuple[str, object]:
        """beta_d at each u as __call__ will use it (called before the skip rule counts the token)."""
        _, device, token_index = batch.keys[i]
        u = np.asarray(u, dtype=np.float64).reshape(-1)
        base = np.array(self.base.model.beta(u), dtype=np.float64, copy=True).reshape(-1)
        learned = [self.skip.expected_beta_after(device, token_index, float(v)) for v in u]
        return "beta", np.array([b if lb is None else lb for b, lb in zip(base, learned)])


# Parameters: the PolicyConfig fields of estimator and upload, then the rule's own.
CONFIG_PARAMS = ("estimator", "K", "theta_max", "truncation", "k", "top_p", "theta", "eta", "a", "b", "prob_bits")
ADAPTIVE_DEFAULTS = dict(
    risk=0.02, epsilon=0.05, feedback="shadow", min_samples=8, prior_strength=2.0, bin_width=None, kstar_beta="learned"
)
PARAMS = (*CONFIG_PARAMS, *ADAPTIVE_DEFAULTS)


def _check_config(c: PolicyConfig) -> None:
    if c.estimator == "none":
        raise ValueError("estimator must name an uncertainty estimator for cu-hlm-adaptive, got 'none'")
    if c.truncation == "offline":
        raise ValueError(
            "truncation 'offline' needs an offline calibration, which this policy does without; "
            "use online, top-k, top-p or full"
        )


class AdaptivePolicy(HybridPolicy):
    """cu-hlm with a self-calibrating skip rule: estimator -> AdaptiveSkip -> truncator
    (online k* by default) -> quantiser. `observe` feeds the rule (see module docstring)."""

    skip_rule: AdaptiveSkip

    def __init__(
        self,
        name: str = "cu-hlm-adaptive",
        config: PolicyConfig | None = None,
        *,
        risk: float = 0.02,
        epsilon: float = 0.05,
        feedback: str = "shadow",
        min_samples: int = 8,
        prior_strength: float = 2.0,
        bin_width: float | None = None,
        kstar_beta: str = "learned",
        estimator: Estimator | None = None,
    ):
        config = dataclasses.replace(config or PolicyConfig(truncation="online"), skip="never")
        check_adaptive(risk, epsilon, feedback, min_samples, prior_strength, bin_width, kstar_beta)
        _check_config(as_checked(config, estimator))
        if bin_width is None:
            bin_width = 1.0 / config.K if config.estimator == "temperature" else 0.02
        self.kstar_beta = kstar_beta
        skip = AdaptiveSkip(risk, epsilon, feedback, min_samples, prior_strength, bin_width)
        truncator: LearnedKStar | None = None
        if config.truncation == "online" and kstar_beta == "learned":
            truncator = LearnedKStar(OnlineKStar(config.theta, config.eta, RejectionModel(config.a, config.b)), skip)
        super().__init__(name, config, estimator=estimator, skip_rule=skip, truncator=truncator)

    def observe(self, device: int, token_index: int, uncertainty: float, beta: float, skipped: bool) -> None:
        self.skip_rule.observe(device, token_index, uncertainty, beta, skipped)

    def params(self) -> dict[str, Any]:
        c = self.config
        full = dataclasses.asdict(c)
        effect = set(in_effect(c))
        out = {n: full[n] for n in CONFIG_PARAMS if n in effect}
        s = self.skip_rule
        out.update(
            risk=s.risk,
            epsilon=s.epsilon,
            feedback=s.feedback,
            min_samples=s.min_samples,
            prior_strength=s.prior_strength,
            bin_width=s.bin_width,
        )
        if c.truncation == "online":
            out["kstar_beta"] = self.kstar_beta
        return out

    def __repr__(self) -> str:
        return f"AdaptivePolicy({self.name!r}, {self.params()})"


@dataclass(frozen=True)
class AdaptivePreset:
    """A named preset of AdaptivePolicy, with the interface of policies.policy.Preset
    (description, param_defaults, build) so the registry treats it like the others."""

    name: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)

    def param_defaults(self) -> dict[str, Any]:
        return self.build().params()

    def build(self, params: dict[str, Any] | None = None, calibration: object = None) -> Policy:
        params = dict(params or {})
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; {self.name} takes: {', '.join(PARAMS)}")
        given = {**self.defaults, **params}
        cfg_values = {n: _coerce(n, given[n]) for n in CONFIG_PARAMS if n in given}
        cfg = dataclasses.replace(PolicyConfig(truncation="online"), **cfg_values, skip="never")
        _check_config(cfg)
        effect = set(in_effect(cfg)) | ({"kstar_beta"} if cfg.truncation == "online" else set())
        idle = sorted(n for n in params if n not in effect and (n in CONFIG_PARAMS or n == "kstar_beta"))
        if idle:  # as for the other presets: a parameter without effect is almost always a mistake
            raise ValueError(
                f"parameter {idle[0]!r} has no effect here (truncation={cfg.truncation!r}, estimator={cfg.estimator!r})"
            )
        validate(cfg)  # the PolicyConfig value checks (K, theta, prob_bits, ...)
        rule = {**ADAPTIVE_DEFAULTS, **{n: given[n] for n in ADAPTIVE_DEFAULTS if n in given}}
        return AdaptivePolicy(self.name, cfg, **rule)


ADAPTIVE_PRESETS: dict[str, AdaptivePreset] = {
    p.name: p
    for p in [
        AdaptivePreset(
            "cu-hlm-adaptive",
            "Learns online, per device, which u it can skip within a risk budget (risk = expected missed "
            "rejections per token); no offline fit of a, b. Else uploads the online top-k*(t), 8-bit.",
        ),
    ]
}
