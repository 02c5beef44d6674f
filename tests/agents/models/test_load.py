"""Loading: load errors say what to do, nothing is downloaded at run time, dtype and shape, facts without
weights."""

from __future__ import annotations

import pytest
import torch

from agents.models import ModelError, build_tiny, load_model, load_tokenizer, parse_spec, vocab_size


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unprepared_bundled_model_says_how_to_prepare(cache):
    with pytest.raises(ModelError, match=r"testbed models prepare --pair qwen2.5-coder"):
        load_model("qwen2.5-coder:slm")
    with pytest.raises(ModelError, match="not prepared"):
        load_tokenizer("qwen2.5-coder:llm")


def test_hf_id_not_in_local_cache_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="Nothing is downloaded at run time"):
        load_model("hlm-testbed/definitely-not-a-cached-model")


def test_tiny_dtype_and_shape():
    model = load_model({"kind": "tiny", "vocab_size": 1000, "hidden": 32, "heads": 2, "kv_heads": 1}, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config.vocab_size == 1000 and model.lm_head.weight.shape == (1000, 32)
    assert all(not p.requires_grad for p in model.parameters())
    with pytest.raises(ModelError, match="dtype"):
        load_model("tiny", dtype="float64")


def test_vocab_size_without_loading_matches_the_lm_head():
    spec = {"kind": "tiny", "vocab_size": 300, "role": "slm"}
    model = build_tiny(parse_spec(spec).tiny)
    assert vocab_size(spec) == model.get_output_embeddings().weight.shape[0] == 300
