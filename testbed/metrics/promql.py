"""The PromQL builder: `Sel` says how a derived figure (testbed.metrics.definitions.DERIVED) is
selected and grouped, and writes the queries the dashboards and tests run (docs/design.md
section 4, "Metrics": a figure per emulated second divides by hlm_emulated_time_seconds)."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.metrics.definitions import EMULATED_TIME, METRICS, Metric

_METRIC_BY_NAME = {m.name: m for m in METRICS}


@dataclass(frozen=True)
class Sel:
    """How a derived figure is selected and grouped.

    `window` is a PromQL range (``5m``, Grafana's ``$__rate_interval``) for figures over the
    recent past, or None for the whole run so far (cumulative counters). `by` are the labels
    kept (``scenario`` is always kept). Label values are regexes (Grafana variables by default).
    """

    by: tuple[str, ...] = ()
    window: str | None = "$__rate_interval"
    scenario: str = "$scenario"
    tier: str = "$tier"
    policy: str = "$policy"

    def _by(self, m: Metric, extra: tuple[str, ...] = ()) -> str:
        keep = ["scenario"] + [b for b in self.by if b != "scenario" and b in m.labels]
        return ", ".join(keep + list(extra))

    def series(self, m: Metric | str, suffix: str = "") -> str:
        m = _METRIC_BY_NAME[str(m)]
        values = {"scenario": self.scenario, "tier": self.tier, "policy": self.policy}
        # labels with no dashboard variable (reason) are not matched: every value counts
        matchers = ", ".join(f'{lbl}=~"{values[lbl]}"' for lbl in m.labels if lbl in values)
        return f"{m.name}{suffix}{{{matchers}}}"

    def inc(self, m: Metric, suffix: str = "") -> str:
        """Increase of a counter over the window (or its value, whole run)."""
        s = self.series(m, suffix)
        return f"increase({s}[{self.window}])" if self.window else s

    def sum(self, m: Metric, suffix: str = "") -> str:
        return f"sum by ({self._by(m)}) ({self.inc(m, suffix)})"

    def emulated_elapsed(self) -> str:
        """Emulated seconds elapsed over the window (whole run: emulated time reached)."""
        s = self.series(EMULATED_TIME)
        inner = f"delta({s}[{self.window}])" if self.window else s
        return f"max by (scenario) ({inner})"

    def per_emulated_second(self, expr: str) -> str:
        """`expr` (an increase, grouped with scenario kept) per emulated second."""
        return f"{expr} / on (scenario) group_left () {self.emulated_elapsed()}"

    def quantile(self, q: float, m: Metric) -> str:
        return f"histogram_quantile({q}, sum by ({self._by(m, ('le',))}) ({self.inc(m, '_bucket')}))"

    def mean(self, m: Metric) -> str:
        """Mean of a histogram's observations."""
        return f"{self.sum(m, '_sum')} / {self.sum(m, '_count')}"

    def heatmap(self, m: Metric) -> str:
        """Bucket increases for a Grafana heatmap (format heatmap, legend {{le}})."""
        return f"sum by (le) ({self.inc(m, '_bucket')})"
