"""Time the replay of a pickled content record (issue 17): no sinks, then the sinks (collector + results writer).

python scripts/bench_replay.py CONTENT.pkl [both|bare|sinks]
"""

import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

from agents.engine import replay_content
from policies import load_policy
from testbed.metrics import Collector
from testbed.results import ResultsWriter


def main() -> None:
    with open(sys.argv[1], "rb") as f:
        d = pickle.load(f)
    policies = {k: load_policy(v) for k, v in d["policy_specs"].items()}
    tokens = sum(len(c) for c in d["content"].devices.values())
    mode = sys.argv[2] if len(sys.argv) > 2 else "both"
    args = (d["specs"], d["run"], d["server"], policies, d["content"])
    if mode in ("both", "bare"):
        t0, c0 = time.perf_counter(), time.process_time()
        replay_content(*args, history=False, on_events=lambda events: None)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"bare replay: {dt:.1f} s, {dt / tokens * 1e6:.1f} us/token ({tokens} tokens); "
            f"cpu {cpu / tokens * 1e6:.1f} us/token"
        )
    if mode in ("both", "sinks"):
        collector = Collector("x", tiers={s.tier: s.policy_name for s in d["specs"]})
        out = Path(tempfile.mkdtemp())
        writer = ResultsWriter(out / "shards")

        def sink(events):
            collector.ingest_events(events)
            writer.add(events)

        t0, c0 = time.perf_counter(), time.process_time()
        replay_content(*args, history=False, on_events=sink)
        t1, cpu = time.perf_counter(), time.process_time() - c0
        writer.close()
        writer.merge(out / "tokens.parquet", frame=False)
        t2 = time.perf_counter()
        print(
            f"with sinks: {t1 - t0:.1f} s ({(t1 - t0) / tokens * 1e6:.1f} us/token), merge {t2 - t1:.1f} s; "
            f"cpu {cpu / tokens * 1e6:.1f} us/token"
        )
    print("peak rss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    main()
