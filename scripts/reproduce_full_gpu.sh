#!/usr/bin/env bash
# `testbed reproduce paper --size full` and `testbed reproduce fleet --size full` on a GPU machine
# (issue 8): all 164 HumanEval problems, the real Qwen pair, the verifier's LLM and the groups' SLM on
# CUDA in the dtype the GPU runs fastest (models.dtype: auto -> bf16). The paper study runs SAMPLES
# samples per problem (default: full's 5, so 820 devices; pass@1 is the unbiased estimator and every
# policy is compared with llm-only paired, issue 15), each up to 256 tokens ending at eos / the
# HumanEval stop sequences. Run from the repo root:
#   bash scripts/reproduce_full_gpu.sh [OUT_DIR] [paper|fleet|both]
# Both studies are resumable: run the script again after an interruption and every finished point is
# read back, not recomputed. SIZE=smoke runs the same placement on tiny models in seconds (a check
# that the machine and the placement work before the long run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs}}"
WHAT="${2:-both}"
SIZE="${SIZE:-full}"
SAMPLES="${SAMPLES:-}"       # samples per problem of the paper study (>= 5 for full; empty: the size's)
ENGINE="${ENGINE:-local}"   # local: one process, no Ray; ray: actors (run under ../shared/bin/offline)
mkdir -p "$OUT_DIR"
test -x .venv/bin/python || make install
.venv/bin/python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
assert torch.cuda.is_available(), "torch sees no GPU: install a CUDA build of torch for this machine"
PY
if [ "$SIZE" != smoke ]; then .venv/bin/testbed models prepare; fi
WRAP=""
if [ "$ENGINE" = ray ] && [ -x ../shared/bin/offline ]; then WRAP=../shared/bin/offline; fi
THREADS="${THREADS:-8}"     # torch CPU threads per role (the policies' math over |V| runs on the CPU)
GPU=(--set actors.verifier_device=cuda --set actors.verifier_gpus=0.5
     --set actors.group_device=cuda --set actors.group_gpus=0.5 --set models.dtype=auto
     --set actors.group_threads="$THREADS" --set actors.verifier_threads="$THREADS")
for kind in paper fleet; do
  if [ "$WHAT" = both ] || [ "$WHAT" = "$kind" ]; then
    EXTRA=()
    if [ "$kind" = paper ] && [ -n "$SAMPLES" ]; then EXTRA=(--samples "$SAMPLES"); fi
    $WRAP .venv/bin/testbed reproduce "$kind" --size "$SIZE" --engine "$ENGINE" \
      --out "$OUT_DIR/reproduce-$kind-$SIZE" "${GPU[@]}" "${EXTRA[@]}"
  fi
done
