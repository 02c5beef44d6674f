"""How sure the calibration is: a bootstrap over sequences for the rejection fit beta ~ a*u + b and
the risk-averse threshold u_th = -b/a (issue 15, item 5;
docs/design.md section 7, calibration intervals).

Why over sequences: the tokens of one device share a prompt and a context, so their (u, beta) are
correlated; resampling tokens one by one would treat 256 tokens of 16 sequences as 256 independent
draws and give intervals that are too narrow. A replicate draws as many devices as there are, with
replacement, and keeps all tokens of each drawn device together (the cluster bootstrap).

The flip: with temperature perturbation u takes the values j/K, so u_th < 0 skips nothing and
0 <= u_th < 1/K skips exactly the u = 0 tokens. When b ~ 0 (our pair) the sign of u_th, and with it
whether cu-hlm skips anything at all, is decided by the fit's noise. `straddles` says when the
interval holds both a value < 0 and a value >= 0; `FitCI.nonneg_fraction` is the share of replicates
on the skipping side.

Each replicate's fit is the same least squares as policies.rejection.fit_rejection_model, computed
from per-device sufficient statistics (n, sum u, sum beta, sum u^2, sum u beta) weighted by how often
the device was drawn: B replicates cost one (B x devices) @ (devices x 5) product.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_BOOTSTRAP = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0


@dataclass(frozen=True)
class FitCI:
    """Percentile intervals at `level` from `bootstrap` replicates (seeded: the same seed, the same
    intervals). u_th's interval is over the replicates with a > 0 (the others have no threshold:
    `degenerate` counts them)."""

    a: tuple[float, float]
    b: tuple[float, float]
    u_th_risk_averse: tuple[float, float] | None
    bootstrap: int
    level: float
    seed: int
    groups: int  # sequences (devices) resampled
    degenerate: int  # replicates whose fit has no threshold (a <= 0 or constant u)
    nonneg_fraction: float | None  # share of replicates (with a threshold) where u_th >= 0

    @property
    def straddles(self) -> bool:
        """The interval of u_th holds both a value < 0 (skip nothing) and one >= 0 (skip u = 0)."""
        return straddles(self.u_th_risk_averse)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["straddles_zero"] = self.straddles
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def straddles(interval, at: float = 0.0) -> bool:
    """True when [lo, hi] holds a value < at and a value >= at: lo < at <= hi."""
    if interval is None:
        return False
    lo, hi = float(interval[0]), float(interval[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"interval: expected finite [lo, hi] with lo <= hi, got {interval!r}")
    return lo < at <= hi


def group_stats(u, beta, groups) -> np.ndarray:
    """Per group (sorted group labels): n, sum u, sum beta, sum u^2, sum u*beta (float64, G x 5)."""
    u = np.asarray(u, np.float64).ravel()
    beta = np.asarray(beta, np.float64).ravel()
    g = np.asarray(groups).ravel()
    if not (u.shape == beta.shape == g.shape):
        raise ValueError(f"u, beta and groups differ in length ({u.size}, {beta.size}, {g.size})")
    if not (np.isfinite(u).all() and np.isfinite(beta).all()):
        raise ValueError("u or beta contains NaN or inf")
    _, idx = np.unique(g, return_inverse=True)
    cols = (np.ones_like(u), u, beta, u * u, u * beta)
    return np.stack([np.bincount(idx, weights=c) for c in cols], axis=1)


def fits_from_stats(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of least squares from summed statistics (rows: n, su, sb, suu, sub); NaN where u is constant."""
    n, su, sb, suu, sub = (s[..., i] for i in range(5))
    with np.errstate(invalid="ignore", divide="ignore"):
        var = suu - su * su / n
        a = (sub - su * sb / n) / var
        a = np.where(var > 1e-12 * np.maximum(1.0, suu), a, np.nan)
        b = (sb - a * su) / n
    return a, b


def _interval(x: np.ndarray, level: float) -> tuple[float, float]:
    q = (1.0 - level) / 2.0
    lo, hi = np.quantile(x, [q, 1.0 - q])
    return float(lo), float(hi)


