"""Time the replay of a pickled content record: no sinks, then Sinks (collector + results writer)."""
import pickle, sys, time, tempfile, resource
from pathlib import Path
from agents.engine import replay_content
from policies import load_policy

d = pickle.load(open(sys.argv[1], "rb"))
policies = {k: load_policy(v) for k, v in d["policy_specs"].items()}
tokens = sum(len(c) for c in d["content"].devices.values())
mode = sys.argv[2] if len(sys.argv) > 2 else "both"
if mode in ("both", "bare"):
    t0 = time.perf_counter()
    replay_content(d["specs"], d["run"], d["server"], policies, d["content"], history=False, on_events=lambda ev: None)
    dt = time.perf_counter() - t0
    print(f"bare replay: {dt:.1f} s, {dt / tokens * 1e6:.1f} us/token ({tokens} tokens)")
if mode in ("both", "sinks"):
    from testbed.metrics import Collector
    from testbed.results import ResultsWriter
    c = Collector("x", tiers={s.tier: s.policy_name for s in d["specs"]})
    out = Path(tempfile.mkdtemp())
    w = ResultsWriter(out / "shards")
    def sink(ev):
        c.ingest_events(ev); w.add(ev)
    t0 = time.perf_counter()
    replay_content(d["specs"], d["run"], d["server"], policies, d["content"], history=False, on_events=sink)
    t1 = time.perf_counter()
    w.close(); w.merge(out / "tokens.parquet", frame=False)
    t2 = time.perf_counter()
    print(f"with sinks: {t1 - t0:.1f} s ({(t1 - t0) / tokens * 1e6:.1f} us/token), merge {t2 - t1:.1f} s")
print("peak rss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
