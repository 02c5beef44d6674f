"""A study as resumable points: each point is one run directory (OUT/points/<name>, the calibration's
OUT/calibration), run at most once and read back when finished.

A point is finished when its point.json (written last) names the same scenario (sha256 of its
resolved YAML) and its summary.json is complete (every token, not interrupted, and the accuracy block
when it is scored). A finished point is read back, never recomputed; anything else (a run cut short, a
changed parameter) is deleted and run again. One line per point is logged:
[done/total] name: ran|cached in s (elapsed s).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from testbed.scenario import Scenario, scenario_yaml
from testbed.study.calibration import calibrate_point
from testbed.study.fit import Fit
from testbed.study.scenarios import scenario_hash
from testbed.study.sizes import DEFAULT_ETA, DEFAULT_THETA


@dataclass
class Point:
    name: str  # directory under points/ (or "calibration")
    group: str  # calibration | policy | u_th | theta | fleet
    label: str  # shown in tables
    build: Callable[[Study], Scenario]
    policy: str = ""  # preset name
    meta: dict = field(default_factory=dict)  # u_th, theta, risk, fleet_size (filled by build)
    scored: bool = True  # HumanEval pass@1 relative to the reference


class Study:
    """Runs points in order, each at most once (resumable, module docstring), one log line per point."""

    def __init__(self, out: Path, engine: str = "local", log: Callable[[str], None] | None = None, total: int = 0):
        self.out = Path(out)
        self.engine = engine
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.total = total
        self.done = 0
        self.t0 = time.time()
        self.summaries: dict[str, dict] = {}
        self.statuses: dict[str, str] = {}
        self.calibration: dict | None = None
        self.fit: Fit | None = None
        self.reference: Path | None = None
        self.llm_ms: float | None = None  # paper study: the LLM step charged on each downlink
        self.setting_text = ""  # paper study: the devices' links as the scenario states them

    def point_dir(self, name: str) -> Path:
        return self.out / ("calibration" if name == "calibration" else f"points/{name}")

    def _line(self, name: str, status: str, seconds: float) -> None:
        self.done += 1
        self.statuses[name] = status
        self.log(
            f"[{self.done:>{len(str(self.total))}}/{self.total}] {name}: {status} in {seconds:.1f} s "
            f"(elapsed {time.time() - self.t0:.1f} s)"
        )

    @staticmethod
    def finished(d: Path, digest: str, scored: bool, with_reference: bool, summary_file: str = "summary.json") -> bool:
        try:
            mark = json.loads((d / "point.json").read_text(encoding="utf-8"))
            summary = json.loads((d / summary_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if mark.get("scenario_sha256") != digest:
            return False
        if summary_file != "summary.json":
            return True
        if not summary.get("complete") or summary.get("interrupted"):
            return False
        if scored:
            acc = summary.get("accuracy")
            if not acc or (with_reference and ("pass_at_1_relative" not in acc or "paired" not in acc)):
                return False
        return True

    def _mark(self, d: Path, digest: str, seconds: float) -> None:
        tmp = d / "point.json.tmp"
        tmp.write_text(
            json.dumps(
                {
                    "scenario_sha256": digest,
                    "seconds": round(seconds, 3),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            ),
            encoding="utf-8",
        )
        tmp.replace(d / "point.json")

    def run_calibration(self, s: Scenario, kstar_tokens: int) -> dict:
        d = self.point_dir("calibration")
        digest = hashlib.sha256(
            (scenario_yaml(s) + f"\nkstar_tokens={kstar_tokens} theta={DEFAULT_THETA} eta={DEFAULT_ETA}").encode()
        ).hexdigest()
        t = time.time()
        if self.finished(d, digest, False, False, "calibration.json"):
            doc, status = json.loads((d / "calibration.json").read_text(encoding="utf-8")), "cached"
        else:
            if d.exists():
                shutil.rmtree(d)
            doc = calibrate_point(s, d, kstar_tokens)
            self._mark(d, digest, time.time() - t)
            status = "ran"
        self._line("calibration", status, time.time() - t)
        self.calibration = doc
        return doc

    def run_point(self, point: Point) -> dict:
        from testbed.run import RunOptions, run_scenario

        s = point.build(self)
        d = self.point_dir(point.name)
        humaneval = s.prompts.source == "humaneval"
        scored = point.scored and humaneval
        with_ref = scored and self.reference is not None and self.reference != d
        digest = scenario_hash(s)
        t = time.time()
        if self.finished(d, digest, scored, with_ref):
            status = "cached"
        else:
            if d.exists():
                shutil.rmtree(d)
            run_scenario(s, RunOptions(out_dir=d, engine=self.engine, progress=False, report=False, accuracy=False))
            if scored:
                from testbed.accuracy import score_run

                score_run(d, reference=self.reference if with_ref else None, progress=False)
            self._mark(d, digest, time.time() - t)
            status = "ran"
        self.summaries[point.name] = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        self._line(point.name, status, time.time() - t)
        return self.summaries[point.name]


@dataclass
class StudyResult:
    """What `testbed reproduce` prints: the report, the table rows, the fit and how each point went."""

    out: Path
    report: Path
    rows: list[dict]
    fit: Fit
    statuses: dict[str, str]
