"""What a run report reads: a run directory's tokens.parquet, summary.json and scenario.yaml
(testbed/results.py), and the few tables only the tokens hold.

Every figure summary.json holds (testbed.results.summarize, definitions in its module docstring)
is read from it, never computed again. What only the tokens give is derived here, once per run:
the LLM agreement, the fit beta ~ a*u + b (docs/design.md section 1, step 3), each device's tier
and each tier's label. A run without summary.json, or with one from before a figure existed, gets
the missing figures from its tokens (testbed.figures, the functions summarize calls); vocabulary
compression then needs summary.json's vocab_size.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from policies.rejection import RejectionFit
from testbed import figures as F


@dataclass
class Run:
    """One run directory, as the report sees it."""

    path: Path
    tokens: pd.DataFrame  # testbed.results.REPORT_COLUMNS
    summary: dict  # summary.json, with the figures it lacks filled in from the tokens
    scenario_text: str
    label: str = ""
    tiers: list[str] = field(default_factory=list)  # in order of first appearance
    # derived once from the tokens (summary.json does not hold them)
    device_tier: pd.Series = field(default_factory=lambda: pd.Series(dtype=str))  # device id -> tier, sorted
    tier_labels: dict[str, str] = field(default_factory=dict)  # tier -> "tier (policies)"
    llm_agreement: float | None = None
    fit: RejectionFit | None = None

    @property
    def policies(self) -> list[str]:
        return list(dict.fromkeys(self.tokens["policy"].astype(str)))

    @property
    def emulated_seconds(self) -> float:
        return emulated_seconds(self.summary, self.tokens)

    @property
    def device_throughput(self) -> pd.Series:
        """summary.json's tokens / emulated second of each device over its own span (index: device
        id, sorted; NaN where undefined)."""
        per_dev = self.summary["throughput_tokens_per_s"]["devices"]
        values = {int(d): math.nan if x is None else float(x) for d, x in per_dev.items()}
        return pd.Series(values, dtype=float).sort_index()


def emulated_seconds(summary: dict, tokens: pd.DataFrame) -> float:
    """summary.json's emulated time, else the last commit."""
    e = summary.get("emulated_seconds")
    if e:
        return float(e)
    return float(tokens["t_commit"].max()) if len(tokens) else 0.0


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories; a directory without summary.json whose subdirectories are runs (a sweep)
    stands for those subdirectories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file() or (p / "tokens.parquet").is_file():
            out.append(p)
            continue
        subs = sorted(q for q in p.iterdir() if q.is_dir() and (q / "summary.json").is_file()) if p.is_dir() else []
        if not subs:
            raise FileNotFoundError(f"{p}: not a run directory (no summary.json / tokens.parquet, no runs inside)")
        out.extend(subs)
    return out


def read_tokens(path: Path) -> pd.DataFrame:
    """The columns of tokens.parquet that the report reads."""
    import pyarrow.parquet as pq

    from testbed.results import REPORT_COLUMNS
    from testbed.results import read_tokens as read_columns

    # Only the columns the figures read: a 10,000-device run's every column would not fit the driver's
    # memory budget (issue 9: driver under 1 GB). Files from before a column existed are read whole.
    have = set(pq.read_schema(path).names)
    return read_columns(path, REPORT_COLUMNS) if have >= set(REPORT_COLUMNS) else pd.read_parquet(path)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    tokens_path = path / "tokens.parquet"
    if not tokens_path.is_file():
        raise FileNotFoundError(f"{tokens_path} missing")
    tokens = read_tokens(tokens_path)
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    scen = path / "scenario.yaml"
    text = scen.read_text(encoding="utf-8") if scen.is_file() else ""
    tiers = list(dict.fromkeys(tokens["tier"].astype(str)))
    return Run(
        path,
        tokens,
        fill_summary(summary, tokens),
        text,
        tiers=tiers,
        device_tier=tokens.groupby("device", sort=True)["tier"].first().astype(str),
        tier_labels={t: tier_label(tokens, t) for t in tiers},
        llm_agreement=F.num(F.llm_agreement(tokens)),
        fit=F.beta_fit(tokens),
    )


def tier_label(tokens: pd.DataFrame, tier: str) -> str:
    """The tier and its policies, as plots label it."""
    pol = tokens.loc[tokens["tier"] == tier, "policy"].astype(str).unique()
    return f"{tier} ({', '.join(pol)})"