def bootstrap_fit(
    u, beta, groups, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL
) -> FitCI:
    """Cluster-bootstrap percentile intervals for a, b and u_th = -b/a (module docstring)."""
    if bootstrap < 2:
        raise ValueError(f"bootstrap: expected >= 2 replicates, got {bootstrap}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a value in (0, 1), got {level}")
    stats = group_stats(u, beta, groups)
    G = len(stats)
    if G < 2:
        raise ValueError(f"groups: the bootstrap over sequences needs >= 2 sequences, got {G}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, G, size=(bootstrap, G))
    counts = np.zeros((bootstrap, G))
    np.add.at(counts, (np.arange(bootstrap)[:, None], draws), 1.0)
    a, b = fits_from_stats(counts @ stats)
    ok = np.isfinite(a)
    if ok.sum() < 2:
        raise ValueError("bootstrap: u is constant in almost every replicate; the slope a is undefined")
    has_th = ok & (a > 0)
    u_th = -b[has_th] / a[has_th]
    return FitCI(
        a=_interval(a[ok], level),
        b=_interval(b[ok], level),
        u_th_risk_averse=_interval(u_th, level) if len(u_th) >= 2 else None,
        bootstrap=int(bootstrap),
        level=float(level),
        seed=int(seed),
        groups=int(G),
        degenerate=int(bootstrap - has_th.sum()),
        nonneg_fraction=float((u_th >= 0).mean()) if len(u_th) else None,
    )


def flip_text(ci: dict | None, u_th: float | None, K: int = 20) -> str:
    """The plain-words verdict on whether the risk-averse decision 'skip the u = 0 tokens' is stable."""
    if not ci or ci.get("u_th_risk_averse") is None or u_th is None:
        return "The risk-averse threshold has no confidence interval (no usable fit)."
    lo, hi = ci["u_th_risk_averse"]
    share = ci.get("nonneg_fraction")
    side = "skips every token with u = 0" if u_th >= 0 else "skips nothing (u >= 0 > u_th)"
    if u_th >= 1.0 / K:
        side = f"skips every token with u <= {math.floor(u_th * K)}/{K}"
    head = (
        f"The fitted risk-averse u_th = {u_th:.4f} {side}. Its {100 * ci['level']:.0f}% bootstrap interval over "
        f"{ci['groups']} sequences ({ci['bootstrap']} replicates) is [{lo:.4f}, {hi:.4f}]; "
        f"{100 * share:.0f}% of the replicates have u_th >= 0."
    )
    if straddles((lo, hi)):
        return head + (
            " The interval straddles 0, so the calibration cannot tell whether cu-hlm and u-hlm should "
            "skip the u = 0 tokens or skip nothing: another sample of calibration sequences could flip "
            "the decision. Both sides of the flip are shown below (cu-hlm at fixed u_th = 0 and at "
            "fixed u_th = -1)."
        )
    return head + " The interval does not straddle 0: the sign of the decision is stable at this calibration size."


FLIP_U_TH = (0.0, -1.0)  # the two sides of the flip: skip every u = 0 token / skip nothing (truncation only)


def add_intervals(
    fits: dict, samples, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED, group: str = "device"
) -> dict:
    """fits[name]["ci"] for every estimator with a fit (u_<name> columns of `samples`, grouped by device);
    a fit the bootstrap cannot bound gets ci = {"error": why}. Returns `fits`."""
    for name, f in fits.items():
        if f.get("a") is None or "ci" in f:
            continue
        try:
            f["ci"] = bootstrap_fit(samples[f"u_{name}"], samples["beta"], samples[group], bootstrap, seed).to_dict()
        except ValueError as e:
            f["ci"] = {"error": str(e)}
    return fits


def flip_summary(
    calibration: dict,
    rows: list[dict],
    estimator: str = "temperature",
    K: int = 20,
    used: tuple[float, str] | None = None,
) -> dict:
    """What the report says about the flip: the calibration's fit of `estimator`, its interval, whether it
    straddles 0, and the operating points on both sides (fixed u_th = -1 and 0), cu-hlm (at `used`: the
    u_th the policies ran with and where it came from) and cu-hlm-adaptive's."""
    f = calibration["fits"].get(estimator) or {}
    u_th = f.get("u_th_risk_averse")
    ci = f.get("ci") if f.get("ci") and "error" not in f.get("ci", {}) else None
    keep = (
        "point",
        "label",
        "policy",
        "u_th",
        "risk",
        "estimator",
        "skip_rate",
        "fidelity_tv",
        "pass_at_1",
        "pass_at_1_stderr",
        "throughput_ratio_hlm",
        "vocab_compression",
    )
    pick = lambda r: {k: r.get(k) for k in keep}  # noqa: E731
    by = {r["point"]: r for r in rows}
    sides = [pick(by[f"cu-hlm-uth{v:g}"]) for v in sorted(FLIP_U_TH) if f"cu-hlm-uth{v:g}" in by]
    adaptive = [pick(r) for r in rows if r.get("policy") == "cu-hlm-adaptive"]
    tokens = calibration.get("tokens")
    return {
        "estimator": estimator,
        "u_th": u_th,
        "ci": ci,
        "straddles_zero": bool(ci and ci.get("straddles_zero")),
        "nonneg_fraction": ci and ci.get("nonneg_fraction"),
        "calibration_tokens": tokens,
        "calibration_sequences": calibration.get("devices"),
        "tokens_per_sequence": calibration.get("max_new_tokens"),
        "K": K,
        "text": flip_text(ci, u_th, K),
        "sides": sides,
        "used": None if used is None else {"u_th": used[0], "source": used[1]},
        "fitted": pick(by["cu-hlm"]) if "cu-hlm" in by else None,
        "adaptive": adaptive,
    }


def _where(skip: float | None, sides: list[dict]) -> str:
    """Where an adaptive point's skip rate falls relative to the two sides of the flip."""
    s = {r["u_th"]: r.get("skip_rate") for r in sides}
    none_side, zero_side = s.get(-1.0), s.get(0.0)
    if skip is None or none_side is None or zero_side is None:
        return ""
    if skip <= none_side:
        return "on the skip-nothing side"
    if skip < zero_side:
        return "between the two sides"
    if skip == zero_side:
        return "at the u = 0 side's skip rate"
    return "beyond the u = 0 side (it skips tokens with u > 0 too)"


def _interval_text(ci: dict | None, key: str, kind: str = "3") -> str:
    from testbed.report import format_value

    v = (ci or {}).get(key)
    return "n/a" if not v else f"[{format_value(v[0], kind)}, {format_value(v[1], kind)}]"


def _intervals_table(fits: dict) -> str:
    """Every estimator's fit with its intervals and whether u_th's straddles 0."""
    from testbed.report import format_value, html_table

    rows = []
    for name, f in fits.items():
        ci = f.get("ci") if f.get("ci") and "error" not in f["ci"] else None
        rows.append(
            [
                name,
                format_value(f.get("a"), "3", missing="n/a"),
                _interval_text(ci, "a"),
                format_value(f.get("b"), "3", missing="n/a"),
                _interval_text(ci, "b"),
                format_value(f.get("u_th_risk_averse"), "3", missing="n/a"),
                _interval_text(ci, "u_th_risk_averse"),
                "n/a" if not ci else ("yes" if ci.get("straddles_zero") else "no"),
                "n/a" if not ci or ci.get("nonneg_fraction") is None else f"{100 * ci['nonneg_fraction']:.1f}%",
                "n/a" if not ci else f"{ci['bootstrap']} x {ci['groups']} seq.",
            ]
        )
    return html_table(
        [
            "estimator",
            "a",
            "95% CI",
            "b",
            "95% CI",
            "u_th = -b/a",
            "95% CI",
            "straddles 0",
            "replicates u_th >= 0",
            "bootstrap",
        ],
        rows,
    )


def _sides_section(flip: dict) -> list[str]:
    """Both sides of the flip, the fitted cu-hlm and cu-hlm-adaptive (which needs no fit), side by side."""
    import html as H

    from testbed.report import format_value, html_table

    show = [*flip["sides"], *([flip["fitted"]] if flip.get("fitted") else []), *flip["adaptive"]]
    if not show:
        return []
    parts = [
        "<p>Both sides of the flip (cu-hlm at fixed u_th = -1: truncation only, nothing skipped; at "
        "fixed u_th = 0: every u = 0 token skipped; run in every study, so the flip is visible whatever "
        "the fit), the fitted cu-hlm, and cu-hlm-adaptive, which needs no fit: it learns from its own "
        "verdicts which u it can skip within a risk budget.</p>",
        html_table(
            ["point", "u_th", "skip", "fidelity (TV/token)", "pass@1", "ratio to HLM", "where"],
            [
                [
                    r["label"],
                    format_value(r.get("u_th"), "3", missing="-"),
                    format_value(r.get("skip_rate"), "pct", missing="n/a"),
                    format_value(r.get("fidelity_tv"), "e", missing="n/a"),
                    format_value(r.get("pass_at_1"), "3", missing="n/a"),
                    format_value(r.get("throughput_ratio_hlm"), "x", missing="n/a"),
                    _where(r.get("skip_rate"), flip["sides"]) if r.get("policy") == "cu-hlm-adaptive" else "",
                ]
                for r in show
            ],
        ),
    ]
    for r in flip["adaptive"]:
        parts.append(
            f"<p class='muted'>{H.escape(r['label'])} reaches skip "
            f"{format_value(r.get('skip_rate'), 'pct', missing='n/a')} at fidelity "
            f"{format_value(r.get('fidelity_tv'), 'e', missing='n/a')} without any fit: "
            f"{H.escape(_where(r.get('skip_rate'), flip['sides']) or 'n/a')}.</p>"
        )
    return parts


def html_section(flip: dict, fits: dict) -> list[str]:
    """The report's section on the calibration's uncertainty and the flip."""
    import html as H

    parts = ["<h2>How sure the calibration is</h2>", f"<p>{H.escape(flip['text'])}</p>"]
    used = flip.get("used")
    if used and not str(used["source"]).startswith("calibration"):
        parts.append(
            f"<p>The policies did not use this fit: u_th = {used['u_th']:.4f} from {H.escape(str(used['source']))}.</p>"
        )
    share = flip.get("nonneg_fraction")
    n, seqs, per = flip.get("calibration_tokens"), flip.get("calibration_sequences"), flip.get("tokens_per_sequence")
    stable = share is not None and not flip["straddles_zero"]
    parts.append(
        f"<p>Calibration size: {n} tokens ({seqs} sequences x {per} tokens; raise it with "
        f"<code>testbed reproduce paper --calibration-tokens N</code>, N per sequence). The sign of the "
        f"risk-averse decision is {'stable' if stable else '<b>not stable</b>'} at this size: "
        f"{'n/a' if share is None else f'{100 * share:.1f}%'} of the bootstrap replicates give u_th >= 0 "
        f"(skip the u = 0 tokens), the rest u_th < 0 (skip nothing).</p>"
    )
    return [*parts, _intervals_table(fits), *_sides_section(flip)]
