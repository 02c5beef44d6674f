"""Loading a model or tokenizer from a spec (docs/design.md section 5): a tiny model is built, a bundled
member loads from its prepared folder in the dtype the hardware runs (agents.models.hardware), a Hugging
Face id or folder loads from local files only. Everything here is importable inside Ray actors (no
testbed import).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from agents.models.hardware import dtype_folder, model_dtype
from agents.models.registry import ModelError
from agents.models.spec import ModelSpec, parse_spec, prepared_folder
from agents.models.tiny import ByteTokenizer, TinyConfig, build_tiny


def _local_folder(spec: ModelSpec) -> str:
    """The folder to load from. A hub id is resolved to its snapshot in the local Hugging Face cache
    first, so transformers only ever sees a local folder and never calls the hub."""
    if spec.kind == "bundled":
        return str(prepared_folder(spec))
    source = _source(spec)
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, local_files_only=True)
    except Exception as err:  # LocalEntryNotFoundError, HFValidationError, ...
        raise _hf_error(spec, "the model files", err) from err


def _source(spec: ModelSpec) -> str:
    """The hub id or folder of a non-tiny spec (parse_spec always sets it)."""
    if spec.path is None:
        raise ModelError(f"model spec {spec.name!r} names no model folder or Hugging Face id")
    return spec.path


def _hf_error(spec: ModelSpec, what: str, err: Exception) -> ModelError:
    return ModelError(
        f"cannot load {what} for model spec {spec.name!r} from local files ({type(err).__name__}: {err}). "
        "Nothing is downloaded at run time: give a local model folder, or fetch the model into the Hugging Face "
        "cache beforehand (e.g. `huggingface-cli download <id>` on a machine with internet)"
    )


def load_model(
    spec: str | Mapping[str, Any] | ModelSpec | TinyConfig,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
):
    """Load a causal LM for inference (eval mode, no grads).

    dtype: float32 | bfloat16 | float16 | auto (agents.models.hardware.auto_dtype for `device`) | None
    (= auto). Tiny models take fp32 under auto: tests compare them exactly. A bundled member loads
    from its folder in that very dtype (dtype_folder), so it stays memory-mapped from safetensors
    (measured: 1.5B bf16 -> 3.1 GB RssFile, 0.26 GB anonymous) and several actors on one machine
    share one copy in the page cache."""
    spec = parse_spec(spec)
    name = model_dtype(spec, dtype, str(device))
    torch_dtype = getattr(torch, name)
    if spec.tiny is not None:
        model = build_tiny(spec.tiny)
        if torch_dtype != torch.float32:
            model = model.to(torch_dtype)
        return model.to(device)
    from transformers import AutoModelForCausalLM

    path = str(dtype_folder(spec, name)) if spec.kind == "bundled" else _local_folder(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, local_files_only=True, low_cpu_mem_usage=True
        )
    except (OSError, ValueError) as err:
        raise _hf_error(spec, "the model", err) from err
    model.requires_grad_(False)
    return model.eval().to(device)


def vocab_size(spec: str | Mapping[str, Any] | ModelSpec | TinyConfig) -> int:
    """|V| of a spec without loading its weights: the LM head's rows (the config's vocab_size)."""
    spec = parse_spec(spec)
    if spec.tiny is not None:
        return spec.tiny.vocab_size
    from transformers import AutoConfig

    path = str(prepared_folder(spec)) if spec.kind == "bundled" else _source(spec)
    try:
        return int(AutoConfig.from_pretrained(path, local_files_only=True).vocab_size)
    except (OSError, ValueError) as err:
        raise _hf_error(spec, "the config", err) from err


def model_facts(spec: str | Mapping[str, Any] | ModelSpec | TinyConfig) -> dict[str, int]:
    """What validation needs of a model, from its config alone (no weights): vocab_size,
    max_positions (context length), layers, kv_heads and head_dim (KV cache bytes per token)."""
    spec = parse_spec(spec)
    if spec.tiny is not None:
        c = spec.tiny
        return {
            "vocab_size": c.vocab_size,
            "max_positions": c.max_positions,
            "layers": c.depth,
            "kv_heads": c.kv_heads,
            "head_dim": c.hidden // c.heads,
        }
    from transformers import AutoConfig

    path = str(prepared_folder(spec)) if spec.kind == "bundled" else _source(spec)
    try:
        c = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise _hf_error(spec, "the config", err) from err
    heads = int(c.num_attention_heads)
    return {
        "vocab_size": int(c.vocab_size),
        "max_positions": int(c.max_position_embeddings),
        "layers": int(c.num_hidden_layers),
        "kv_heads": int(getattr(c, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(c, "head_dim", None) or c.hidden_size // heads),
    }


def load_tokenizer(spec: str | Mapping[str, Any] | ModelSpec | TinyConfig):
    """The tokenizer of a spec: the model's own (from its folder) or a ByteTokenizer for tiny models."""
    spec = parse_spec(spec)
    if spec.tiny is not None:
        return ByteTokenizer(spec.tiny.vocab_size)
    from transformers import AutoTokenizer

    path = _local_folder(spec)
    # Bundled folders are Qwen tokenizers: say so, or transformers 4.57.3+ wrongly warns about a Mistral
    # regex for any local folder it saved itself.
    extra = {"fix_mistral_regex": False} if spec.kind == "bundled" else {}
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **extra)
    except (OSError, ValueError) as err:
        raise _hf_error(spec, "the tokenizer", err) from err
