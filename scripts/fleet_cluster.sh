#!/usr/bin/env bash
# A library replay on a local Ray cluster of several nodes (docs/design.md section 8): starts a head and
# NODES-1 more raylets on this machine (CPUS each), runs SCENARIO with --address, and stops them.
#   ../shared/bin/offline scripts/fleet_cluster.sh fleet-1m runs/fleet-1m     # NODES=2 CPUS=1 by default
# On a real cluster: `ray start` on every machine, then `testbed run fleet-1m --address HEAD:6380 --out
# /shared/folder` (the partitions' files go to --out: every node must see it).
set -euo pipefail
SCENARIO=${1:-fleet-1m}
OUT=${2:-runs/$SCENARIO}
NODES=${NODES:-2}
CPUS=${CPUS:-1}
PORT=${PORT:-6380}
RAY=${RAY:-ray}
TESTBED=${TESTBED:-testbed}
# Ray's token authentication: every node and the driver use the token in ~/.ray/auth_token (made once)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
$RAY get-auth-token --generate >/dev/null
$RAY stop --force >/dev/null 2>&1 || true
trap '$RAY stop --force >/dev/null 2>&1 || true' EXIT
$RAY start --head --port="$PORT" --num-cpus="$CPUS" --include-dashboard=false --disable-usage-stats >/dev/null
for _ in $(seq 2 "$NODES"); do
  $RAY start --address="127.0.0.1:$PORT" --num-cpus="$CPUS" --disable-usage-stats >/dev/null
done
$RAY status 2>/dev/null | sed -n '1,12p' || true
# TESTBED may be a command line (e.g. "python -m testbed.cli"): split into words on purpose
/usr/bin/time -v $TESTBED run "$SCENARIO" --address "127.0.0.1:$PORT" --out "$OUT" --no-report
