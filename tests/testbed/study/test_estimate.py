"""testbed.study.estimate: token-steps of a batch whose devices stop at different lengths."""

from __future__ import annotations

import pytest

from testbed.study import estimate


def test_batch_steps():
    # one tile: the longest completion; more devices than a tile: the tiles still busy at each step
    assert estimate.batch_steps([5, 80, 30]) == 80
    assert estimate.batch_steps([10] * 17) == 20 and estimate.batch_steps([10] * 16 + [30]) == 10 * 2 + 20
    assert estimate.batch_steps([]) == 0
    # a device that never stops keeps its tile for the whole budget: expected over P(none of 16) = (15/16)^16
    none = (15 / 16) ** 16
    assert estimate.point_steps([40] * 16, 256, 0) == pytest.approx(none * 40 + (1 - none) * 256)
    assert estimate.point_steps([40] * 16, 256, 1) == 256 and estimate.point_steps([], 256, 0) == 0
