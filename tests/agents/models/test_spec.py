"""Model specs: every accepted form parses, bad ones name the problem, pair specs."""

from __future__ import annotations

import pytest

from agents.models import ModelError, ModelSpec, TinyConfig, cache_dir, pair_specs, parse_spec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


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