def label_runs(runs: list[Run]) -> None:
    """Each run's label: its policies (its name when it has none), made unique by its folder."""
    for r in runs:
        name = r.summary.get("scenario") or r.summary.get("name") or r.path.name
        r.label = "+".join(r.policies) or str(name)
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"


# ---------------------------------------------------------------------------------------------
# summary.json, and the figures it lacks
# ---------------------------------------------------------------------------------------------
# The summary.json entries the report reads (key paths).
SUMMARY_KEYS: tuple[tuple[str, ...], ...] = (
    ("tokens",),
    ("devices",),
    ("skip_rate",),
    ("acceptance_rate",),
    ("vocab_compression",),
    ("uplink_bytes",),
    ("uplink_bytes_per_token",),
    ("token_latency_s",),
    ("jain_fairness",),
    ("fidelity_tv_mean",),
    ("fidelity_tv_sequence_mean",),
    ("fidelity_tv_branch_mean",),
    ("fidelity_approximate_tokens",),
    ("throughput_tokens_per_s", "system"),
    ("throughput_tokens_per_s", "tiers"),
    ("throughput_tokens_per_s", "devices"),
)


def _has(d: dict, keys: tuple[str, ...]) -> bool:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return False
        d = d[k]
    return True


def fill_summary(summary: dict, tokens: pd.DataFrame) -> dict:
    """summary.json with every entry the report reads: those it lacks (no summary.json, or one from
    before the figure existed) computed from the tokens; a complete summary is returned as read."""
    missing = [keys for keys in SUMMARY_KEYS if not _has(summary, keys)]
    if not missing:
        return summary
    derived = summary_from_tokens(tokens, emulated_seconds(summary, tokens), summary.get("vocab_size"))
    out = copy.deepcopy(summary)
    for keys in missing:
        *parents, last = keys
        src, dst = derived, out
        for k in parents:
            src = src[k]
            if not isinstance(dst.get(k), dict):
                dst[k] = {}
            dst = dst[k]
        dst[last] = src[last]
    return out


def summary_from_tokens(df: pd.DataFrame, emulated_seconds: float, vocab_size: int | None) -> dict:
    """The whole-run figures of summary.json (testbed.results.summarize) that the tokens determine,
    with the same functions (testbed.figures); emulated_seconds 1 where unknown."""
    emu = emulated_seconds or 1.0
    per_dev = F.device_throughput(df, emu) if len(df) else pd.Series(dtype=float)
    return {
        **F.token_figures(df, vocab_size),
        "devices": int(df["device"].nunique()) if len(df) else 0,
        "throughput_tokens_per_s": {
            "system": F.num(F.ratio(len(df), emulated_seconds)),
            "tiers": {str(t): F.num(F.span_throughput(d, emulated_seconds)) for t, d in df.groupby("tier", sort=False)},
            "devices": {str(d): F.num(x) for d, x in per_dev.items()},
        },
        "jain_fairness": F.num(F.jain(per_dev.to_numpy())),
    }


def run_figures(run: Run) -> dict[str, Any]:
    """The figures the report shows for one run: summary.json's, and the LLM agreement."""
    s = run.summary
    lat = s["token_latency_s"]
    return {
        "tokens": s["tokens"],
        "emulated_seconds": run.emulated_seconds,
        "wall_seconds": s.get("wall_seconds"),
        "throughput": s["throughput_tokens_per_s"]["system"],
        "skip_rate": s["skip_rate"],
        "acceptance_rate": s["acceptance_rate"],
        "llm_agreement": run.llm_agreement,
        "vocab_compression": s["vocab_compression"],
        "uplink_bytes": s["uplink_bytes"],
        "uplink_bytes_per_token": s["uplink_bytes_per_token"],
        "latency_p50": lat.get("p50"),
        "latency_p95": lat.get("p95"),
        "latency_p99": lat.get("p99"),
        "jain_fairness": s["jain_fairness"],
        "verifier_batch_size_mean": s.get("verifier_batch_size_mean"),
        "devices": s["devices"],
        "fidelity_tv_mean": s["fidelity_tv_mean"],
        "fidelity_tv_sequence_mean": s["fidelity_tv_sequence_mean"],
        "fidelity_tv_branch_mean": s["fidelity_tv_branch_mean"],
        "fidelity_approximate_tokens": s["fidelity_approximate_tokens"],
    }
