"""The Prometheus side of the collector: the metrics of testbed.metrics.definitions in their own
CollectorRegistry, the gauges computed at scrape time from the collector's snapshot, and the HTTP
/metrics endpoint (one target; docs/design.md section 4, "Metrics").

The collector (testbed.metrics.aggregation) owns one Exporter and moves its counters and
histograms as it folds events; the exporter knows nothing of events.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from testbed.metrics.definitions import (
    ACTIVE_DEVICES,
    ACTOR_RESTARTS,
    ACTOR_ROLES,
    EMULATED_TIME,
    JAIN,
    JAIN_RUN,
    LAG,
    METRICS,
    PROTOCOL_ERRORS,
    RUN_LABELS,
    TIER_LABELS,
    TIER_THROUGHPUT,
    TIER_THROUGHPUT_RUN,
    VERIFIER_LABELS,
    VOCAB_SIZE,
    WALL_TIME,
    Metric,
)

DEFAULT_METRICS_PORT = 9464


class Exporter:
    """Every counter and histogram of METRICS in `registry` (a new CollectorRegistry by default),
    the series that must exist before any data pre-created at 0 (so rate() sees the first
    increments), and the HTTP server that serves them."""

    def __init__(self, scenario: str, registry: CollectorRegistry | None = None) -> None:
        from agents.protocol import ErrorCode

        self.scenario = scenario
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.prom: dict[str, Counter | Histogram] = {}
        for m in METRICS:
            base = dict(
                name=m.name.removesuffix("_total"), documentation=m.help, labelnames=m.labels, registry=self.registry
            )
            if m.kind == "counter":
                self.prom[m.name] = Counter(**base)
            elif m.kind == "histogram":
                self.prom[m.name] = Histogram(**base, buckets=m.buckets)
        self._tier_children: dict[tuple[str, tuple[str, str]], Counter | Histogram] = {}
        for m in METRICS:
            if m.kind != "gauge" and m.labels == RUN_LABELS:
                self.run(m)  # pre-create at 0
            elif m.kind != "gauge" and m.labels == VERIFIER_LABELS:
                self.run(m, "verifier")  # the one verifier of a run without servers: (its partitions add theirs)
        for role in ACTOR_ROLES:
            self.prom[ACTOR_RESTARTS.name].labels(scenario, role)
        for code in ErrorCode:  # every reason the verifier can answer with, at 0 until it happens
            self.prom[PROTOCOL_ERRORS.name].labels(scenario, code.name)
        self._server = None
        self._server_thread = None
        self.port: int | None = None

    def add_tier(self, key: tuple[str, str]) -> None:
        """Create (at 0) every per-tier series of (tier, policy)."""
        for m in METRICS:
            if m.kind != "gauge" and m.labels == TIER_LABELS:
                self._tier_children[(m.name, key)] = self.prom[m.name].labels(self.scenario, *key)

    def tier(self, m: Metric, key: tuple[str, str]):
        """The series of a per-tier metric for (tier, policy) (add_tier first)."""
        return self._tier_children[(m.name, key)]

    def run(self, m: Metric, *labels: str):
        """The series of a run-wide metric (scenario label, then `labels`)."""
        return self.prom[m.name].labels(self.scenario, *labels)

    def samples(self) -> list[tuple[str, dict[str, str], list[float], float]]:
        """Every counter and histogram series as (metric name, labels, counts, sum): a counter's value
        as its one count; a histogram's observations per bucket (not cumulative) and their sum. What
        a partition replayed elsewhere hands the driver's exporter (add_samples)."""
        out = []
        for name, metric in self.prom.items():
            for family in metric.collect():
                if family.type == "counter":
                    out += [(name, s.labels, [s.value], 0.0) for s in family.samples if s.name.endswith("_total")]
                    continue
                series: dict[tuple, list] = {}
                for s in family.samples:
                    labels = {k: v for k, v in s.labels.items() if k != "le"}
                    entry = series.setdefault(tuple(sorted(labels.items())), [labels, [], 0.0])
                    if s.name.endswith("_bucket"):
                        entry[1].append(s.value)
                    elif s.name.endswith("_sum"):
                        entry[2] = s.value
                for labels, cumulative, total in series.values():
                    out.append((name, labels, list(np.diff(cumulative, prepend=0.0)), total))
        return out

    def add_samples(self, samples) -> None:
        """Add another exporter's samples() to these series (partitions never share a device, so their
        counts add). A histogram's buckets are added in place: prometheus_client has no public call
        that adds n observations to a bucket (tests/testbed/test_partitions.py checks that the sum
        equals folding every event here)."""
        for name, labels, counts, total in samples:
            child = self.prom[name].labels(**{**labels, "scenario": self.scenario})  # this run's series
            if isinstance(self.prom[name], Counter):
                if counts[0]:
                    child.inc(counts[0])
                continue
            for bucket, n in zip(child._buckets, counts):
                if n:
                    bucket.inc(n)
            if total:
                child._sum.inc(total)

    def add_gauges(self, snapshot: Callable, vocab_size: int | None, policy_of: Callable[[str], str]) -> None:
        """Register the gauges, computed at each scrape from `snapshot()` (a Snapshot)."""
        self.registry.register(_Gauges(self.scenario, snapshot, vocab_size, policy_of))

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format (what /metrics serves)."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> int | None:
        """Serve /metrics over HTTP. port > 0: that port; 0: off (returns None);
        < 0: a free port chosen by the OS. Returns the bound port."""
        if port == 0:
            return None
        if self._server is not None:
            raise RuntimeError(f"already serving on port {self.port}")
        from prometheus_client import start_http_server

        server, self._server_thread = start_http_server(max(port, 0), addr=host, registry=self.registry)
        self._server, self.port = server, server.server_port
        return self.port

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str | None:
        if self._server is None:
            return None
        host = self._server.server_address[0]
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop the HTTP server (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=5)
            self._server = self._server_thread = None


