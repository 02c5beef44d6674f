"""Task accuracy of a finished run: HumanEval pass@1 from the problems' own unit tests.

`score_run(run_dir)` rebuilds every device's completion from tokens.parquet, runs
``prompt + completion + "\\n" + test + "\\ncheck(<entry_point>)\\n"`` for each, and writes
accuracy.parquet (one row per device) plus an ``accuracy`` block in summary.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.accuracy.completion import STOP_SEQUENCES, check_program, completion_text, end_token_ids
from testbed.accuracy.sandbox import DEFAULT_TIMEOUT_S, PASSED, TIMED_OUT, run_programs
from testbed.accuracy.statistics import agreement, paired, pass_stats, relative, unbiased_pass

ACCURACY_VERSION = 2  # 2: unbiased (per problem) and paired statistics
ACCURACY_FILE = "accuracy.parquet"


class AccuracyError(ValueError):
    """A run that cannot be scored (not HumanEval, missing files, mismatched reference)."""


@dataclass
class AccuracyResult:
    """What score_run measured: per-device rows (as accuracy.parquet) and the summary block."""

    run_dir: Path
    rows: pd.DataFrame
    block: dict[str, Any]
    reference: AccuracyResult | None = field(default=None, repr=False)

    @property
    def pass_at_1(self) -> float | None:
        return self.block["pass_at_1"]

    @property
    def stderr(self) -> float | None:
        return self.block["stderr"]

    @property
    def relative(self) -> float | None:
        return self.block.get("pass_at_1_relative")


ROW_COLUMNS = (
    "device",
    "tier",
    "policy",
    "prompt_index",
    "task_id",
    "passed",
    "result",
    "completion_chars",
    "n_tokens",
    "completion",
)


def _load_run(run_dir: Path):
    from testbed.scenario import ScenarioError, load_scenario

    for name in ("tokens.parquet", "scenario.yaml"):
        if not (run_dir / name).is_file():
            raise AccuracyError(f"{run_dir}: not a finished run directory ({name} missing)")
    try:
        s = load_scenario(run_dir / "scenario.yaml")
    except (ScenarioError, OSError) as e:
        raise AccuracyError(f"{run_dir}: cannot read scenario.yaml: {e}") from None
    if s.prompts.source != "humaneval":
        what = f"file {s.prompts.file}" if s.prompts.source == "file" else f"{len(s.prompts.texts or [])} inline texts"
        raise AccuracyError(
            f"{run_dir}: accuracy needs HumanEval prompts (their unit tests), but this run's "
            f"prompts source is {s.prompts.source!r} ({what}); only runs with "
            f"prompts.source: humaneval can be scored"
        )
    return s


def _problems(s) -> list[dict]:
    from testbed.prompts import humaneval_problems

    problems = list(humaneval_problems())
    stop = len(problems) if s.prompts.count is None else s.prompts.offset + s.prompts.count
    return problems[s.prompts.offset : stop]


def _prompt_desc(s) -> str:
    stop = "" if s.prompts.count is None else s.prompts.offset + s.prompts.count
    return f"humaneval[{s.prompts.offset}:{stop}]"


def _device_table(run_dir: Path, s, problems: list[dict]) -> pd.DataFrame:
    """One row per device of the scenario: device, tier, policy, prompt_index, task_id, n_tokens, completion.
    Devices with no rows in tokens.parquet (a run cut short) get an empty completion."""
    from agents.models import load_tokenizer
    from testbed.prompts import prompt_index
    from testbed.results import read_tokens
    from testbed.scenario import devices, policy_name

    tokens = read_tokens(run_dir / "tokens.parquet")
    tokenizer = load_tokenizer(s.models.slm)
    ends = end_token_ids(tokenizer)
    tier_policy = dict(zip(tokens["tier"].astype(str), tokens["policy"].astype(str)))
    by_device = {int(d): g.sort_values("token_index", kind="stable") for d, g in tokens.groupby("device", sort=True)}
    rows = []
    specs = {d.device_id: d for d in devices(s)}
    for dev in sorted(set(specs) | set(by_device)):
        g = by_device.get(dev)
        if g is not None:
            tier, policy, pi = str(g["tier"].iloc[0]), str(g["policy"].iloc[0]), int(g["prompt_index"].iloc[0])
            ids = g["token_id"].tolist()
        else:
            spec = specs[dev]
            tier, pi, ids = spec.tier, prompt_index(dev, len(problems)), []
            policy = tier_policy.get(tier, policy_name(spec.policy_spec))
        if not 0 <= pi < len(problems):
            raise AccuracyError(
                f"{run_dir}: device {dev} has prompt_index {pi}, but the run has "
                f"{len(problems)} prompts ({_prompt_desc(s)})"
            )
        rows.append(
            {
                "device": dev,
                "tier": tier,
                "policy": policy,
                "prompt_index": pi,
                "task_id": problems[pi]["task_id"],
                "n_tokens": len(ids),
                "completion": completion_text(ids, tokenizer, end_ids=ends),
            }
        )
    return pd.DataFrame(rows)


def _block(rows: pd.DataFrame, s, timeout_s: float) -> dict[str, Any]:
    def by(col: str) -> dict[str, Any]:
        return {str(k): pass_stats(g["passed"]) for k, g in rows.groupby(col, sort=False)}

    counts = {PASSED: 0, "failed": 0, TIMED_OUT: 0}
    for r in rows["result"]:
        key = r if r in (PASSED, TIMED_OUT) else "failed"
        counts[key] += 1
    return {
        "version": ACCURACY_VERSION,
        "metric": "pass@1",
        "prompts": _prompt_desc(s),
        "n_prompts": int(rows["task_id"].nunique()) if len(rows) else 0,
        **pass_stats(rows["passed"]),
        "unbiased": unbiased_pass(rows),
        "tiers": by("tier"),
        "policies": by("policy"),
        "results": counts,
        "timeout_s": float(timeout_s),
        "stop_sequences": list(STOP_SEQUENCES),
    }


def _write_rows(rows: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("device", pa.int32()),
            ("tier", pa.string()),
            ("policy", pa.string()),
            ("prompt_index", pa.int32()),
            ("task_id", pa.string()),
            ("passed", pa.bool_()),
            ("result", pa.string()),
            ("completion_chars", pa.int32()),
            ("n_tokens", pa.int32()),
            ("completion", pa.string()),
        ],
        metadata={"hlm_testbed.accuracy": str(ACCURACY_VERSION)},
    )
    table = pa.Table.from_pydict({c: rows[c].tolist() for c in ROW_COLUMNS}, schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_accuracy(run_dir: str | Path) -> pd.DataFrame:
    """The per-device table score_run wrote (accuracy.parquet)."""
    return pd.read_parquet(Path(run_dir) / ACCURACY_FILE)


def _merge_summary(run_dir: Path, block: dict[str, Any]) -> None:
    from testbed.results import write_summary

    path = run_dir / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    summary["accuracy"] = block
    tmp = path.with_name(path.name + ".tmp")
    write_summary(summary, tmp)
    os.replace(tmp, path)


def _cached(run_dir: Path, timeout_s: float) -> AccuracyResult | None:
    """A reference's earlier score, if it is up to date (same version and timeout, newer than its tokens)."""
    acc, tokens, summary = run_dir / ACCURACY_FILE, run_dir / "tokens.parquet", run_dir / "summary.json"
    try:
        if acc.stat().st_mtime < tokens.stat().st_mtime:
            return None
        block = json.loads(summary.read_text(encoding="utf-8")).get("accuracy")
        if not block or block.get("version") != ACCURACY_VERSION or block.get("timeout_s") != float(timeout_s):
            return None
        rows = read_accuracy(run_dir)
    except (OSError, ValueError):
        return None
    if len(rows) != block.get("n"):
        return None
    block = {
        k: v
        for k, v in block.items()
        if k not in ("reference", "pass_at_1_relative", "pass_at_1_relative_stderr", "agreement", "paired")
    }
    return AccuracyResult(run_dir, rows, block)


