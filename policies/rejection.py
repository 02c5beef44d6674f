"""Rejection model beta ~ a*u + b, its least-squares fit, and the skip thresholds
(docs/design.md section 1, steps 3-4).

beta = max(0, 1 - y_d / x_d) is the probability that the LLM rejects the draft d. The
paper observes beta ~ a*u + b (a = 0.815, b = -0.066 for TinyLlama/Llama-2) and skips the
upload whenever u <= u_th. Threshold rules, all from u_th(beta_tol) = (beta_tol - b) / a,
the uncertainty at which the predicted rejection probability reaches beta_tol:

- risk-averse: beta_tol = 0, u_th = -b / a. Skip only where the model predicts no
  rejection at all (the paper's rule).
- risk-prone: beta_tol = 0.5 by default, u_th = (0.5 - b) / a. Skip whenever the draft is
  predicted to be accepted more likely than not: the device bets on acceptance whenever
  acceptance is the likelier outcome. beta_tol is a parameter (0 <= beta_tol < 1); a
  smaller value gives a rule between the two.
- fixed: u_th given directly.

A threshold below 0 means never skip (u >= 0); uncertainty scales differ per estimator
(entropy is in nats), so a and b must be fitted for the estimator in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

PAPER_A = 0.815
PAPER_B = -0.066
THRESHOLD_RULES = ("risk-averse", "risk-prone", "fixed")


class DegenerateFitError(ValueError):
    """The samples cannot determine the model, or the model cannot give a threshold."""


@dataclass(frozen=True)
class RejectionModel:
    a: float = PAPER_A
    b: float = PAPER_B

    def beta(self, u: npt.ArrayLike) -> np.ndarray:
        """Predicted rejection probability clip(a*u + b, 0, 1)."""
        return np.clip(self.a * np.asarray(u, dtype=np.float64) + self.b, 0.0, 1.0)


@dataclass(frozen=True)
class RejectionFit:
    """Ordinary least squares of beta on u. pearson_r is NaN when beta is constant
    (then a == 0: u carries no information about rejection)."""

    a: float
    b: float
    pearson_r: float
    n: int

    @property
    def model(self) -> RejectionModel:
        return RejectionModel(self.a, self.b)


def fit_rejection_model(us: npt.ArrayLike, betas: npt.ArrayLike) -> RejectionFit:
    """Fit beta ~ a*u + b by least squares; raises DegenerateFitError when a is undefined
    (fewer than 2 samples, non-finite values, or constant u)."""
    u = np.asarray(us, dtype=np.float64).ravel()
    beta = np.asarray(betas, dtype=np.float64).ravel()

    if u.shape != beta.shape:
        raise DegenerateFitError(f"u and beta differ in length ({u.size} vs {beta.size})")
    if u.size < 2:
        raise DegenerateFitError(f"need at least 2 samples to fit beta ~ a*u + b, got {u.size}")
    if not (np.isfinite(u).all() and np.isfinite(beta).all()):
        raise DegenerateFitError("u or beta contains NaN or inf")
    du, db = u - u.mean(), beta - beta.mean()
    suu, sbb, sub = du @ du, db @ db, du @ db
    if suu <= 1e-12 * max(1.0, float(u @ u)):
        raise DegenerateFitError(f"u is constant ({u[0]:g}) over all {u.size} samples: the slope a is undefined")
    a = sub / suu
    b = beta.mean() - a * u.mean()
    r = sub / np.sqrt(suu * sbb) if sbb > 0 else float("nan")
    return RejectionFit(float(a), float(b), float(r), int(u.size))


def u_threshold(a: float, b: float, beta_tol: float) -> float:
    """The uncertainty where the predicted rejection a*u + b reaches beta_tol."""
    if not a > 0:
        raise DegenerateFitError(
            f"rejection model slope a = {a:g} <= 0: uncertainty does not predict rejection, so no threshold exists"
        )
    return (beta_tol - b) / a


def risk_averse_threshold(a: float = PAPER_A, b: float = PAPER_B) -> float:
    """u_th = -b / a: skip only where the predicted rejection is 0."""
    return u_threshold(a, b, 0.0)


def risk_prone_threshold(a: float = PAPER_A, b: float = PAPER_B, beta_tol: float = 0.5) -> float:
    """u_th = (beta_tol - b) / a; with the default beta_tol = 0.5, skip whenever the draft is
    predicted to be accepted more likely than rejected."""
    if not 0.0 <= beta_tol < 1.0:
        raise ValueError(f"beta_tol must be in [0, 1), got {beta_tol}")
    return u_threshold(a, b, beta_tol)


def threshold(
    rule: str, a: float = PAPER_A, b: float = PAPER_B, *, u_th: float | None = None, beta_tol: float = 0.5
) -> float:
    """u_th for a rule in THRESHOLD_RULES."""
    if rule == "risk-averse":
        return risk_averse_threshold(a, b)
    if rule == "risk-prone":
        return risk_prone_threshold(a, b, beta_tol)
    if rule == "fixed":
        if u_th is None:
            raise ValueError("threshold 'fixed' needs u_th")
        return float(u_th)
    raise ValueError(f"unknown threshold rule {rule!r}; known: {', '.join(THRESHOLD_RULES)}")
