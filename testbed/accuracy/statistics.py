"""Statistics of pass rates: per device, unbiased pass@k per problem, paired comparisons.

Statistics (`pass_stats`, `unbiased_pass`, `paired`):
- pass_at_1 / stderr: passed / n over devices, sqrt(p (1 - p) / n), overall, per tier and per
  policy (every device an independent sample).
- unbiased: the unbiased pass@k of Chen et al. 2021 (Codex paper), per problem from its n
  samples of which c passed, 1 - C(n - c, k) / C(n, k) (c / n for k = 1), averaged over problems;
  stderr = sd over problems (ddof 1) / sqrt(problems). A study gives each problem n samples by
  running problems x n devices (device i decodes problem i mod problems, testbed.prompts
  prompt_index); every device has its own keyed randomness (seed, device, token), so the n
  samples of a problem are independent draws. With equal n per problem, unbiased pass@1 =
  pass_at_1.
- relative: against a reference run (`llm-only` on the same prompts and seed), r = p / q with
  the delta-method standard error of two independent runs, sqrt((se_p / q)^2 + (p se_q / q^2)^2);
  None when q = 0.
- paired (the comparison that can tell policies apart): the two runs are scored on the same
  problems with the same seeds (device i of each decodes the same prompt), so per problem
  d_i = r_i - q_i, the run's minus the reference's per-problem pass rate (c / n of its samples).
  diff = mean d_i (the difference of the unbiased pass@1s), stderr = sd(d, ddof 1) /
  sqrt(problems), ci95 = diff +- t(0.975, problems - 1) stderr (paired t). The exact test:
  b = problems with d_i > 0, c = problems with d_i < 0 (ties dropped), two-sided binomial
  test of b against Binomial(b + c, 1/2), p = min(1, 2 P(X <= min(b, c))). With one sample per
  problem in both runs that is McNemar's exact test on the discordant pairs (test =
  "mcnemar-exact"); with several it is the sign test on the per-problem differences
  (test = "sign-test"); the key is `mcnemar_p` either way. distinguishable_95 = p < 0.05 (the
  exact test decides; the t interval is shown beside it and can disagree near the edge).
- agreement: paired per-prompt agreement, a_p = r_p q_p + (1 - r_p)(1 - q_p) with r_p, q_p
  the fraction of that prompt's devices that passed in the run and in the reference (the
  chance that a random device of each agrees); `agreement` is the mean over prompts, so with
  one device per prompt it is the fraction of prompts where both pass or both fail.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd


def pass_stats(passed: Iterable[bool]) -> dict[str, Any]:
    """{n, passed, pass_at_1, stderr}: stderr = sqrt(p (1 - p) / n); None when n = 0."""
    xs = [bool(x) for x in passed]
    n, k = len(xs), sum(xs)
    if n == 0:
        return {"n": 0, "passed": 0, "pass_at_1": None, "stderr": None}
    p = k / n
    return {"n": n, "passed": k, "pass_at_1": p, "stderr": math.sqrt(p * (1 - p) / n)}


def relative(
    p: float | None, se_p: float | None, q: float | None, se_q: float | None
) -> tuple[float | None, float | None]:
    """r = p / q and its delta-method standard error, p and q independent (None when q = 0)."""
    if p is None or q is None or q == 0 or se_p is None or se_q is None:
        return None, None
    r = p / q
    return r, math.sqrt((se_p / q) ** 2 + (p * se_q / q**2) ** 2)


def _count(x: float) -> float | int:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def pass_at_k(n: int, c: int, k: int = 1) -> float:
    """Chen et al. 2021's unbiased pass@k of one problem from n samples, c of them passing:
    1 - C(n - c, k) / C(n, k) (as a product, stable for large n); c / n for k = 1."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def problem_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Per problem (task_id, in order of first appearance): n samples and c of them passed."""
    g = rows.groupby("task_id", sort=False)["passed"]
    return pd.DataFrame({"n": g.size(), "c": g.sum().astype(int)})