def score_run(
    run_dir: str | Path,
    *,
    reference: str | Path | None = None,
    workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: Callable[[int, int, float], None] | bool = True,
    write: bool = True,
) -> AccuracyResult:
    """Score a finished HumanEval run: execute every device's completion against its problem's tests.

    Writes RUN_DIR/accuracy.parquet and merges an `accuracy` block into RUN_DIR/summary.json
    (other keys kept) unless write=False. With `reference` (a run dir, normally `llm-only` on
    the same prompts and seed) also adds pass_at_1_relative (+ stderr), the paired per-prompt
    agreement and the paired comparison (`paired`); the reference is scored too (and its files
    written) unless it already holds an up-to-date score. Raises AccuracyError for a run that is not HumanEval,
    a missing file, or a reference on other prompts.
    """
    run_dir = Path(run_dir)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    s = _load_run(run_dir)
    problems = _problems(s)
    ref_dir = Path(reference) if reference is not None else None
    if ref_dir is not None:  # check before the (long) scoring
        rs = _load_run(ref_dir)
        if [p["task_id"] for p in _problems(rs)] != [p["task_id"] for p in problems]:
            raise AccuracyError(
                f"reference {ref_dir} has other prompts than {run_dir}: "
                f"{_prompt_desc(rs)} vs {_prompt_desc(s)}; score against an llm-only run on the "
                f"same prompts"
            )
    rows = _device_table(run_dir, s, problems)
    programs = [check_program(problems[pi], c) for pi, c in zip(rows["prompt_index"], rows["completion"])]
    results = run_programs(programs, workers=workers, timeout_s=timeout_s, progress=progress)
    rows["result"] = results
    rows["passed"] = [r == PASSED for r in results]
    rows["completion_chars"] = rows["completion"].str.len().astype(int)
    rows = rows[list(ROW_COLUMNS)]
    block = _block(rows, s, timeout_s)
    if write:
        _write_rows(rows, run_dir / ACCURACY_FILE)
    ref = None
    if ref_dir is not None:
        if ref_dir.resolve() == run_dir.resolve():
            ref = AccuracyResult(run_dir, rows, dict(block))
        else:
            ref = _cached(ref_dir, timeout_s) or score_run(
                ref_dir, workers=workers, timeout_s=timeout_s, progress=progress, write=write
            )
        rel, rel_se = relative(block["pass_at_1"], block["stderr"], ref.block["pass_at_1"], ref.block["stderr"])
        warnings = []
        if rs.seed != s.seed:
            warnings.append(f"seeds differ: run {s.seed}, reference {rs.seed}")
        ref_policies = sorted(ref.block["policies"])
        if ref_policies != ["llm-only"]:
            warnings.append(f"reference policies are {', '.join(ref_policies)}, not llm-only")
        block["reference"] = {
            "run_dir": str(ref_dir),
            "n": ref.block["n"],
            "passed": ref.block["passed"],
            "pass_at_1": ref.block["pass_at_1"],
            "stderr": ref.block["stderr"],
            "policies": ref_policies,
            "seed": rs.seed,
            "warnings": warnings,
        }
        block["pass_at_1_relative"] = rel
        block["pass_at_1_relative_stderr"] = rel_se
        block["agreement"] = agreement(rows, ref.rows)
        block["paired"] = paired(rows, ref.rows)
    if write:
        _merge_summary(run_dir, block)
    return AccuracyResult(run_dir, rows, block, ref)
