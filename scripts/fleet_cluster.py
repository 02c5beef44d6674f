"""A library replay on a local Ray cluster of several nodes (docs/design.md section 8).

Starts a head and NODES-1 more raylets on this machine (ray.cluster_utils.Cluster: only its own
processes, stopped at the end; `ray stop` would stop every Ray of the machine), runs
`testbed run SCENARIO --address ...` against it, and prints where the results are.

    ../shared/bin/offline .venv/bin/python scripts/fleet_cluster.py fleet-1m runs/fleet-1m --nodes 2 --cpus 1

On a real cluster: `ray start` on every machine, then `testbed run fleet-1m --address HEAD:6379 --out
/shared/folder` (each partition writes its rows to --out: every node must see it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario")
    ap.add_argument("out")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=1, help="CPUs each node offers")
    args = ap.parse_args()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus, "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus)
        cluster.wait_for_nodes()
        print(f"Ray cluster {cluster.address}: {args.nodes} nodes x {args.cpus} CPU", flush=True)
        cmd = [sys.executable, "-m", "testbed.cli", "run", args.scenario, "--address", cluster.address]
        return subprocess.run(["/usr/bin/time", "-v", *cmd, "--out", args.out, "--no-report"]).returncode
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
