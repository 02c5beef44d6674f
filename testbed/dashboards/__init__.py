"""Grafana dashboards as code, and the provisioning tree around them.

Panels and their targets are typed declarations (`Panel`, `Target`); `Dashboard.render()`
turns them into Grafana JSON (schemaVersion 39, Grafana 10/11). Every query is built from the
PromQL of `testbed.metrics` (`DERIVED` figures or metric names), so a renamed metric breaks the
unit tests, not the dashboards. The rendered JSON is committed under grafana/dashboards/ and a
test checks it equals what this package renders (`testbed dashboards export grafana` rewrites it).

Variables: ``datasource`` (a Prometheus data source), ``scenario``, ``tier``, ``policy``
(multi-value, "All" = ``.*``); every query filters with ``=~"$var"``.

    model          the declarations and their rendering; targets from testbed.metrics
    panels         the dashboards: the run overview, the policy comparison
    provisioning   prometheus.yml, Grafana's provisioning, docker-compose, export()
"""

from testbed.dashboards.model import (
    DATASOURCE,
    GRAFANA_PORT,
    PROMETHEUS_PORT,
    SCRAPE_INTERVAL,
    Dashboard,
    Panel,
    Row,
    Target,
    Variable,
)
from testbed.dashboards.panels import DASHBOARDS, OVERVIEW, POLICIES
from testbed.dashboards.provisioning import export, prometheus_config, provisioning_files

__all__ = [
    "DASHBOARDS",
    "DATASOURCE",
    "GRAFANA_PORT",
    "OVERVIEW",
    "POLICIES",
    "PROMETHEUS_PORT",
    "SCRAPE_INTERVAL",
    "Dashboard",
    "Panel",
    "Row",
    "Target",
    "Variable",
    "export",
    "prometheus_config",
    "provisioning_files",
]
