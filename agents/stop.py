"""Where a device's sequence ends (docs/design.md section 1, step 8), as a serving engine decides it: at
an end-of-sequence token, at a stop sequence (a string) in the decoded completion, or at
max_new_tokens ("length", decided by the device itself).

The decision is a function of the device's committed tokens only (after a verdict or a skip), so
every engine, both passes of the virtual clock and a restarted actor stop at the same token.
Stop strings are matched in text, decoded incrementally as a serving engine does (vLLM's
detokenize_incrementally): each token re-decodes only the few ids since the last complete
character, so a character that spans several byte-level tokens is matched once whole, and a token
costs two decodes of a handful of ids, however long the completion.

Only the standard library at import (actors pickle a StopRule inside RunParams); the tokenizer is
loaded where a detector is made, once per process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

EOS, STOP, LENGTH = "eos", "stop", "length"
REASONS = (EOS, STOP, LENGTH)
# In a content record (agents.record.PackedDrafted): why the device stopped at that token.
REASON_CODES = {"": 0, EOS: 1, STOP: 2}
CODE_REASONS = {v: k for k, v in REASON_CODES.items()}


@dataclass(frozen=True)
class StopRule:
    """What ends a sequence besides max_new_tokens. eos_ids: token ids (the tokenizer's eos and the
    end markers it knows: testbed.accuracy.end_token_ids). stops: strings matched in the decoded
    completion. tokenizer: what decodes ids to text (needed with stops): a model spec for
    agents.models.load_tokenizer (a string, or a dict as JSON text), or an object with decode()."""

    eos_ids: frozenset[int] = frozenset()
    stops: tuple[str, ...] = ()
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_ids", frozenset(int(i) for i in self.eos_ids))
        object.__setattr__(self, "stops", tuple(self.stops))
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError(f"stop sequences must be non-empty strings, got {list(self.stops)!r}")
        if self.stops and self.tokenizer is None:
            raise ValueError("stop sequences need a tokenizer to decode the completion")

    @property
    def active(self) -> bool:
        return bool(self.eos_ids or self.stops)

    def detector(self) -> StopDetector | None:
        """A fresh detector for one sequence (None when nothing but length ends it)."""
        if not self.active:
            return None
        return StopDetector(self, tokenizer_of(self.tokenizer) if self.stops else None)


_TOKENIZERS: dict[str, Any] = {}


def tokenizer_of(spec: Any):
    """The tokenizer a StopRule names (loaded once per process)."""
    if hasattr(spec, "decode"):
        return spec
    key = json.dumps(spec, sort_keys=True) if isinstance(spec, dict) else str(spec)
    if key not in _TOKENIZERS:
        from agents.models import load_tokenizer

        _TOKENIZERS[key] = load_tokenizer(json.loads(key) if key.startswith("{") else key)
    return _TOKENIZERS[key]


def _decode(tokenizer, ids: list[int]) -> str:
    # skip_special_tokens, as testbed.accuracy decodes a completion: the two must see the same text
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(ids)


class StopDetector:
    """One sequence's stop state: push each committed token in order; the reason it ends there
    ("eos", "stop") or "". Keeps the ids since the last emitted character and the last
    len(longest stop) - 1 characters of text (a stop found must end in the new text)."""

    __slots__ = ("eos", "stops", "tokenizer", "ids", "n_prefix", "text", "keep")

    def __init__(self, rule: StopRule, tokenizer):
        self.eos, self.stops, self.tokenizer = rule.eos_ids, rule.stops, tokenizer
        self.ids: list[int] = []  # the last emitted piece's ids, then those whose text is not emitted yet
        self.n_prefix = 0  # how many of ids are the last emitted piece's
        self.text = ""  # the tail of the completion's text that a stop found next could start in
        self.keep = max((len(s) for s in self.stops), default=1) - 1

    def push(self, token: int) -> str:
        token = int(token)
        if token in self.eos:
            return EOS
        if not self.stops:
            return ""
        # ids = [the last emitted piece's ids] + [ids not emitted yet]: decoding from the piece before
        # gives the new text its context (a leading space, a character's first bytes).
        self.ids.append(token)
        n = self.n_prefix
        old = _decode(self.tokenizer, self.ids[:n]) if n else ""
        new = _decode(self.tokenizer, self.ids)
        if len(new) <= len(old) or new.endswith("\ufffd"):  # an incomplete character: wait for its bytes
            return ""
        delta = new[len(old) :]
        self.ids = self.ids[n:]
        self.n_prefix = len(self.ids)
        tail = self.text + delta
        self.text = tail[len(tail) - self.keep :] if self.keep else ""
        return STOP if any(s in tail for s in self.stops) else ""
