#!/usr/bin/env bash
# GPU check (issue 10): the `default` scenario with the verifier's LLM (and the groups' SLM) on
# CUDA, reporting tokens/s and the time breakdown. Run on a machine with a GPU from the repo root:
#   bash scripts/gpu_check.sh [OUT_DIR]
# It installs nothing but the project's venv (make install: pip against the registries on the
# project's side), prepares the offline Qwen pair, and writes OUT_DIR (default $OUT or runs/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs}/gpu}"
mkdir -p "$OUT_DIR"
test -x .venv/bin/python || make install
.venv/bin/python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
assert torch.cuda.is_available(), "torch sees no GPU: install a CUDA build of torch for this machine"
PY
.venv/bin/testbed models prepare
# Ray probes cloud metadata at start: where the loopback-only wrapper exists, use it.
WRAP=$(test -x ../shared/bin/offline && echo ../shared/bin/offline || true)
for placement in cpu cuda; do
  if [ "$placement" = cuda ]; then
    EXTRA='{"actors.verifier_device": "cuda", "actors.verifier_gpus": 0.5, "actors.group_device": "cuda", "actors.group_gpus": 0.5}'
  else
    EXTRA='{}'
  fi
  $WRAP .venv/bin/python - "$OUT_DIR/$placement" "$EXTRA" <<'PY'
import json, sys
from pathlib import Path
from testbed.runner import RunOptions, run_scenario
from testbed.scenario import load_scenario, override
out, extra = Path(sys.argv[1]), json.loads(sys.argv[2])
s = override(load_scenario("default"), extra) if extra else load_scenario("default")
summary = run_scenario(s, RunOptions(out_dir=out, progress=False, report=False, profile=True))
prof = summary["profile"]
print(json.dumps({"placement": out.name, "dtype": summary["compute"]["dtype"],
                  "emulated_tokens_per_s": summary["throughput_tokens_per_s"]["system"],
                  "tokens": summary["tokens"], "wall_s": prof["wall_s"], "emulation_s": prof["emulation_s"],
                  "real_tokens_per_s": summary["tokens"] / prof["emulation_s"],
                  "compute": {k: v["seconds"] for k, v in prof["compute"].items()},
                  "emulation_over_compute_limit": prof.get("wall_over_compute_limit")}, indent=2))
PY
done | tee "$OUT_DIR/gpu_check.json"
