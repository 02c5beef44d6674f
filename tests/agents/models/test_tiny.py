"""Tiny models (deterministic, correlated pair, not flat) and their byte tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.models import ByteTokenizer, ModelError, TinyConfig, build_tiny, load_model, load_tokenizer


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
