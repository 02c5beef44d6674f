"""Shared by the study tests."""

from __future__ import annotations

from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def _figures_ok(report: Path, names: list[str]) -> str:
    page = report.read_text(encoding="utf-8")
    for name in names:
        png = report.parent / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000, png
        assert png.read_bytes()[:8] == PNG, png
        assert f'data-plot="{name}.png"' in page, name
    assert page.count('src="data:image/png;base64,') == len(names)
    return page


@pytest.fixture
def figures_ok():
    """Every named figure is a PNG in the report's folder and embedded in its page once; returns the page."""
    return _figures_ok
