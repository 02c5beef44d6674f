"""`testbed bench invariance`: which ops give a row the same bits alone and in a batch, and by how
much the others miss. Measured on a model's own weights in one run (agents.lm explains the layout
that BatchedLM uses because of these figures).

Per op, a target row (or session) is computed alone and inside batches of other rows; the table
gives the largest |difference| over batch sizes and the share of differing values. 0 means
bit-identical."""

from __future__ import annotations

import json

import numpy as np
import typer

ROWS = (2, 3, 4, 8, 16, 17, 32, 64, 100)


def _diff(a, b) -> tuple[float, float]:
    a, b = a.float(), b.float()
    return float((a - b).abs().max()), float((a != b).float().mean())


def linear_rows(weight, bias, dtype, tiled: bool) -> dict:
    """Row 0 of x @ W.T alone vs among M rows."""
    import torch

    from agents.lm import ROW_TILE, chunked_linear, tiled_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(max(ROWS), weight.shape[1], generator=gen).to(dtype)
    f = (lambda t: tiled_linear(t, weight, bias, ROW_TILE)) if tiled else (lambda t: chunked_linear(t, weight, bias))
    return _first_row_alone_vs_batched(f, x)


def _first_row_alone_vs_batched(f, x) -> dict:
    """f(x[:1]) against the first row of f(x[:m]) for every m in ROWS."""
    alone = f(x[:1])
    worst, share = 0.0, 0.0
    for m in ROWS:
        d, s = _diff(f(x[:m])[:1], alone)
        worst, share = max(worst, d), max(share, s)
    return {"max_abs_diff": worst, "max_share_differing": share}


def rms_norm_rows(norm, hidden: int, dtype, tiled: bool) -> dict:
    import torch

    from agents.lm import BatchedLM

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(max(ROWS), hidden, generator=gen).to(dtype)
    return _first_row_alone_vs_batched((lambda t: BatchedLM._rms_norm(t, norm)) if tiled else norm, x)


def attention_sessions(heads: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """One session's decode attention alone vs in one left-padded, masked SDPA over a batch (the
    hf layout) and vs per session (the packed layout, always alone by construction)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(2)
    lengths = [37, 5, 80, 61, 12, 99, 40, 7]
    L = max(lengths)
    q = torch.randn(len(lengths), heads, 1, head_dim, generator=gen).to(dtype)
    k = torch.randn(len(lengths), kv_heads, L, head_dim, generator=gen).to(dtype)
    v = torch.randn(len(lengths), kv_heads, L, head_dim, generator=gen).to(dtype)
    mask = torch.arange(L)[None, :] >= (L - torch.tensor(lengths))[:, None]  # left padding
    batched = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
    n = lengths[0]
    alone = F.scaled_dot_product_attention(q[:1], k[:1, :, L - n :], v[:1, :, L - n :], enable_gqa=True)
    d, s = _diff(batched[:1], alone)
    return {"max_abs_diff": d, "max_share_differing": s}


def forward_sessions(model, forward: str, matmul: str = "tiled") -> dict:
    """A session's logits alone vs inside a batch of 8 sessions of other lengths (prefill + decode)."""
    from agents.lm import BatchedLM

    rng = np.random.default_rng(3)
    vocab = int(model.config.vocab_size)
    prompt = rng.integers(0, min(vocab, 30000), 40).tolist()
    alone = BatchedLM(model, forward=forward, matmul=matmul)
    a = [alone.extend([("t", prompt)])[0], alone.extend([("t", [17])])[0]]
    crowd = BatchedLM(model, forward=forward, matmul=matmul)
    others = [
        (("o", i), rng.integers(0, min(vocab, 30000), n).tolist()) for i, n in enumerate((3, 70, 12, 55, 9, 31, 64))
    ]
    b = [crowd.extend(others + [("t", prompt)])[-1], crowd.extend([(o, [5]) for o, _ in others] + [("t", [17])])[-1]]
    worst = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    share = max(float((x != y).mean()) for x, y in zip(a, b))
    return {"max_abs_diff": worst, "max_share_differing": share}


def command(
    spec: str = typer.Option("qwen2.5-coder:slm", "--spec", help="Model spec whose weights and shapes are used."),
    dtypes: str = typer.Option("auto,float32", "--dtypes", help="Comma-separated dtypes (auto = this machine's)."),
    threads: str = typer.Option("1,2", "--threads", help="Comma-separated torch thread counts."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Bit-invariance per op: linear (one call vs fixed row tiles), RMSNorm (one call vs tiles),
    attention (a padded batch vs one session), and the whole forward (hf vs packed)."""
    import torch

    from agents.models import load_model
    from agents.models.hardware import machine_info, resolve_dtype

    rows = []
    for name in dict.fromkeys(resolve_dtype(d.strip()) for d in dtypes.split(",")):
        dtype = getattr(torch, name)
        model = load_model(spec, dtype=name)
        layer = model.get_decoder().layers[0]
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for n_threads in [int(t) for t in threads.split(",")]:
            torch.set_num_threads(n_threads)
            with torch.inference_mode():
                ops = {
                    "linear mlp.up, one call": linear_rows(layer.mlp.up_proj.weight, None, dtype, tiled=False),
                    "linear mlp.up, row tiles": linear_rows(layer.mlp.up_proj.weight, None, dtype, tiled=True),
                    "linear q_proj+bias, one call": linear_rows(
                        layer.self_attn.q_proj.weight, layer.self_attn.q_proj.bias, dtype, tiled=False
                    ),
                    "linear q_proj+bias, row tiles": linear_rows(
                        layer.self_attn.q_proj.weight, layer.self_attn.q_proj.bias, dtype, tiled=True
                    ),
                    "lm head, one call": linear_rows(model.get_output_embeddings().weight, None, dtype, tiled=False),
                    "lm head, row tiles": linear_rows(model.get_output_embeddings().weight, None, dtype, tiled=True),
                    "rmsnorm, one call": rms_norm_rows(layer.input_layernorm, cfg.hidden_size, dtype, tiled=False),
                    "rmsnorm, row tiles": rms_norm_rows(layer.input_layernorm, cfg.hidden_size, dtype, tiled=True),
                    "attention, padded batch": attention_sessions(
                        cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, dtype
                    ),
                    "forward, hf (left-padded slab)": forward_sessions(model, "hf"),
                    "forward, packed, one-call matmuls": forward_sessions(model, "packed", "plain"),
                    "forward, packed (default)": forward_sessions(model, "packed"),
                }
            for op, r in ops.items():
                rows.append({"dtype": name, "threads": n_threads, "op": op, **r})
        del model
    doc = {"spec": spec, "machine": machine_info(), "rows_tried": list(ROWS), "rows": rows}
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bit-invariance per op, {spec}, {doc['machine']['cpu_capability']}")
    for col in ("dtype", "threads", "op", "max |diff|", "values differing"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["dtype"], str(r["threads"]), r["op"], f"{r['max_abs_diff']:.3g}", f"{r['max_share_differing']:.1%}")
    Console().print(t)
