"""What this machine computes with, and the dtype it runs fastest: measured, cached, recorded.

Machines of one kind differ from session to session (one CPU has AVX512-BF16, the next only AVX2,
where a bf16 matmul runs ~40x slower than fp32), so the dtype is never hard-coded from one
measurement. ``auto_dtype`` answers:

- CUDA: bf16 where the GPU supports it natively, else fp16;
- CPU: a short measured probe (a decode-shaped bf16 vs fp32 GEMM, the shapes real runs see) picks
  bf16 when it is at least as fast as fp32 (it also halves memory), else fp32. Without native
  bf16 (AVX512-BF16 or AMX) the probe is skipped: fp32. The probe runs at the torch thread count
  the forwards will use (``resolve_threads``: the content pass computes on every usable core), since
  the two kernels need not scale alike. The result is cached per machine (CPU model, capability,
  torch version, threads) under the testbed cache, so later runs decide in microseconds, and it is
  recorded with every run (``machine_info``).

Threads. ``resolve_threads("auto")`` is the cores this process may run on (its CPU affinity, not
the machine's count: a container or taskset may allow fewer), capped by OMP_NUM_THREADS where it is
set (the usual way to say "share this machine"): on cores other processes keep busy, a forward split
over 2 threads ran 5-13x *slower* than on 1 (measured, 2-core Xeon AVX512+BF16 at load 6-11), since
every parallel region waits for its slowest thread's time slice. Forwards in fp32 (MKL's sgemm) round
differently at different thread counts; bf16 (oneDNN) did not in our measurements. So a scenario
resolves its count once and every engine computes its content at that count (testbed.run).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_SHAPE = (16, 1536, 4096)  # rows x in x out: a tile of the packed forward on a 1.5B layer
PROBE_THREADS = 1  # the probe's default thread count, when the caller names none
BF16_MARGIN = 1.25  # native bf16 is kept unless it measures 1.25x slower than fp32 (it halves memory)


def _cpuinfo(field: str) -> str | None:
    """The first `field` of /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def native_bf16() -> bool:
    """The CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_capability() -> str:
    """torch's kernel capability (DEFAULT, AVX2, AVX512, ...) plus the native-bf16 flag."""
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{cap}+BF16" if native_bf16() else cap


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_threads() -> int:
    """What actors.threads auto resolves to: usable_cores(), at most OMP_NUM_THREADS where set."""
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(usable_cores(), int(cap)) if cap.isdigit() and int(cap) >= 1 else usable_cores()


def resolve_threads(threads: int | str | None) -> int:
    """A torch thread count: auto/None -> auto_threads(). Raises ValueError on anything else."""
    if threads in (None, "auto"):
        return auto_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be auto or a whole number >= 1, got {threads!r}")
    return threads


def _time_gemms(dtypes: list[torch.dtype], reps: int = 7, threads: int = PROBE_THREADS) -> list[float]:
    """Best-of-reps time of one PROBE_SHAPE GEMM per dtype, interleaved (so a burst of load hits
    every dtype alike), on `threads` torch threads."""
    m, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    args = [(x32.to(d), w32.to(d)) for d in dtypes]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x, w in args:
            torch.nn.functional.linear(x, w)  # warm-up (oneDNN builds its kernel on first use)
        best = [float("inf")] * len(dtypes)
        for _ in range(reps):
            for i, (x, w) in enumerate(args):
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, w)
                best[i] = min(best[i], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    return best


def _probe_path(threads: int = PROBE_THREADS) -> Path:
    from agents.models import cache_dir

    key = f"{cpu_model()}|{cpu_capability()}|{torch.__version__}|{threads}"
    safe = "".join(c if c.isalnum() else "-" for c in key)[:180]
    return cache_dir() / "dtype-probe" / f"{safe}.json"


def probe_cpu_dtype(refresh: bool = False, threads: int = PROBE_THREADS) -> dict:
    """bf16 vs fp32 GEMM time on this CPU at `threads` torch threads (cached per machine and thread
    count); {"dtype", "bf16_s", "fp32_s", ...}."""
    path = _probe_path(threads)
    if not refresh:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    if native_bf16():
        fp32, bf16 = _time_gemms([torch.float32, torch.bfloat16], threads=threads)
    else:
        fp32, bf16 = _time_gemms([torch.float32], threads=threads)[0], None
    choice = "bfloat16" if bf16 is not None and bf16 <= BF16_MARGIN * fp32 else "float32"
    result = {"dtype": choice, "bf16_s": bf16, "fp32_s": fp32, "shape": list(PROBE_SHAPE),
              "native_bf16": native_bf16(), "cpu": cpu_model(), "capability": cpu_capability(),
              "threads": threads, "torch": torch.__version__,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs the probe next time
    return result


def auto_dtype(device: str = "cpu", threads: int = PROBE_THREADS) -> str:
    """The dtype `auto` resolves to on `device` (cpu, cuda, cuda:N), for forwards at `threads`."""
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return probe_cpu_dtype(threads=threads)["dtype"]


def resolve_dtype(dtype: str | None, device: str = "cpu", threads: int = PROBE_THREADS) -> str:
    """A dtype name (auto/None -> auto_dtype at `threads`). Raises ValueError naming the accepted values."""
    if dtype in (None, "auto"):
        return auto_dtype(device, threads)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


def check_device(device: str) -> str | None:
    """None if torch can place work on `device` here, else why not (one sentence)."""
    if device == "cpu":
        return None
    if not device.startswith("cuda") or (device != "cuda" and not device[5:].lstrip(":").isdigit()):
        return f"device must be cpu, cuda or cuda:N, got {device!r}"
    if not torch.cuda.is_available():
        return (f"device {device!r}: torch sees no GPU on this machine (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use cpu, or run on a machine with a GPU")
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        return f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)"
    return None


def machine_info() -> dict:
    """What every run records next to its figures."""
    info = {"cpu": cpu_model(), "cpu_capability": cpu_capability(), "native_bf16": native_bf16(),
            "torch": torch.__version__, "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "cuda_devices": torch.cuda.device_count()}
    if info["cuda_devices"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
