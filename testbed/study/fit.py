"""What parameterises a study's policies: the rejection model beta ~ a*u + b with its thresholds
(docs/design.md section 1, steps 3 and 4) and the offline k* of cu-hlm-offline."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.study.sizes import ESTIMATOR, PAPER, RISK_PRONE_BETA_TOL


@dataclass
class Fit:
    """The rejection model and the offline k* every policy of a study runs with."""

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
    """The given (a, b), else the calibration's fit of the papers' estimator, else the paper's (a <= 0 or
    a degenerate fit has no threshold); k* always from the calibration."""
    kstar = int(calibration["kstar"]["k"])
    if a is not None and b is not None:
        return Fit(float(a), float(b), "given", kstar)
    f = calibration["fits"].get(ESTIMATOR) or {}
    if f.get("a") is not None and f["a"] > 0:
        return Fit(float(f["a"]), float(f["b"]), f"calibration ({ESTIMATOR} estimator)", kstar)
    why = f.get("error") or f"fitted a = {f.get('a')} <= 0"
    return Fit(PAPER["fit"]["a"], PAPER["fit"]["b"], f"paper (fallback: {why})", kstar)
