"""Grafana dashboards as code, and the provisioning tree around them.

Panels and their targets are typed declarations (`Panel`, `Target`); `Dashboard.render()`
turns them into Grafana JSON (schemaVersion 39, Grafana 10/11). Every query is built from the
PromQL of `testbed.metrics` (`DERIVED` figures or metric names), so a renamed metric breaks the
unit tests, not the dashboards. The rendered JSON is committed under grafana/dashboards/ and a
test checks it equals what this module renders (`testbed dashboards export grafana` rewrites it).

Variables: ``datasource`` (a Prometheus data source), ``scenario``, ``tier``, ``policy``
(multi-value, "All" = ``.*``); every query filters with ``=~"$var"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from testbed.metrics import DEFAULT_METRICS_PORT, DERIVED, Sel
from testbed.metrics import definitions as M

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000
SCRAPE_INTERVAL = "2s"


# ---------------------------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    format: Literal["time_series", "heatmap", "table"] = "time_series"
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    kind: Literal["timeseries", "stat", "heatmap", "bargauge"] = "timeseries"
    unit: str = "short"
    description: str = ""
    width: int = 8
    height: int = 8
    min: float | None = None
    max: float | None = None
    decimals: int | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    query: str


def _default_variables() -> tuple[Variable, ...]:
    base = M.TOKENS_COMMITTED.name
    return (
        Variable("scenario", "Scenario", f"label_values({base}, scenario)"),
        Variable("tier", "Tier", f'label_values({base}{{scenario=~"$scenario"}}, tier)'),
        Variable("policy", "Policy", f'label_values({base}{{scenario=~"$scenario", tier=~"$tier"}}, policy)'),
    )


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    variables: tuple[Variable, ...] = field(default_factory=_default_variables)
    tags: tuple[str, ...] = ("hlm-testbed",)
    refresh: str = "5s"
    time_from: str = "now-15m"

    def panels(self) -> Iterator[Panel]:
        for row in self.rows:
            yield from row.panels

    def targets(self) -> Iterator[tuple[Panel, Target]]:
        for p in self.panels():
            for t in p.targets:
                yield p, t

    def render(self) -> dict:
        out_panels: list[dict] = []
        next_id = 1
        y = 0
        for row in self.rows:
            out_panels.append(
                {
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "id": next_id,
                    "panels": [],
                    "title": row.title,
                    "type": "row",
                }
            )
            next_id += 1
            y += 1
            x, row_h = 0, 0
            for p in row.panels:
                if x + p.width > 24:
                    x, y, row_h = 0, y + row_h, 0
                out_panels.append(_render_panel(p, next_id, {"h": p.height, "w": p.width, "x": x, "y": y}))
                next_id += 1
                x += p.width
                row_h = max(row_h, p.height)
            y += row_h
        return {
            "annotations": {"list": []},
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "id": None,
            "links": [],
            "panels": out_panels,
            "refresh": self.refresh,
            "schemaVersion": 39,
            "tags": list(self.tags),
            "templating": {"list": [_datasource_variable()] + [_render_variable(v) for v in self.variables]},
            "time": {"from": self.time_from, "to": "now"},
            "timepicker": {},
            "timezone": "browser",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
        }

    def to_json(self) -> str:
        return json.dumps(self.render(), indent=2) + "\n"


def _datasource_variable() -> dict:
    return {
        "current": {},
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "type": "datasource",
    }


def _render_variable(v: Variable) -> dict:
    return {
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": DATASOURCE,
        "definition": v.query,
        "hide": 0,
        "includeAll": True,
        "label": v.label,
        "multi": True,
        "name": v.name,
        "options": [],
        "query": v.query,  # classic label_values() string: accepted by Grafana 9 to 11
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "type": "query",
    }


def _render_panel(p: Panel, pid: int, grid: dict) -> dict:
    defaults: dict = {"unit": p.unit}
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    if p.decimals is not None:
        defaults["decimals"] = p.decimals
    reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if p.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 10,
            "lineWidth": 1,
            "showPoints": "never",
            "spanNulls": True,
        }
        options = {
            "legend": {
                "calcs": ["lastNotNull", "mean"],
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif p.kind == "stat":
        options = {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": reduce,
            "textMode": "auto",
        }
    elif p.kind == "bargauge":
        options = {
            "displayMode": "gradient",
            "orientation": "horizontal",
            "reduceOptions": reduce,
            "showUnfilled": True,
            "valueMode": "color",
        }
    elif p.kind == "heatmap":
        options = {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "legend": {"show": True},
            "tooltip": {"mode": "single", "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "unit": p.unit},
            "rowsFrame": {"layout": "auto"},
        }
    else:  # pragma: no cover - Literal guards this
        raise ValueError(p.kind)
    targets = []
    for i, t in enumerate(p.targets):
        targets.append(
            {
                "datasource": DATASOURCE,
                "editorMode": "code",
                "expr": t.expr,
                "format": t.format,
                "instant": t.instant,
                "legendFormat": t.legend or "__auto",
                "range": not t.instant,
                "refId": chr(ord("A") + i),
            }
        )
    return {
        "datasource": DATASOURCE,
        "description": p.description,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "gridPos": grid,
        "id": pid,
        "options": options,
        "targets": targets,
        "title": p.title,
        "type": p.kind,
    }


# ---------------------------------------------------------------------------------------------
# Helpers building targets from testbed.metrics
# ---------------------------------------------------------------------------------------------
def d(name: str, by: tuple[str, ...] = (), legend: str = "", *, window: bool = True, instant: bool = False) -> Target:
    """Target of a derived figure of testbed.metrics.DERIVED."""
    sel = Sel(by=by) if window else Sel(by=by, window=None)
    return Target(DERIVED[name].expr(sel), legend=legend, instant=instant)


def g(metric: M.Metric, by: tuple[str, ...] = (), legend: str = "", agg: str = "sum", instant: bool = False) -> Target:
    """Target of a gauge (or raw counter value), aggregated over the labels not in `by`."""
    keep = ", ".join(["scenario"] + [b for b in by if b in metric.labels])
    return Target(f"{agg} by ({keep}) ({Sel().series(metric)})", legend=legend, instant=instant)


def heat(metric: M.Metric) -> Target:
    return Target(Sel().heatmap(metric), legend="{{le}}", format="heatmap")


TIER = ("tier", "policy")
TIER_LEGEND = "{{tier}} ({{policy}})"
POLICY = ("policy",)


def whole_run(title: str, figure: str, unit: str, description: str = "", **kw: Any) -> Panel:
    """A bar per policy of a derived figure over the whole run so far (not a rate window)."""
    target = d(figure, POLICY, "{{policy}}", window=False, instant=True)
    return Panel(title, (target,), "bargauge", unit, description, width=8, **kw)


def _unit(name: str) -> str:
    return DERIVED[name].unit


def _help(*names: str) -> str:
    return " ".join(f"{DERIVED[n].help}" for n in names)


# ---------------------------------------------------------------------------------------------
# The dashboards
# ---------------------------------------------------------------------------------------------
RATE_NOTE = (
    "Per emulated second: increase of the counter divided by the increase of hlm_emulated_time_seconds "
    "over the same range (right in both clocks)."
)

OVERVIEW = Dashboard(
    uid="hlm-overview",
    title="HLM testbed: overview",
    description="Live view of a hybrid language model emulation: throughput, uploads, accuracy, uplink cost, latency, "
    "fairness and the verifier. Times are emulated seconds unless the title says wall.",
    rows=(
        Row(
            "Run",
            (
                Panel("Emulated time", (g(M.EMULATED_TIME, agg="max"),), "stat", "s", width=4, height=4),
                Panel("Wall time", (g(M.WALL_TIME, agg="max"),), "stat", "s", width=4, height=4),
                Panel(
                    "Lag (wall clock)",
                    (g(M.LAG, agg="max"),),
                    "stat",
                    "s",
                    "Real seconds behind schedule.",
                    width=4,
                    height=4,
                ),
                Panel("Tokens committed", (g(M.TOKENS_COMMITTED),), "stat", "short", width=4, height=4),
                Panel(
                    "Throughput (run)",
                    (d("throughput", window=False),),
                    "stat",
                    "short",
                    "Tokens per emulated second over the whole run so far.",
                    width=4,
                    height=4,
                ),
                Panel(
                    "Jain fairness (run)",
                    (g(M.JAIN_RUN, agg="max"),),
                    "stat",
                    "percentunit",
                    M.JAIN_RUN.help,
                    width=4,
                    height=4,
                    min=0,
                    max=1,
                    decimals=3,
                ),
            ),
        ),
        Row(
            "Throughput",
            (
                Panel(
                    "Throughput (tokens / emulated s)",
                    (d("throughput", (), "system"), d("throughput", TIER, TIER_LEGEND)),
                    unit="short",
                    description=RATE_NOTE,
                ),
                Panel(
                    "Throughput, collector window (tokens / emulated s)",
                    (g(M.TIER_THROUGHPUT, TIER, TIER_LEGEND),),
                    unit="short",
                    description=M.TIER_THROUGHPUT.help,
                ),
                Panel(
                    "Emulation speed",
                    (d("emulation_speed", (), "emulated s / wall s"),),
                    unit="short",
                    description=DERIVED["emulation_speed"].help,
                ),
                Panel(
                    "Tokens / wall s",
                    (d("wall_throughput", TIER, TIER_LEGEND),),
                    unit="short",
                    description=DERIVED["wall_throughput"].help,
                ),
                Panel(
                    "Active devices",
                    (g(M.ACTIVE_DEVICES, TIER, TIER_LEGEND),),
                    unit="short",
                    description=M.ACTIVE_DEVICES.help,
                ),
                Panel("Lag", (g(M.LAG, agg="max", legend="lag"),), unit="s", description=M.LAG.help),
            ),
        ),
        Row(
            "Uploads and accuracy",
            (
                Panel(
                    "Skip rate",
                    (d("skip_rate", TIER, TIER_LEGEND),),
                    unit="percentunit",
                    min=0,
                    max=1,
                    description=_help("skip_rate"),
                    width=6,
                ),
                Panel(
                    "Acceptance rate",
                    (d("acceptance_rate", TIER, TIER_LEGEND),),
                    unit="percentunit",
                    min=0,
                    max=1,
                    description=_help("acceptance_rate"),
                    width=6,
                ),
                Panel(
                    "Vocabulary compression",
                    (d("vocab_compression", TIER, TIER_LEGEND),),
                    unit="percentunit",
                    min=0,
                    max=1,
                    description=_help("vocab_compression"),
                    width=6,
                ),
                Panel(
                    "Entries per upload (mean k)",
                    (d("mean_k", TIER, TIER_LEGEND),),
                    unit="short",
                    description=_help("mean_k"),
                    width=6,
                ),
                Panel(
                    "Fidelity: TV to the LLM per token (mean)",
                    (d("mean_fidelity_tv", TIER, TIER_LEGEND),),
                    unit="short",
                    min=0,
                    description=_help("mean_fidelity_tv") + " " + M.FIDELITY.help,
                    width=12,
                ),
            ),
        ),
        Row(
            "Uplink",
            (
                Panel(
                    "Uplink bytes / emulated s",
                    (d("uplink_bytes_rate", (), "system"), d("uplink_bytes_rate", TIER, TIER_LEGEND)),
                    unit="Bps",
                    description=_help("uplink_bytes_rate") + " " + RATE_NOTE,
                    width=6,
                ),
                Panel(
                    "Uplink bytes per token",
                    (d("uplink_bytes_per_token", TIER, TIER_LEGEND),),
                    unit="bytes",
                    description=_help("uplink_bytes_per_token"),
                    width=6,
                ),
                Panel(
                    "Link bytes / emulated s",
                    (d("wire_bytes_rate", (), "uplink (wire)"), d("downlink_bytes_rate", (), "downlink (wire)")),
                    unit="Bps",
                    description=_help("wire_bytes_rate", "downlink_bytes_rate"),
                    width=6,
                ),
                Panel(
                    "Loss and retransmissions",
                    (
                        d("loss_rate", TIER, "loss {{tier}}"),
                        d("retransmission_rate", TIER, "retransmissions/s {{tier}}"),
                    ),
                    unit="short",
                    description=_help("loss_rate", "retransmission_rate"),
                    width=6,
                ),
            ),
        ),
        Row(
            "Latency and fairness",
            (
                Panel(
                    "Token latency (emulated)",
                    (d("latency_p50", (), "p50"), d("latency_p95", (), "p95"), d("latency_p99", (), "p99")),
                    unit="s",
                    description="Draft start to commit, emulated seconds.",
                ),
                Panel("Token latency p95 per tier", (d("latency_p95", TIER, TIER_LEGEND),), unit="s"),
                Panel(
                    "Jain fairness",
                    (g(M.JAIN, agg="max", legend="window"), g(M.JAIN_RUN, agg="max", legend="run")),
                    unit="percentunit",
                    min=0,
                    max=1,
                    description=M.JAIN.help + " / " + M.JAIN_RUN.help,
                ),
            ),
        ),
        Row(
            "Verifier",
            (
                Panel(
                    "Batch size",
                    (
                        d("verifier_batch_size_mean", (), "requests / batch"),
                        d("verifier_batch_tokens_mean", (), "tokens / batch"),
                    ),
                    unit="short",
                    width=6,
                ),
                Panel("Batches / emulated s", (d("verifier_batches_rate", (), "batches/s"),), unit="short", width=6),
                Panel(
                    "Queue wait (emulated)",
                    (d("queue_wait_p50", (), "p50"), d("queue_wait_p95", (), "p95")),
                    unit="s",
                    width=6,
                ),
                Panel(
                    "Verifier utilisation",
                    (d("verifier_utilisation", (), "busy"),),
                    unit="percentunit",
                    min=0,
                    description=_help("verifier_utilisation"),
                    width=6,
                ),
                Panel(
                    "Protocol errors",
                    (g(M.PROTOCOL_ERRORS, legend="errors"),),
                    "stat",
                    "short",
                    M.PROTOCOL_ERRORS.help,
                    width=6,
                    height=4,
                ),
            ),
        ),
        Row(
            "Distributions",
            (
                Panel("Uncertainty u(t)", (heat(M.UNCERTAINTY),), "heatmap", "short", M.UNCERTAINTY.help, width=12),
                Panel("Entries per upload k", (heat(M.UPLOAD_K),), "heatmap", "short", M.UPLOAD_K.help, width=12),
                Panel(
                    "Payload bytes per upload",
                    (heat(M.UPLOAD_PAYLOAD),),
                    "heatmap",
                    "bytes",
                    M.UPLOAD_PAYLOAD.help,
                    width=12,
                ),
                Panel("Token latency", (heat(M.TOKEN_LATENCY),), "heatmap", "s", M.TOKEN_LATENCY.help, width=12),
                Panel(
                    "Fidelity: TV to the LLM per token",
                    (heat(M.FIDELITY),),
                    "heatmap",
                    "short",
                    M.FIDELITY.help,
                    width=12,
                ),
            ),
        ),
    ),
)

POLICIES = Dashboard(
    uid="hlm-policies",
    title="HLM testbed: policy comparison",
    description="Policies side by side: throughput against accuracy proxy (LLM acceptance) against uplink cost. "
    "Bars cover the whole run so far; time series the recent range.",
    rows=(
        Row(
            "Whole run so far",
            (
                whole_run("Throughput (tokens / emulated s)", "throughput", "short"),
                whole_run("Acceptance rate", "acceptance_rate", "percentunit", min=0, max=1),
                whole_run("Uplink bytes per token", "uplink_bytes_per_token", "bytes"),
                whole_run("Skip rate", "skip_rate", "percentunit", min=0, max=1),
                whole_run("Vocabulary compression", "vocab_compression", "percentunit", min=0, max=1),
                whole_run("Token latency p95", "latency_p95", "s"),
                whole_run(
                    "Fidelity: TV to the LLM per token (mean)",
                    "mean_fidelity_tv",
                    "short",
                    _help("mean_fidelity_tv"),
                    min=0,
                ),
            ),
        ),
        Row(
            "Uplink",
            (
                Panel(
                    "Uplink bytes / emulated s",
                    (d("uplink_bytes_rate", (), "system"), d("uplink_bytes_rate", TIER, TIER_LEGEND)),
                    unit="Bps",
                    description=_help("uplink_bytes_rate") + " " + RATE_NOTE,
                    width=6,
                ),
                Panel(
                    "Uplink bytes per token",
                    (d("uplink_bytes_per_token", TIER, TIER_LEGEND),),
                    unit="bytes",
                    description=_help("uplink_bytes_per_token"),
                    width=6,
                ),
                Panel(
                    "Link bytes / emulated s",
                    (d("wire_bytes_rate", (), "uplink (wire)"), d("downlink_bytes_rate", (), "downlink (wire)")),
                    unit="Bps",
                    description=_help("wire_bytes_rate", "downlink_bytes_rate"),
                    width=6,
                ),
                Panel(
                    "Loss and retransmissions",
                    (
                        d("loss_rate", TIER, "loss {{tier}}"),
                        d("retransmission_rate", TIER, "retransmissions/s {{tier}}"),
                    ),
                    unit="short",
                    description=_help("loss_rate", "retransmission_rate"),
                    width=6,
                ),
            ),
        ),
        Row(
            "Latency and fairness",
            (
                Panel(
                    "Token latency (emulated)",
                    (d("latency_p50", (), "p50"), d("latency_p95", (), "p95"), d("latency_p99", (), "p99")),
                    unit="s",
                    description="Draft start to commit, emulated seconds.",
                ),
                Panel("Token latency p95 per tier", (d("latency_p95", TIER, TIER_LEGEND),), unit="s"),
                Panel(
                    "Jain fairness",
                    (g(M.JAIN, agg="max", legend="window"), g(M.JAIN_RUN, agg="max", legend="run")),
                    unit="percentunit",
                    min=0,
                    max=1,
                    description=M.JAIN.help + " / " + M.JAIN_RUN.help,
                ),
            ),
        ),
        Row(
            "Verifier",
            (
                Panel(
                    "Batch size",
                    (
                        d("verifier_batch_size_mean", (), "requests / batch"),
                        d("verifier_batch_tokens_mean", (), "tokens / batch"),
                    ),
                    unit="short",
                    width=6,
                ),
                Panel("Batches / emulated s", (d("verifier_batches_rate", (), "batches/s"),), unit="short", width=6),
                Panel(
                    "Queue wait (emulated)",
                    (d("queue_wait_p50", (), "p50"), d("queue_wait_p95", (), "p95")),
                    unit="s",
                    width=6,
                ),
                Panel(
                    "Verifier utilisation",
                    (d("verifier_utilisation", (), "busy"),),
                    unit="percentunit",
                    min=0,
                    description=_help("verifier_utilisation"),
                    width=6,
                ),
                Panel(
                    "Protocol errors",
                    (g(M.PROTOCOL_ERRORS, legend="errors"),),
                    "stat",
                    "short",
                    M.PROTOCOL_ERRORS.help,
                    width=6,
                    height=4,
                ),
            ),
        ),
        Row(
            "Distributions",
            (
                Panel("Uncertainty u(t)", (heat(M.UNCERTAINTY),), "heatmap", "short", M.UNCERTAINTY.help, width=12),
                Panel("Entries per upload k", (heat(M.UPLOAD_K),), "heatmap", "short", M.UPLOAD_K.help, width=12),
                Panel(
                    "Payload bytes per upload",
                    (heat(M.UPLOAD_PAYLOAD),),
                    "heatmap",
                    "bytes",
                    M.UPLOAD_PAYLOAD.help,
                    width=12,
                ),
                Panel("Token latency", (heat(M.TOKEN_LATENCY),), "heatmap", "s", M.TOKEN_LATENCY.help, width=12),
                Panel(
                    "Fidelity: TV to the LLM per token",
                    (heat(M.FIDELITY),),
                    "heatmap",
                    "short",
                    M.FIDELITY.help,
                    width=12,
                ),
            ),
        ),
    ),
)

POLICIES = Dashboard(
    uid="hlm-policies",
    title="HLM testbed: policy comparison",
    description="Policies side by side: throughput against accuracy proxy (LLM acceptance) against uplink cost. "
    "Bars cover the whole run so far; time series the recent range.",
    rows=(
        Row(
            "Whole run so far",
            (
                Panel(
                    "Throughput (tokens / emulated s)",
                    (d("throughput", POLICY, "{{policy}}", window=False, instant=True),),
                    "bargauge",
                    "short",
                    width=8,
                ),
                Panel(
                    "Acceptance rate",
                    (d("acceptance_rate", POLICY, "{{policy}}", window=False, instant=True),),
                    "bargauge",
                    "percentunit",
                    min=0,
                    max=1,
                    width=8,
                ),
                Panel(
                    "Uplink bytes per token",
                    (d("uplink_bytes_per_token", POLICY, "{{policy}}", window=False, instant=True),),
                    "bargauge",
                    "bytes",
                    width=8,
                ),
                Panel(
                    "Skip rate",
                    (d("skip_rate", POLICY, "{{policy}}", window=False, instant=True),),
                    "bargauge",
                    "percentunit",
                    min=0,
                    max=1,
                    width=8,
                ),
                Panel(
                    "Vocabulary compression",
                    (d("vocab_compression", POLICY, "{{policy}}", window=False, instant=True),),
                    "bargauge",
                    "percentunit",
                    min=0,
                    max=1,
                    width=8,
                ),
                Panel(
                    "Token latency p95",
                    (d("latency_p95", POLICY, "{{policy}}", window=False, instant=True),),
                    "bargauge",
                    "s",
                    width=8,
                ),
                Panel(
                    "Fidelity: TV to the LLM per token (mean)",
                    (d("mean_fidelity_tv", POLICY, "{{policy}}", window=False, instant=True),),
                    "bargauge",
                    "short",
                    _help("mean_fidelity_tv"),
                    width=8,
                    min=0,
                ),
            ),
        ),
        Row(
            "Over time",
            (
                Panel(
                    "Throughput (tokens / emulated s)",
                    (d("throughput", POLICY, "{{policy}}"),),
                    unit="short",
                    description=RATE_NOTE,
                ),
                Panel(
                    "Acceptance rate", (d("acceptance_rate", POLICY, "{{policy}}"),), unit="percentunit", min=0, max=1
                ),
                Panel("Uplink bytes / emulated s", (d("uplink_bytes_rate", POLICY, "{{policy}}"),), unit="Bps"),
                Panel("Skip rate", (d("skip_rate", POLICY, "{{policy}}"),), unit="percentunit", min=0, max=1),
                Panel("Entries per upload (mean k)", (d("mean_k", POLICY, "{{policy}}"),), unit="short"),
                Panel("Token latency p95", (d("latency_p95", POLICY, "{{policy}}"),), unit="s"),
            ),
        ),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (OVERVIEW, POLICIES)


# ---------------------------------------------------------------------------------------------
# Provisioning tree (grafana/)
# ---------------------------------------------------------------------------------------------
def prometheus_config(
    targets: list[str] | tuple[str, ...] = (f"127.0.0.1:{DEFAULT_METRICS_PORT}",),
    scrape_interval: str = SCRAPE_INTERVAL,
) -> str:
    """A Prometheus config scraping the run's exporter(s); nothing else (no remote write, no alerting)."""
    tlist = ", ".join(f'"{t}"' for t in targets)
    return (
        "# Prometheus scraping an hlm-testbed run (testbed run ... --metrics-port "
        f"{DEFAULT_METRICS_PORT}).\n"
        "global:\n"
        f"  scrape_interval: {scrape_interval}\n"
        f"  evaluation_interval: {scrape_interval}\n"
        "scrape_configs:\n"
        "  - job_name: hlm-testbed\n"
        "    static_configs:\n"
        f"      - targets: [{tlist}]\n"
    )


