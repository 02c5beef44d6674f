"""Scenario errors: Problem (field path, message, line), ScenarioError, and the translation
of pydantic's errors into them.

Every problem names the field path (`tiers[1].link.uplink.rate_mbps`), what was expected and,
when the scenario came from a file, its line (line_of, from the index testbed.config.io builds).
Validators raise fail()/fail_many(): one pydantic error that can carry problems at sub-paths
below the validated field. Nothing here knows the scenario's fields: callers pass the model.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError


def fail(message: str, *subpath: str | int) -> PydanticCustomError:
    """A validation error; `subpath` extends the field path below the validated field."""
    return fail_many([(subpath, message)])


def fail_many(problems: list[tuple[tuple, str]]) -> PydanticCustomError:
    # pydantic fixes an error's location at the validated field; the formatter reads the
    # deeper sub-paths back out of ctx so errors still name e.g. `link.uplink.rate_mbps`.
    text = "; ".join(m for _, m in problems)
    return PydanticCustomError("scenario", "{message}", {"message": text, "problems": problems})


@dataclass(frozen=True)
class Problem:
    path: str  # e.g. tiers[1].link.uplink.rate_mbps ("" = the whole document)
    message: str
    line: int | None = None  # 1-based line in `source`, when known


class ScenarioError(ValueError):
    """Everything wrong with a scenario, each problem with its field path (and file:line)."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__(self._text())

    def _text(self) -> str:
        n = len(self.problems)
        head = f"invalid scenario{' ' + self.source if self.source else ''}: {n} problem{'s' * (n != 1)}"
        lines = []
        for p in self.problems:
            where = f"{self.source}:{p.line}: " if self.source and p.line else ""
            lines.append(f"  {where}{p.path + ': ' if p.path else ''}{p.message}")
        return "\n".join([head, *lines])


def format_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _unwrap(t: Any) -> Any:
    """X from X | None, Annotated[X, ...]."""
    while True:
        if typing.get_origin(t) is Annotated:
            t = typing.get_args(t)[0]
        elif typing.get_origin(t) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(t) if a is not type(None)]
            if len(args) != 1:
                return t
            t = args[0]
        else:
            return t


def fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model at `loc` below `model` (for 'unknown field' messages and override keys)."""
    t: Any = model
    for part in loc:
        t = _unwrap(t)
        if isinstance(part, int) and typing.get_origin(t) is list:
            t = typing.get_args(t)[0]
        elif isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            t = t.model_fields[part].annotation
        else:
            return []
    t = _unwrap(t)
    return list(t.model_fields) if isinstance(t, type) and issubclass(t, BaseModel) else []


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


_MESSAGES = {
    "missing": lambda c: "required field missing",
    "greater_than": lambda c: f"expected a value > {_n(c['gt'])}",
    "greater_than_equal": lambda c: f"expected a value >= {_n(c['ge'])}",
    "less_than": lambda c: f"expected a value < {_n(c['lt'])}",
    "less_than_equal": lambda c: f"expected a value <= {_n(c['le'])}",
    "int_parsing": lambda c: "expected an integer",
    "int_type": lambda c: "expected an integer",
    "int_from_float": lambda c: "expected an integer",
    "float_parsing": lambda c: "expected a number",
    "float_type": lambda c: "expected a number",
    "finite_number": lambda c: "expected a finite number",
    "string_type": lambda c: "expected a string",
    "list_type": lambda c: "expected a list",
    "dict_type": lambda c: "expected a mapping",
    "model_type": lambda c: "expected a mapping",
    "model_attributes_type": lambda c: "expected a mapping",
    "too_short": lambda c: f"expected at least {c['min_length']} item(s)",
    "string_too_short": lambda c: "expected a non-empty string",
    "literal_error": lambda c: f"expected one of {c['expected']}",
    "string_pattern_mismatch": lambda c: (
        "expected a name of letters, digits and . _ - = + (starting with a letter or digit)"
    ),
}


def problems_of(
    err: ValidationError, model: type[BaseModel], lines: dict[str, int] | None = None, prefix: tuple = ()
) -> list[Problem]:
    """The Problems of a pydantic error raised validating `model`; `prefix` is the path of that
    model in a scenario (("prompts",) for a Prompts), `lines` the YAML's path -> line index."""
    out = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        ctx = e.get("ctx") or {}
        if e["type"] == "scenario":
            items = [(loc + tuple(sub), msg) for sub, msg in ctx["problems"]]
        elif e["type"] == "extra_forbidden":
            fields = fields_at(model, tuple(e["loc"])[:-1])
            close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            items = [(loc, f"unknown field{hint}; expected one of: {', '.join(fields)}" if fields else "unknown field")]
        else:
            msg = _MESSAGES[e["type"]](ctx) if e["type"] in _MESSAGES else e["msg"]
            x = e.get("input")
            if e["type"] != "missing" and (x is None or isinstance(x, (str, int, float, bool))):
                msg += f", got {x!r}"
            items = [(loc, msg)]
        for parts, msg in items:
            path = format_path(parts)
            out.append(Problem(path, msg, line_of(path, lines)))
    return out


def line_of(path: str, lines: dict[str, int] | None) -> int | None:
    """Line of `path` in the YAML, or of its nearest ancestor that is written there."""
    if not lines:
        return None
    while path:
        if path in lines:
            return lines[path]
        path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path) if re.search(r"(\.|\[)", path) else ""
    return lines.get("")
