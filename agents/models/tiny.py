"""Tiny random models: a small Qwen2-architecture draft/target pair built from (config, seed), and its
byte-level tokenizer. Test fixtures and the `tiny` model spec (docs/design.md section 5): built in
well under a second, the same on any machine and transformers version, no files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agents.models.registry import ROLES, ModelError


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
    def from_dict(cls, params: Mapping[str, Any]) -> TinyConfig:
        params = {k: v for k, v in params.items() if k != "kind"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ModelError(f"unknown tiny model parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**params)

    def with_role(self, role: str) -> TinyConfig:
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