def _mean_se(x: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error sd(ddof 1) / sqrt(n); se None for fewer than 2 values."""
    n = len(x)
    if n == 0:
        return None, None
    m = math.fsum(x) / n
    if n < 2:
        return m, None
    var = math.fsum((v - m) ** 2 for v in x) / (n - 1)
    return m, math.sqrt(var / n)


PASS_AT_K = (1, 2, 5, 10)


def unbiased_pass(rows: pd.DataFrame) -> dict[str, Any]:
    """{n_problems, samples_per_problem: [min, max], pass_at_1, stderr, pass_at_k}: the unbiased
    estimator per problem averaged over problems, stderr over problems (module docstring); pass_at_k
    for each k of PASS_AT_K that every problem has samples for."""
    if len(rows) == 0:
        return {"n_problems": 0, "samples_per_problem": [0, 0], "pass_at_1": None, "stderr": None, "pass_at_k": {}}
    pc = problem_counts(rows)
    per = [pass_at_k(int(n), int(c), 1) for n, c in zip(pc["n"], pc["c"])]
    mean, se = _mean_se(per)
    lo = int(pc["n"].min())
    at_k = {
        str(k): math.fsum(pass_at_k(int(n), int(c), k) for n, c in zip(pc["n"], pc["c"])) / len(pc)
        for k in PASS_AT_K
        if k <= lo
    }
    return {
        "n_problems": int(len(pc)),
        "samples_per_problem": [lo, int(pc["n"].max())],
        "pass_at_1": mean,
        "stderr": se,
        "pass_at_k": at_k,
    }


def binomial_two_sided_p(b: int, c: int) -> float:
    """Exact two-sided p of b successes against c failures under Binomial(b + c, 1/2) (McNemar's exact
    test on discordant pairs b, c; the sign test): min(1, 2 P(X <= min(b, c))); 1 when b + c = 0."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))  # exact integers, then one division
    return min(1.0, 2 * tail / 2**n)


def _t_cdf(t: float, df: int) -> float:
    """Student t CDF by Simpson's rule on its density (error < 1e-9 for the quantiles used here)."""
    if t < 0:
        return 1.0 - _t_cdf(-t, df)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    m = 2000
    h = t / m
    s = f(0.0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, m))
    return 0.5 + s * h / 3


@functools.lru_cache(maxsize=256)
def t_quantile(q: float, df: int) -> float:
    """The q quantile (0.5 < q < 1) of Student's t with df degrees of freedom (bisection on _t_cdf)."""
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df >= 1, got q={q}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def paired(run: pd.DataFrame, ref: pd.DataFrame, level: float = 0.95) -> dict[str, Any]:
    """The run against the reference on the problems both scored (per-device tables with task_id, passed):
    paired difference of per-problem pass rates with its standard error and t interval, and the exact
    McNemar / sign test on the problems where they differ (module docstring)."""
    r, q = problem_counts(run), problem_counts(ref)
    common = [t for t in r.index if t in q.index]
    if not common:
        return {
            "n_problems": 0,
            "diff": None,
            "stderr": None,
            "ci95": None,
            "test": None,
            "mcnemar_p": None,
            "discordant": [0, 0],
            "distinguishable_95": False,
        }
    rp = (r.loc[common, "c"] / r.loc[common, "n"]).to_numpy(float)
    qp = (q.loc[common, "c"] / q.loc[common, "n"]).to_numpy(float)
    d = (rp - qp).tolist()
    diff, se = _mean_se(d)
    ci = None
    if se is not None:
        half = t_quantile(0.5 + level / 2, len(d) - 1) * se
        ci = [diff - half, diff + half]
    b, c = sum(x > 0 for x in d), sum(x < 0 for x in d)
    single = bool((r.loc[common, "n"] == 1).all() and (q.loc[common, "n"] == 1).all())
    p = binomial_two_sided_p(b, c)
    return {
        "n_problems": len(common),
        "diff": diff,
        "stderr": se,
        "ci95": ci,
        "test": "mcnemar-exact" if single else "sign-test",
        "mcnemar_p": p,
        "discordant": [int(b), int(c)],
        "distinguishable_95": bool(p < 1 - level),
    }


def agreement(run: pd.DataFrame, ref: pd.DataFrame) -> dict[str, Any]:
    """Paired per-prompt agreement of two per-device tables (task_id, passed); module docstring."""
    r = run.groupby("task_id", sort=False)["passed"].mean()
    q = ref.groupby("task_id", sort=False)["passed"].mean()
    common = [t for t in r.index if t in q.index]
    if not common:
        return {
            "n_prompts": 0,
            "agreement": None,
            "both_passed": 0,
            "only_run_passed": 0,
            "only_reference_passed": 0,
            "neither_passed": 0,
        }
    rp, qp = r[common].astype(float), q[common].astype(float)
    both = float((rp * qp).sum())
    only_run = float((rp * (1 - qp)).sum())
    only_ref = float(((1 - rp) * qp).sum())
    neither = float(((1 - rp) * (1 - qp)).sum())
    return {
        "n_prompts": len(common),
        "agreement": (both + neither) / len(common),
        "both_passed": _count(both),
        "only_run_passed": _count(only_run),
        "only_reference_passed": _count(only_ref),
        "neither_passed": _count(neither),
    }