def _datasource_yaml(url: str) -> str:
    return (
        "apiVersion: 1\n"
        "datasources:\n"
        "  - name: Prometheus\n"
        "    uid: hlm-prometheus\n"
        "    type: prometheus\n"
        "    access: proxy\n"
        f"    url: {url}\n"
        "    isDefault: true\n"
        "    jsonData:\n"
        f"      timeInterval: {SCRAPE_INTERVAL}\n"
    )


DASHBOARD_PROVIDER_YAML = (
    "apiVersion: 1\n"
    "providers:\n"
    "  - name: hlm-testbed\n"
    "    folder: HLM testbed\n"
    "    type: file\n"
    "    allowUiUpdates: true\n"
    "    updateIntervalSeconds: 10\n"
    "    options:\n"
    "      path: /var/lib/grafana/dashboards\n"
)

COMPOSE_YAML = f"""\
# Prometheus + Grafana next to a run on this host (Linux: host networking, everything on loopback).
#   testbed run SCENARIO --metrics-port {DEFAULT_METRICS_PORT} --linger 60
#   docker compose -f grafana/docker-compose.yml up
# Grafana: http://127.0.0.1:{GRAFANA_PORT} (anonymous, dashboards in folder "HLM testbed")
# Prometheus: http://127.0.0.1:{PROMETHEUS_PORT}
services:
  prometheus:
    image: prom/prometheus:v2.53.0
    network_mode: host
    command:
      - --config.file=/etc/prometheus/prometheus.yml
      - --web.listen-address=127.0.0.1:{PROMETHEUS_PORT}
      - --storage.tsdb.retention.time=7d
    volumes:
      - ./prometheus.yml:/etc/prometheus/prometheus.yml:ro
  grafana:
    image: grafana/grafana:11.1.0
    network_mode: host
    depends_on: [prometheus]
    environment:
      GF_SERVER_HTTP_ADDR: 127.0.0.1
      GF_SERVER_HTTP_PORT: "{GRAFANA_PORT}"
      GF_AUTH_ANONYMOUS_ENABLED: "true"
      GF_AUTH_ANONYMOUS_ORG_ROLE: Editor
      GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH: /var/lib/grafana/dashboards/{OVERVIEW.uid}.json
      GF_ANALYTICS_REPORTING_ENABLED: "false"
      GF_ANALYTICS_CHECK_FOR_UPDATES: "false"
    volumes:
      - ./provisioning:/etc/grafana/provisioning:ro
      - ./dashboards:/var/lib/grafana/dashboards:ro
"""

