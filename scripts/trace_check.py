"""The identical-trace check: run the reference scenarios and fingerprint every column of their
tokens.parquet, or compare two such captures bit for bit.

    python scripts/trace_check.py capture DIR [--only smoke,kill]   # under ../shared/bin/offline
    python scripts/trace_check.py compare BEFORE AFTER

A refactor that must not change behaviour captures before and after (same seed, same machine)
and compares: every run's frame must be equal with check_exact, column by column.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import pandas as pd

TOKENS = 24  # the kill run: tests/testbed/test_recovery.py's smoke at 24 tokens a device
KILLS = (("group:0", 24), ("group:1", 24), ("verifier", 140))


def _runs():
    from testbed.scenario import load_scenario, override

    def kill_opts():
        # Fault injection lives with the tests (tests/testbed/chaos.py); before the pipeline refactor
        # it was RunOptions.chaos_kill.
        try:
            from testbed.run import RunOptions  # noqa: F401
        except ImportError:
            return {"chaos_kill": KILLS}
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "testbed"))
        from chaos import Chaos, chaos_driver

        return {"driver": chaos_driver(Chaos(kill=KILLS))}

    return {
        "smoke": (lambda: load_scenario("smoke"), {}),
        "smoke-local": (lambda: load_scenario("smoke"), {"engine": "local"}),
        "kill": (lambda: override(load_scenario("smoke"), {"generation.max_new_tokens": TOKENS}), "kill"),
        "fleet-tiny": (lambda: load_scenario("fleet-tiny"), {}),
        "default": (lambda: load_scenario("default"), {}),
    }, kill_opts


def fingerprint(df: pd.DataFrame) -> dict[str, str]:
    return {
        c: hashlib.sha256(pd.util.hash_pandas_object(df[c], index=True).values.tobytes()).hexdigest()[:16]
        for c in df.columns
    }


def capture(out: Path, only: list[str] | None) -> None:
    try:
        from testbed.run import RunOptions, run_scenario
    except ImportError:
        from testbed.run import RunOptions, run_scenario
    runs, kill_opts = _runs()
    out.mkdir(parents=True, exist_ok=True)
    for name, (make, opts) in runs.items():
        if only and name not in only:
            continue
        opts = kill_opts() if opts == "kill" else opts
        t0 = time.perf_counter()
        run_scenario(make(), RunOptions(out_dir=out / name, progress=False, report=False, accuracy=False, **opts))
        df = pd.read_parquet(out / name / "tokens.parquet")
        (out / f"{name}.json").write_text(json.dumps(fingerprint(df), indent=1))
        print(f"{name}: {len(df)} tokens, {len(df.columns)} columns, {time.perf_counter() - t0:.0f} s", flush=True)


def compare(before: Path, after: Path, only: list[str] | None = None) -> int:
    bad = 0
    for fp in sorted(before.glob("*.json")):
        name = fp.stem
        if only and name not in only:
            continue
        a, b = before / name / "tokens.parquet", after / name / "tokens.parquet"
        if not b.exists():
            print(f"{name}: MISSING in {after}")
            bad += 1
            continue
        x, y = pd.read_parquet(a), pd.read_parquet(b)
        try:
            assert list(x.columns) == list(y.columns), f"columns {list(x.columns)} != {list(y.columns)}"
            pd.testing.assert_frame_equal(x, y, check_exact=True)
        except AssertionError as e:
            bad += 1
            fa, fb = fingerprint(x), fingerprint(y)
            diff = [c for c in fa if fa.get(c) != fb.get(c)]
            print(f"{name}: DIFFERS ({len(x)} vs {len(y)} rows; columns {diff}): {str(e)[:300]}")
            continue
        print(f"{name}: identical ({len(x)} rows x {len(x.columns)} columns, every column bit-equal)")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("dir", type=Path)
    c.add_argument("--only", default="")
    m = sub.add_parser("compare")
    m.add_argument("before", type=Path)
    m.add_argument("after", type=Path)
    m.add_argument("--only", default="")
    a = ap.parse_args()
    only = [s for s in a.only.split(",") if s] or None
    if a.cmd == "capture":
        capture(a.dir, only)
    else:
        sys.exit(1 if compare(a.before, a.after, only) else 0)


if __name__ == "__main__":
    main()
