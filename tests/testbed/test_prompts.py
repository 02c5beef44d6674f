"""Prompts: HumanEval offline (count/offset), inline texts, JSONL files with file:line errors."""

from __future__ import annotations

import pytest

from testbed.prompts import (
    HUMANEVAL_SIZE,
    PromptError,
    humaneval_path,
    humaneval_problems,
    load_prompts,
    prompt_index,
)


def test_humaneval_bundled_offline():
    assert humaneval_path().is_file()
    problems = humaneval_problems()
    assert len(problems) == HUMANEVAL_SIZE == 164
    assert problems[0]["task_id"] == "HumanEval/0" and {"prompt", "test", "entry_point"} <= set(problems[0])


def test_humaneval_count_offset():
    ps = load_prompts({"source": "humaneval", "count": 3, "offset": 10})
    assert [p.id for p in ps] == ["HumanEval/10", "HumanEval/11", "HumanEval/12"]
    assert [p.index for p in ps] == [0, 1, 2]
    assert ps[0].text == humaneval_problems()[10]["prompt"] and ps[0].token_ids is None
    assert len(load_prompts({"source": "humaneval"})) == 164
    assert len(load_prompts({"source": "humaneval", "offset": 160})) == 4
    with pytest.raises(PromptError, match="<= 164"):
        load_prompts({"source": "humaneval", "count": 10, "offset": 160})


def test_texts_and_tokenizer():
    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

    ps = load_prompts({"texts": ["ab", "c", "de"], "offset": 1}, tokenizer=Tok())
    assert [(p.id, p.text, p.token_ids) for p in ps] == [("texts[1]", "c", (99,)), ("texts[2]", "de", (100, 101))]

    def hf_like(text):  # a Hugging Face tokenizer is callable -> {"input_ids": [...]}
        return {"input_ids": [len(text)]}

    assert load_prompts({"texts": ["abc"]}, tokenizer=hf_like)[0].token_ids == (3,)


def test_jsonl_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "def a():"}\n\n{"task_id": "mine/1", "prompt": "def b():"}\n')
    ps = load_prompts({"file": str(f)})
    assert [(p.id, p.text) for p in ps] == [("p.jsonl:1", "def a():"), ("mine/1", "def b():")]
    assert [p.text for p in load_prompts({"file": "p.jsonl", "count": 1, "offset": 1}, base_dir=tmp_path)] == [
        "def b():"
    ]
    with pytest.raises(PromptError, match="exceeds the 2 prompts"):
        load_prompts({"file": str(f), "count": 3})


@pytest.mark.parametrize(
    "content,line,what",
    [
        ('{"prompt": "ok"}\n{"prompt": \n', 2, "invalid JSON"),
        ('{"prompt": "ok"}\n\n["a list"]\n', 3, 'string field "prompt"'),
        ('{"text": "wrong key"}\n', 1, 'string field "prompt"'),
        ('{"prompt": 5}\n', 1, 'string field "prompt"'),
        ('{"prompt": "  "}\n', 1, "empty prompt"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, line, what):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(PromptError) as ei:
        load_prompts({"file": str(f)})
    assert str(ei.value).startswith(f"{f}:{line}: ") and what in str(ei.value)


def test_jsonl_empty_and_missing(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(PromptError, match="no prompts"):
        load_prompts({"file": str(f)})
    with pytest.raises(PromptError, match="not found"):
        load_prompts({"file": str(tmp_path / "missing.jsonl")})


def test_prompt_assignment_round_robin():
    assert [prompt_index(i, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError):
        prompt_index(0, 0)
