from __future__ import annotations


def run() -> None:
    """Run a scenario."""
    raise SystemExit(2)

