"""Scenario files: YAML in (with a field path -> line index, so errors name the line), YAML out,
and the bundled scenarios (testbed/scenarios/<name>.yaml, package data of `testbed`).

load_scenario(path or bundled name) = scenario_path + read_yaml + parse_scenario;
dump_scenario writes the fully resolved form, which loads back to the same Scenario.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from testbed.config.errors import Problem, ScenarioError, problems_of
from testbed.config.schema import Scenario


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _line_index(node, path: str = "", out: dict | None = None) -> dict[str, int]:
    """Field path -> 1-based line, from the YAML node tree."""
    out = {} if out is None else out
    if node is None:
        return out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            sub = f"{path}.{k.value}" if path else str(k.value)
            out[sub] = k.start_mark.line + 1
            _line_index(v, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_index(v, f"{path}[{i}]", out)
    return out


def read_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML text -> (data, field path -> line). Syntax errors name file and line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        col = f", column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e)
        ctx = getattr(e, "context", None)
        raise ScenarioError(
            [
                Problem(
                    "",
                    f"YAML syntax error{' at line ' + str(line) + col if line else ''}: "
                    f"{what}{' (' + ctx + ')' if ctx else ''}",
                    line,
                )
            ],
            source,
        ) from None
    finally:
        loader.dispose()
    return data, _line_index(node)


def bundled_dir() -> Path:
    return Path(str(resources.files("testbed") / "scenarios"))


def bundled_scenarios() -> list[str]:
    """Names of the scenarios shipped with the package (testbed/scenarios/<name>.yaml)."""
    return sorted(p.stem for p in bundled_dir().glob("*.yaml"))


def scenario_path(path_or_name: str | Path) -> Path:
    """A file path, or a bundled name resolved to testbed/scenarios/<name>.yaml."""
    p = Path(path_or_name).expanduser()
    looks_like_file = isinstance(path_or_name, Path) or p.suffix in (".yaml", ".yml") or len(p.parts) > 1
    if looks_like_file or p.is_file():
        if not p.is_file():
            raise ScenarioError([Problem("", f"file not found: {p}")], str(path_or_name))
        return p
    bundled = bundled_dir() / f"{path_or_name}.yaml"
    if bundled.is_file():
        return bundled
    raise ScenarioError(
        [
            Problem(
                "",
                f"no scenario file or bundled scenario named {str(path_or_name)!r} "
                f"(bundled: {', '.join(bundled_scenarios())})",
            )
        ]
    )


def parse_scenario(
    data: Any, *, source: str | None = None, base_dir: str | Path | None = None, lines: dict[str, int] | None = None
) -> Scenario:
    """Validate already-parsed data. Relative prompt files resolve against base_dir (default: cwd)."""
    if not isinstance(data, dict):
        got = "an empty document" if data is None else type(data).__name__
        raise ScenarioError(
            [Problem("", f"expected a mapping of scenario fields, got {got}", 1 if lines else None)], source
        )
    try:
        return Scenario.model_validate(data, context={"base_dir": str(base_dir) if base_dir else None})
    except ValidationError as e:
        raise ScenarioError(problems_of(e, Scenario, lines), source) from None


def load_scenario(path_or_name: str | Path) -> Scenario:
    """Load and validate a scenario file or a bundled scenario by name (see bundled_scenarios())."""
    path = scenario_path(path_or_name)
    source = str(path_or_name) if path.parent == bundled_dir() else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError([Problem("", f"cannot read: {e}")], source) from None
    data, lines = read_yaml(text, source)
    return parse_scenario(data, source=source, base_dir=path.parent, lines=lines)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, text: str):
    # Prompts are code: write multi-line strings as literal blocks, readable and exact.
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def scenario_yaml(s: Scenario) -> str:
    """The fully resolved scenario as YAML text."""
    return yaml.dump(s.resolved_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def dump_scenario(s: Scenario, path: str | Path) -> Path:
    """Write the fully resolved scenario (defaults filled); load_scenario(path) == s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved hlm-testbed scenario: every default filled in; `testbed run` this file to repeat the run.\n"
    path.write_text(header + scenario_yaml(s), encoding="utf-8")
    return path
