"""The N longest functions (and methods, nested ones included) of the project's source, by lines.

python scripts/longest_functions.py [N] [--all]    # --all: tests and scripts too
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("agents", "policies", "netem", "testbed")


def functions(root: Path, everything: bool) -> list[tuple[int, str]]:
    dirs = [root / p for p in PACKAGES] + ([root / "tests", root / "scripts"] if everything else [])
    out = []
    for path in sorted(f for d in dirs for f in d.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 10
    for lines, where in functions(Path(__file__).resolve().parent.parent, "--all" in sys.argv)[:n]:
        print(f"{lines:5d}  {where}")
