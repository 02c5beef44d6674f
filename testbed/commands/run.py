from __future__ import annotations


def run() -> None:
    """Run a scenario."""
    raise SystemExit(2)


def validate() -> None:
    """Validate a scenario file without running it."""
    raise SystemExit(2)
