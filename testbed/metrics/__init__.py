"""Live metrics (docs/design.md section 4, "Metrics"), one concern a module:

- definitions: every exported metric, and the PromQL of each derived figure next to them (DERIVED);
- promql: the query builder (Sel);
- aggregation: the Collector that folds the run's events (agents.events), its Snapshot and TierTotals;
- exporter: the Prometheus registry, the scrape-time gauges and the HTTP /metrics endpoint.

What the rest of the testbed uses is importable from here (``from testbed.metrics import Collector,
DERIVED, Sel``); one metric by name from its module (``testbed.metrics.definitions.TOKENS_COMMITTED``).
"""

from testbed.metrics.aggregation import (
    DEFAULT_WINDOW_S,
    Clock,
    Collector,
    CollectorState,
    Snapshot,
    TierTotals,
    verifier_label,
)
from testbed.metrics.definitions import DERIVED, METRICS, RUN_LABELS, TIER_LABELS, VERIFIER_LABELS, Derived, Metric
from testbed.metrics.exporter import DEFAULT_METRICS_PORT, Exporter, free_port
from testbed.metrics.promql import Sel

__all__ = [
    "Clock",
    "Collector",
    "CollectorState",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_WINDOW_S",
    "DERIVED",
    "Derived",
    "Exporter",
    "METRICS",
    "Metric",
    "RUN_LABELS",
    "Sel",
    "Snapshot",
    "TIER_LABELS",
    "TierTotals",
    "VERIFIER_LABELS",
    "free_port",
    "verifier_label",
]
