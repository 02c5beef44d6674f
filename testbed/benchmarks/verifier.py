"""`testbed bench verifier`: verified tokens/s through the Verifier (ZeroMQ ROUTER, sessions,
batching, payload decode, speculative verification) next to the raw batched forward of the
same model, both measured in this run on the same weights."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import typer


def _prompt(length: int, vocab: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(100, min(vocab, 30000), size=length)]


def raw_tokens_per_s(lm, batch: int, prompt_len: int, steps: int) -> float:
    """Tokens/s of BatchedLM.extend: `batch` sessions, one new token each per step."""
    sessions = [("raw", batch, i) for i in range(batch)]
    lm.extend([(s, _prompt(prompt_len, lm.vocab_size, i)) for i, s in enumerate(sessions)])
    lm.extend([(s, [7]) for s in sessions])  # warm-up step
    t0 = time.perf_counter()
    for step in range(steps):
        lm.extend([(s, [11 + step]) for s in sessions], all_positions=True)
    dt = time.perf_counter() - t0
    for s in sessions:
        lm.drop(s)
    return batch * steps / dt


def verifier_tokens_per_s(lm, batch: int, prompt_len: int, steps: int, k: int = 30) -> float:
    """Tokens/s through a Verifier: uploads of top-k 8-bit payloads over ZeroMQ, verdicts back."""
    import torch
    import zmq

    from agents import codec, protocol, wire
    from agents.actors import ClockParams, Verifier
    from agents.verifier import ServerProfile

    vocab = lm.vocab_size
    verifier = Verifier(
        None,
        ServerProfile(max_batch=batch, max_wait_ms=1e6),
        0,
        vocab,
        ClockParams(),
        lm=lm,
        threads=torch.get_num_threads(),
    )
    endpoint = verifier.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    rng = np.random.default_rng(0)
    probs = np.sort(rng.dirichlet(np.ones(k)))[::-1] * 0.9
    payload = codec.encode_payload(np.arange(k) + 100, probs, vocab, 8)
    devices = [10_000 * batch + i for i in range(batch)]  # distinct from other runs' sessions
    try:
        for i, d in enumerate(devices):
            frame = protocol.Open(
                device=d, session=wire.SESSION, seq=0, prompt=_prompt(prompt_len, vocab, i), seed=0, temperature=1.0
            )
            sock.send_multipart(wire.encode(wire.Open(frame, wire.OpenStamp(steps + 2, 0.0))))

        def step(n: int) -> None:
            for d in devices:
                frame = protocol.Upload(
                    device=d,
                    session=wire.SESSION,
                    seq=n,
                    token_index=n,
                    draft=100,
                    draft_prob=float(probs[0]),
                    payload=payload,
                )
                sock.send_multipart(wire.encode(wire.Upload(frame, wire.UploadStamp(n * 10.0, n * 10.0 + 1.0))))
            for _ in devices:
                if not sock.poll(600_000):
                    raise RuntimeError(f"verifier gave no verdict: {verifier.status()}")
                wire.decode(sock.recv_multipart())  # raises an ERROR reply

        step(0)  # warm-up, includes the prompt prefill
        t0 = time.perf_counter()
        for n in range(1, steps + 1):
            step(n)
        dt = time.perf_counter() - t0
    finally:
        sock.close()
        verifier.stop()
        for d in devices:
            lm.drop(d)
    return batch * steps / dt


def command(
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    model: str = typer.Option("qwen2.5-coder:llm", "--model", help="Model spec (bundled member, folder, tiny)."),
    batches: str = typer.Option("1,8,32", "--batches", help="Comma-separated batch sizes."),
    steps: int = typer.Option(4, "--steps", min=1, help="Timed steps per batch size."),
    prompt_len: int = typer.Option(64, "--prompt-len", min=1),
    dtype: str = typer.Option("auto", "--dtype", help="auto | bfloat16 | float32 | float16."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads (as the verifier actor's default)."),
) -> None:
    """Verified tokens/s at several batch sizes through the Verifier vs the raw batched forward."""
    import torch

    from agents.lm import BatchedLM
    from agents.models import load_model
    from agents.models.hardware import machine_info, resolve_dtype

    torch.set_num_threads(threads)
    dtype = resolve_dtype(dtype)
    lm = BatchedLM(load_model(model, dtype=dtype))
    rows = []
    for b in [int(x) for x in batches.split(",")]:
        raw = raw_tokens_per_s(lm, b, prompt_len, steps)
        ver = verifier_tokens_per_s(lm, b, prompt_len, steps)
        rows.append(
            {
                "batch": b,
                "verifier_tokens_per_s": round(ver, 2),
                "raw_tokens_per_s": round(raw, 2),
                "verifier_vs_raw": round(ver / raw, 3),
            }
        )
    base = rows[0]["verifier_tokens_per_s"]
    for r in rows:
        r["speedup_vs_batch1"] = round(r["verifier_tokens_per_s"] / base, 2) if base else math.nan
    doc = {
        "model": model,
        "dtype": dtype,
        "threads": threads,
        "machine": machine_info(),
        "lm": lm.describe(),
        "steps": steps,
        "prompt_len": prompt_len,
        "rows": rows,
    }
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"verifier throughput, {model}, {dtype}, {doc['machine']['cpu_capability']}")
    for col in ("batch", "verifier tok/s", "raw tok/s", "verifier/raw", "vs batch 1"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["batch"]),
            f"{r['verifier_tokens_per_s']:.1f}",
            f"{r['raw_tokens_per_s']:.1f}",
            f"{r['verifier_vs_raw']:.2f}",
            f"{r['speedup_vs_batch1']:.2f}x",
        )
    Console().print(t)