README_MD = f"""\
# grafana/

Generated by `testbed dashboards export grafana` from `testbed/dashboards.py` (do not edit by hand;
a test checks these files equal what the code renders).

- `dashboards/*.json`: {", ".join(f"`{x.uid}` ({x.title})" for x in DASHBOARDS)}.
  Variables: data source, scenario, tier, policy.
- `provisioning/datasources/prometheus.yml`: Prometheus at http://127.0.0.1:{PROMETHEUS_PORT}.
- `provisioning/dashboards/hlm.yml`: file provider loading `/var/lib/grafana/dashboards`.
- `prometheus.yml`: scrapes a run's exporter at 127.0.0.1:{DEFAULT_METRICS_PORT} every {SCRAPE_INTERVAL}.
- `docker-compose.yml`: Prometheus + Grafana on host networking, pointed at a run on this host.

Without Docker: `testbed dashboards up --target 127.0.0.1:PORT` starts the installed
`prometheus` binary scraping the run, and prints the URLs.
"""


def provisioning_files(prometheus_url: str = f"http://127.0.0.1:{PROMETHEUS_PORT}") -> dict[str, str]:
    """Relative path -> content of the whole provisioning tree."""
    files = {f"dashboards/{db.uid}.json": db.to_json() for db in DASHBOARDS}
    files["provisioning/datasources/prometheus.yml"] = _datasource_yaml(prometheus_url)
    files["provisioning/dashboards/hlm.yml"] = DASHBOARD_PROVIDER_YAML
    files["prometheus.yml"] = prometheus_config()
    files["docker-compose.yml"] = COMPOSE_YAML
    files["README.md"] = README_MD
    return files


def export(out_dir: str | Path) -> list[Path]:
    """Write the provisioning tree under `out_dir`; returns the written paths."""
    out = Path(out_dir)
    written = []
    for rel, text in provisioning_files().items():
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        written.append(p)
    return written
