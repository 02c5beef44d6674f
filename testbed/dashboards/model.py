"""Dashboards as typed declarations (Dashboard, Row, Panel, Target, Variable) rendered to Grafana
JSON (schemaVersion 39, Grafana 10/11), and the helpers that build targets from testbed.metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from testbed.metrics import DERIVED, Sel
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


def top(k: int, name: str, by: tuple[str, ...], legend: str = "") -> Target:
    """The k largest series of a derived figure grouped `by` (topk: a panel of hundreds of verifiers
    draws the k that matter)."""
    return Target(f"topk({k}, {DERIVED[name].expr(Sel(by=by))})", legend=legend)


def heat(metric: M.Metric) -> Target:
    return Target(Sel().heatmap(metric), legend="{{le}}", format="heatmap")


TIER = ("tier", "policy")
TIER_LEGEND = "{{tier}} ({{policy}})"
POLICY = ("policy",)
VERIFIER = ("verifier",)


def whole_run(title: str, figure: str, unit: str, description: str = "", **kw: Any) -> Panel:
    """A bar per policy of a derived figure over the whole run so far (not a rate window)."""
    target = d(figure, POLICY, "{{policy}}", window=False, instant=True)
    return Panel(title, (target,), "bargauge", unit, description, width=8, **kw)


def _unit(name: str) -> str:
    return DERIVED[name].unit


def help_text(*names: str) -> str:
    return " ".join(f"{DERIVED[n].help}" for n in names)