class _Gauges:
    """prometheus-client custom collector: the gauges of METRICS, from a snapshot at scrape time."""

    def __init__(self, scenario: str, snapshot: Callable, vocab_size: int | None, policy_of: Callable[[str], str]):
        self.scenario, self.snapshot, self.vocab_size, self.policy_of = scenario, snapshot, vocab_size, policy_of

    def _families(self) -> dict[str, GaugeMetricFamily]:
        return {m.name: GaugeMetricFamily(m.name, m.help, labels=m.labels) for m in METRICS if m.kind == "gauge"}

    def describe(self):
        return list(self._families().values())

    def collect(self):
        snap = self.snapshot()
        s = self.scenario
        fams = self._families()
        fams[EMULATED_TIME.name].add_metric([s], snap.emulated_s)
        fams[WALL_TIME.name].add_metric([s], snap.wall_s)
        fams[LAG.name].add_metric([s], snap.lag_s)
        if self.vocab_size:
            fams[VOCAB_SIZE.name].add_metric([s], self.vocab_size)
        for tier, policy in snap.per_tier:
            key = (tier, policy)
            fams[TIER_THROUGHPUT.name].add_metric([s, tier, policy], snap.tier_throughput_window.get(key, 0.0))
            fams[TIER_THROUGHPUT_RUN.name].add_metric([s, tier, policy], snap.tier_throughput.get(key, 0.0))
        for tier, n in snap.active_devices.items():
            fams[ACTIVE_DEVICES.name].add_metric([s, tier, self.policy_of(tier)], n)
        if not math.isnan(snap.jain_window):
            fams[JAIN.name].add_metric([s], snap.jain_window)
        if not math.isnan(snap.jain_run):
            fams[JAIN_RUN.name].add_metric([s], snap.jain_run)
        return list(fams.values())


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host` (for tests and `testbed dashboards up`)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
