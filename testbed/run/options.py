"""What a caller asks of one run, besides the scenario: where results go, which engine, which sinks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RunOptions:
    out_dir: Path
    engine: str = "ray"  # ray | local
    address: str | None = None  # join this Ray cluster (None: a new local Ray)
    progress: bool = True
    report: bool = True
    # Prometheus exporter, as the scenario's metrics.port/host: None = off, 0 (or -1) = any free port.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    linger_s: float = 0.0
    collector: object | None = None  # a testbed.metrics.Collector to feed (else one is made for metrics_port)
    profile: bool = False  # also time the compute limit (testbed.profile) after the run
    accuracy: bool = True  # HumanEval prompts: score pass@1 by executing the tests (testbed.accuracy)
    # The Ray engine's driver: a callable (plan, options, sinks, ray_owned, ray_s) -> RayDriver, by
    # default RayDriver itself. Fault-injection tests pass a subclass (tests/testbed/chaos.py).
    driver: Callable[..., Any] | None = None
    # Virtual clock: save the run's content record as a new recording of this content library
    # (testbed.content.library; `testbed content record`), named `recording` (None: scenario, seed, time).
    save_content: Path | None = None
    recording: str | None = None
    command: str | None = None  # the command line that made the run (a recording's provenance)
