"""testbed.study.points: when a point counts as finished (resumability)."""

from __future__ import annotations

import json

from testbed.study.points import Study


def test_finished_needs_matching_scenario(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    acc = {"pass_at_1_relative": 1.0, "paired": {}}
    (d / "summary.json").write_text(json.dumps({"complete": True, "accuracy": acc}))
    st = Study(tmp_path)
    st._mark(d, "abc", 1.0)
    assert Study.finished(d, "abc", True, True)
    assert not Study.finished(d, "other", True, True)  # a changed parameter is recomputed
    (d / "summary.json").write_text(json.dumps({"complete": True, "accuracy": {"pass_at_1_relative": 1.0}}))
    assert not Study.finished(d, "abc", True, True)  # scored before the paired comparison existed
    (d / "summary.json").write_text(json.dumps({"complete": True}))
    assert not Study.finished(d, "abc", True, False)  # scored points need their accuracy block
    assert Study.finished(d, "abc", False, False)
