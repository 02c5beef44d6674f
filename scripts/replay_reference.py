"""Capture (or compare against) a replay's outputs: tokens.parquet, the collector's exposition, a digest
of the events. The proof that a speed-up of the replay changes no output (issue 17, part "scale").

    python scripts/replay_reference.py CONTENT.pkl DIR            # capture into DIR
    python scripts/replay_reference.py CONTENT.pkl DIR --compare  # replay again, compare with DIR
"""

import argparse
import hashlib
import pickle
import tempfile
from pathlib import Path

import pandas as pd

from agents.engine import replay_content
from policies import load_policy
from testbed.metrics import Collector
from testbed.results import ResultsWriter, read_tokens


def exposition_lines(collector: Collector) -> list[str]:
    """The exposition, sorted, without the wall-clock gauges (they differ every run)."""
    lines = collector.exposition().decode().splitlines()
    return sorted(line for line in lines if "wall" not in line and "created" not in line)


def replay(path: str, out: Path) -> tuple[list[str], str]:
    with open(path, "rb") as f:
        d = pickle.load(f)
    policies = {k: load_policy(v) for k, v in d["policy_specs"].items()}
    collector = Collector("x", tiers={s.tier: s.policy_name for s in d["specs"]})
    writer = ResultsWriter(out / "shards")
    digest = hashlib.sha256()

    def sink(events):
        for e in events:  # repr of a frozen dataclass: every field, floats exact
            digest.update(repr(e).encode())
        collector.ingest_events(events)
        writer.add(events)

    replay_content(d["specs"], d["run"], d["server"], policies, d["content"], history=False, on_events=sink)
    writer.merge(out / "tokens.parquet", frame=False)
    return exposition_lines(collector), digest.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("content")
    p.add_argument("dir", type=Path)
    p.add_argument("--compare", action="store_true")
    a = p.parse_args()
    if not a.compare:
        a.dir.mkdir(parents=True, exist_ok=True)
        lines, digest = replay(a.content, a.dir)
        (a.dir / "metrics.txt").write_text("\n".join(lines) + "\n")
        (a.dir / "events.sha256").write_text(digest + "\n")
        print("captured", a.dir, digest)
        return
    out = Path(tempfile.mkdtemp())
    lines, digest = replay(a.content, out)
    pd.testing.assert_frame_equal(
        read_tokens(out / "tokens.parquet"), read_tokens(a.dir / "tokens.parquet"), check_exact=True
    )
    print("tokens.parquet: identical")
    assert "\n".join(lines) + "\n" == (a.dir / "metrics.txt").read_text(), "metrics differ"
    print("metrics: identical")
    assert digest + "\n" == (a.dir / "events.sha256").read_text(), "events differ"
    print("events: identical", digest)


if __name__ == "__main__":
    main()
