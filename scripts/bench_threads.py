"""A content-pass step of the Qwen pair at 1 vs 2 torch threads, measured in one run (interleaved
rounds, so a burst of other load hits both counts alike), and the dtype probe's bf16/fp32 ratio at
each count. Prints JSON, with the CPU and the machine's load (other work on the cores makes a split
forward many times slower: read the ratio, not the absolute times, and repeat on a busy machine).

    PYTHONPATH=. python scripts/bench_threads.py [bfloat16|float32] [slm,llm]
"""

import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from agents.lm import BatchedLM
from agents.models import load_model
from agents.models.hardware import _time_gemms, cpu_capability, cpu_model, usable_cores

DTYPE = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
ROLES = sys.argv[2].split(",") if len(sys.argv) > 2 else ["slm", "llm"]
B, PROMPT, ROUNDS, STEPS, COUNTS = 16, 64, 3, 2, (1, 2)


def main() -> None:
    out = {
        "load_1m_at_start": os.getloadavg()[0],
        "cpu": cpu_model(),
        "capability": cpu_capability(),
        "usable_cores": usable_cores(),
        "dtype": DTYPE,
        "batch": B,
    }
    probe: dict = {}
    for n in COUNTS * 2:
        fp32, bf16 = _time_gemms([torch.float32, torch.bfloat16], reps=5, threads=n)
        probe.setdefault(n, []).append(bf16 / fp32)
    out["probe_bf16_over_fp32"] = {n: round(min(v), 3) for n, v in probe.items()}
    rng = np.random.default_rng(0)
    times: dict = {}
    for role in ROLES:
        model = load_model(f"qwen2.5-coder:{role}", dtype=DTYPE)
        lms = {}
        for n in COUNTS:
            torch.set_num_threads(n)
            lm = BatchedLM(model)
            lm.prefixes = None  # time the forwards, not a copy
            lm.extend([(i, rng.integers(0, 150000, PROMPT).tolist()) for i in range(B)])
            lm.extend([(i, [11]) for i in range(B)])  # warm-up step
            lms[n] = lm
        for _ in range(ROUNDS):
            for n in COUNTS:
                torch.set_num_threads(n)
                for _ in range(STEPS):
                    t = time.perf_counter()
                    lms[n].extend([(i, [int(rng.integers(0, 150000))]) for i in range(B)])
                    times.setdefault(role, {}).setdefault(n, []).append(time.perf_counter() - t)
        med = {n: statistics.median(v) for n, v in times[role].items()}
        out[role] = {
            "ms_per_step": {n: round(1e3 * m, 1) for n, m in med.items()},
            "speedup_2_over_1": round(med[1] / med[2], 3),
        }
    step = {n: sum(statistics.median(times[r][n]) for r in ROLES) for n in COUNTS}
    out["content_step_ms"] = {n: round(1e3 * v, 1) for n, v in step.items()}
    out["content_step_speedup_2_over_1"] = round(step[1] / step[2], 3)
    out["load_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
