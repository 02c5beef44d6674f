"""Models (docs/design.md section 5): which models exist, how a scenario names one, and how it is loaded.

- registry: the bundled offline pairs, the cache they are prepared into, ModelError (no torch);
- tiny: tiny random Qwen2 draft/target pairs and their byte tokenizer (test fixtures, `tiny` specs);
- spec: parsing a model spec (bundled member, Hugging Face id or folder, tiny) into a ModelSpec;
- hardware: the machine (threads, device placement, the measured dtype probe) and a model's dtype folder;
- load: models, tokenizers and config facts from a spec, local files only.

Importable inside Ray actors (no testbed import). The names below are the package's API:
``from agents.models import load_model`` works as it did when this was one module.
"""

from agents.models.hardware import PREPARED_DTYPE, dtype_folder, model_dtype
from agents.models.load import load_model, load_tokenizer, model_facts, vocab_size
from agents.models.registry import (
    CACHE_ENV,
    DEFAULT_CACHE_DIR,
    DEFAULT_PAIR,
    OFFLINE_EXTRA_HINT,
    PAIRS,
    READY_FORMAT,
    READY_MARKER,
    ROLES,
    BundledModel,
    BundledPair,
    ModelError,
    cache_dir,
    get_pair,
    is_prepared_folder,
    prepared_info,
)
from agents.models.spec import ModelSpec, pair_specs, parse_spec, prepared_folder
from agents.models.tiny import ByteTokenizer, TinyConfig, build_tiny

__all__ = [
    "CACHE_ENV",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_PAIR",
    "OFFLINE_EXTRA_HINT",
    "PAIRS",
    "PREPARED_DTYPE",
    "READY_FORMAT",
    "READY_MARKER",
    "ROLES",
    "BundledModel",
    "BundledPair",
    "ByteTokenizer",
    "ModelError",
    "ModelSpec",
    "TinyConfig",
    "build_tiny",
    "cache_dir",
    "dtype_folder",
    "get_pair",
    "is_prepared_folder",
    "load_model",
    "load_tokenizer",
    "model_dtype",
    "model_facts",
    "pair_specs",
    "parse_spec",
    "prepared_folder",
    "prepared_info",
    "vocab_size",
]
