"""Live metrics: the collector that aggregates the actors' stat records, the Prometheus exporter,
and the PromQL of every derived figure, written next to the metrics it is built from.

Data flow::

    device groups / the virtual clock's replay --agents.events--> runner (forwards only)
        -> Collector.ingest_events(events) -> Prometheus metrics in its own CollectorRegistry
                                             -> HTTP /metrics (one target)
                                             -> snapshot() for the progress display (sinks.Progress)
        -> testbed.results.ResultsWriter (tokens.parquet): the same events, so every counter equals
           its sum over tokens.parquet (tests/testbed/test_metrics_equal_results.py)

`ingest` takes agents.stats records (StatBatch) for the rest: the runner's clock and error records.

Usage from the runner::

    collector = Collector(scenario.name, tiers={"phone": "cu-hlm", "laptop": "u-hlm"}, vocab_size=151936)
    collector.serve(metrics_port)            # 0 = off; binds 127.0.0.1 unless host= is given
    ... for every batch pulled from an actor: collector.ingest(batch)
    collector.finish()                       # freezes the wall clock gauge
    collector.linger(linger_seconds)         # keep serving so a scraper sees the final values
    collector.close()

Naming: prefix ``hlm_``, base units in the name (``_seconds``, ``_bytes``), counters end in
``_total``; labels are ``scenario`` (every metric) and ``tier``/``policy`` (per-tier metrics)
only. Devices are never labels: per-device figures (fairness) are aggregated here.

What a rate means (two clocks)
------------------------------
Every counter advances when the collector ingests the records, i.e. with the *emulated*
progress of the run, while Prometheus timestamps samples with *wall* time. So
``rate(hlm_tokens_committed_total[1m])`` is tokens committed per **wall** second: in the
``wall`` clock that is emulated tokens/s x time_scale (when the run keeps up, see
``hlm_lag_seconds``); in the ``virtual`` clock it only says how fast this machine emulates.
Figures *per emulated second* divide the increase of a counter by the increase of
``hlm_emulated_time_seconds`` over the same range (see `Sel.per_emulated_second`): the same
query is right in both clocks. Ratios of counters (acceptance, skip rate, compression) do not
depend on either clock. The gauges ``hlm_tokens_per_emulated_second`` and
``hlm_jain_fairness_ratio`` are computed by the collector itself over a sliding window of
emulated time (``window_s``, default 10 emulated seconds); the ``_run_`` variants cover the
whole run so far. A virtual-clock run can finish in a few wall seconds: use ``--linger`` so
Prometheus scrapes the final values, and read whole-run figures (``Sel(window=None)``).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from agents.stats import (
    FLAG_ACCEPTED,
    FLAG_DRAFTED,
    FLAG_RESAMPLED,
    FLAG_TRANSMITTED,
    ClockStat,
    LinkStat,
    ProtocolErrorStat,
    StatBatch,
    TokenStat,
    VerifierBatchStat,
)
from testbed import figures

DEFAULT_METRICS_PORT = 9464
DEFAULT_WINDOW_S = 10.0
RUN_LABELS = ("scenario",)
TIER_LABELS = ("scenario", "tier", "policy")


# ---------------------------------------------------------------------------------------------
# Metric definitions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One exported metric. `name` is the exposed name (counters include ``_total``)."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = TIER_LABELS
    buckets: tuple[float, ...] = ()

    def __str__(self) -> str:
        return self.name


def _m(name: str, kind: str, help: str, labels=TIER_LABELS, buckets=()) -> Metric:
    return Metric(name, kind, help, labels, tuple(buckets))  # type: ignore[arg-type]


# Tokens (from TokenStat)
TOKENS_DRAFTED = _m("hlm_tokens_drafted_total", "counter", "Tokens drafted by a device SLM (committed drafts and drafts the LLM replaced).")
TOKENS_COMMITTED = _m("hlm_tokens_committed_total", "counter", "Tokens committed on devices (the generated text).")
UPLOADS = _m("hlm_uploads_total", "counter", "Drafts whose (truncated) distribution was uploaded for verification (llm-only requests without a draft are not counted).")
SKIPS = _m("hlm_skips_total", "counter", "Tokens committed without an upload (drafts accepted on the device).")
ACCEPTED = _m("hlm_drafts_accepted_total", "counter", "Uploaded drafts the LLM accepted.")
RESAMPLED = _m("hlm_drafts_resampled_total", "counter", "Uploaded drafts the LLM rejected and replaced by a token resampled from the residual.")
UPLINK_BYTES = _m("hlm_uplink_bytes_total", "counter", "Bytes tokens put on the uplink (frame headers, payload, piggybacked ids, retransmissions).")
PAYLOAD_BYTES = _m("hlm_payload_bytes_total", "counter", "Bytes of the encoded distribution payloads (indices + quantised probabilities).")
VOCAB_ENTRIES = _m("hlm_vocab_entries_sent_total", "counter", "Vocabulary entries sent in uploads (sum of k).")
UNCERTAINTY = _m("hlm_token_uncertainty", "histogram", "Uncertainty u(t) of drafted tokens.", buckets=[i / 20 for i in range(21)])
UPLOAD_K = _m("hlm_upload_vocab_entries", "histogram", "Vocabulary entries k per upload.",
              buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536, 262144])
UPLOAD_PAYLOAD = _m("hlm_upload_payload_bytes", "histogram", "Payload bytes per upload.",
                    buckets=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144, 1048576])
TOKEN_LATENCY = _m("hlm_token_latency_seconds", "histogram", "Emulated seconds from a token's draft start to its commit.",
                   buckets=[0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30])
# Fidelity (tokens.parquet's fidelity_tv, docs/design.md section 7): a histogram, so its series
# hlm_fidelity_tv_sum (the sum of per-token TV) and hlm_fidelity_tv_count (tokens with a value)
# give the mean (DERIVED["mean_fidelity_tv"]); only tokens whose value is known are observed.
FIDELITY = _m("hlm_fidelity_tv", "histogram",
              "Exact total-variation distance between the law a committed token was drawn from and the LLM's "
              "distribution at its position (0: the LLM's own law).",
              buckets=[1e-6, 1e-4, 1e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1])

# Verifier (from VerifierBatchStat); one shared verifier: scenario label only
VERIFIER_BATCH_SIZE = _m("hlm_verifier_batch_size", "histogram", "Requests per verifier batch.", RUN_LABELS,
                         [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128])
VERIFIER_BATCH_TOKENS = _m("hlm_verifier_batch_tokens", "histogram", "Tokens processed by the LLM per verifier batch (drafts + piggybacked ids).",
                           RUN_LABELS, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096])
VERIFIER_QUEUE_WAIT = _m("hlm_verifier_queue_wait_seconds", "histogram", "Emulated seconds a request waited at the verifier before its batch started.",
                         RUN_LABELS, [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5])
VERIFIER_VERIFY = _m("hlm_verifier_verify_seconds", "histogram", "Emulated seconds per verifier batch (server profile).",
                     RUN_LABELS, [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2])
VERIFIER_TOKENS = _m("hlm_verifier_tokens_total", "counter", "Tokens processed by the verifier's LLM.", RUN_LABELS)
PROTOCOL_ERRORS = _m("hlm_protocol_errors_total", "counter", "Client messages answered with an error reply, by reason (the verifier's ErrorCode name: BAD_FRAME, OVERSIZED, OUT_OF_ORDER, UNKNOWN_SESSION, REFUSED, LIMIT, ...).",
                     RUN_LABELS + ("reason",))
ACTOR_ROLES = ("verifier", "group")  # the actor label of hlm_actor_restarts_total
ACTOR_RESTARTS = _m("hlm_actor_restarts_total", "counter", "Actors that died and were restarted by deterministic replay (actor: verifier or group).",
                    RUN_LABELS + ("actor",))

# Links (from LinkStat)
UPLINK_MESSAGES = _m("hlm_link_uplink_messages_total", "counter", "Messages sent on uplinks (first transmissions).")
DOWNLINK_MESSAGES = _m("hlm_link_downlink_messages_total", "counter", "Messages sent on downlinks (first transmissions).")
UPLINK_WIRE_BYTES = _m("hlm_link_uplink_bytes_total", "counter", "Bytes put on uplinks, including headers and retransmissions.")
DOWNLINK_WIRE_BYTES = _m("hlm_link_downlink_bytes_total", "counter", "Bytes put on downlinks, including headers and retransmissions.")
LOST = _m("hlm_link_lost_messages_total", "counter", "Transmissions dropped by a link.")
RETRANSMISSIONS = _m("hlm_link_retransmissions_total", "counter", "Retransmissions after a loss or timeout.")

# Gauges computed by the collector at scrape time
EMULATED_TIME = _m("hlm_emulated_time_seconds", "gauge", "Emulated time reached by the run (seconds since its start).", RUN_LABELS)
WALL_TIME = _m("hlm_wall_time_seconds", "gauge", "Real seconds since the run started.", RUN_LABELS)
LAG = _m("hlm_lag_seconds", "gauge", "Wall clock: real seconds the emulation is behind schedule (0 when keeping up or virtual).", RUN_LABELS)
VOCAB_SIZE = _m("hlm_vocabulary_size", "gauge", "Vocabulary size |V| of the model pair (entries of a full distribution).", RUN_LABELS)
ACTIVE_DEVICES = _m("hlm_active_devices", "gauge", "Devices that still have tokens to generate.")
TIER_THROUGHPUT = _m("hlm_tokens_per_emulated_second", "gauge",
                     "Tokens committed per emulated second over the collector's sliding window.")
TIER_THROUGHPUT_RUN = _m("hlm_run_tokens_per_emulated_second", "gauge",
                         "Tokens committed per emulated second over the whole run so far (over the tier's span: first draft start to last commit).")
JAIN = _m("hlm_jain_fairness_ratio", "gauge",
          "Jain's fairness index over per-device throughput in the sliding window (active devices without tokens count as 0).",
          RUN_LABELS)
JAIN_RUN = _m("hlm_jain_fairness_run_ratio", "gauge",
              "Jain's fairness index over per-device throughput (tokens / own draft-start-to-last-commit span) over the whole run.",
              RUN_LABELS)

METRICS: tuple[Metric, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Metric))


# ---------------------------------------------------------------------------------------------
# PromQL for derived figures
# ---------------------------------------------------------------------------------------------
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


_METRIC_BY_NAME = {m.name: m for m in METRICS}


@dataclass(frozen=True)
class Derived:
    """A figure computed in PromQL from the metrics above. `unit` is a Grafana unit id."""

    name: str
    help: str
    unit: str
    promql: Callable[[Sel], str]

    def expr(self, sel: Sel | None = None, **kw) -> str:
        return self.promql(sel if sel is not None else Sel(**kw))


def _d(name: str, help: str, unit: str, fn: Callable[[Sel], str]) -> Derived:
    return Derived(name, help, unit, fn)


DERIVED: dict[str, Derived] = {d.name: d for d in [
    _d("throughput", "Tokens committed per emulated second.", "short",
       lambda s: s.per_emulated_second(s.sum(TOKENS_COMMITTED))),
    _d("wall_throughput", "Tokens committed per wall second (emulation speed in the virtual clock).", "short",
       lambda s: f"sum by ({s._by(TOKENS_COMMITTED)}) (rate({s.series(TOKENS_COMMITTED)}[{s.window}]))" if s.window
       else f"{s.sum(TOKENS_COMMITTED)} / on (scenario) group_left () max by (scenario) ({s.series(WALL_TIME)})"),
    _d("skip_rate", "Fraction of committed tokens that were not uploaded (skipped).", "percentunit",
       lambda s: f"{s.sum(SKIPS)} / {s.sum(TOKENS_COMMITTED)}"),
    _d("acceptance_rate", "Fraction of uploaded drafts the LLM accepted.", "percentunit",
       lambda s: f"{s.sum(ACCEPTED)} / {s.sum(UPLOADS)}"),
    _d("vocab_compression", "1 - vocabulary entries sent / (|V| x uploads).", "percentunit",
       lambda s: f"1 - {s.sum(VOCAB_ENTRIES)} / ({s.sum(UPLOADS)} * on (scenario) group_left () max by (scenario) ({s.series(VOCAB_SIZE)}))"),
    _d("mean_k", "Mean vocabulary entries per upload.", "short",
       lambda s: f"{s.sum(VOCAB_ENTRIES)} / {s.sum(UPLOADS)}"),
    _d("uplink_bytes_rate", "Uplink bytes (draft uploads) per emulated second.", "Bps",
       lambda s: s.per_emulated_second(s.sum(UPLINK_BYTES))),
    _d("uplink_bytes_per_token", "Uplink bytes per committed token.", "bytes",
       lambda s: f"{s.sum(UPLINK_BYTES)} / {s.sum(TOKENS_COMMITTED)}"),
    _d("wire_bytes_rate", "Bytes on the uplinks incl. headers and retransmissions, per emulated second.", "Bps",
       lambda s: s.per_emulated_second(s.sum(UPLINK_WIRE_BYTES))),
    _d("downlink_bytes_rate", "Bytes on the downlinks per emulated second.", "Bps",
       lambda s: s.per_emulated_second(s.sum(DOWNLINK_WIRE_BYTES))),
    _d("loss_rate", "Fraction of link transmissions lost.", "percentunit",
       lambda s: f"{s.sum(LOST)} / ({s.sum(UPLINK_MESSAGES)} + {s.sum(DOWNLINK_MESSAGES)} + {s.sum(RETRANSMISSIONS)})"),
    _d("retransmission_rate", "Retransmissions per emulated second.", "short",
       lambda s: s.per_emulated_second(s.sum(RETRANSMISSIONS))),
    _d("latency_p50", "Token latency median (emulated seconds).", "s", lambda s: s.quantile(0.5, TOKEN_LATENCY)),
    _d("latency_p95", "Token latency 95th percentile (emulated seconds).", "s", lambda s: s.quantile(0.95, TOKEN_LATENCY)),
    _d("latency_p99", "Token latency 99th percentile (emulated seconds).", "s", lambda s: s.quantile(0.99, TOKEN_LATENCY)),
    _d("mean_uncertainty", "Mean uncertainty of drafted tokens.", "short", lambda s: s.mean(UNCERTAINTY)),
    _d("mean_fidelity_tv", "Mean per-token TV distance to the LLM's distribution (hlm_fidelity_tv_sum / "
       "hlm_fidelity_tv_count; 0 = exactly the LLM).", "short", lambda s: s.mean(FIDELITY)),
    _d("verifier_batch_size_mean", "Mean requests per verifier batch.", "short", lambda s: s.mean(VERIFIER_BATCH_SIZE)),
    _d("verifier_batch_tokens_mean", "Mean tokens per verifier batch.", "short", lambda s: s.mean(VERIFIER_BATCH_TOKENS)),
    _d("verifier_batches_rate", "Verifier batches per emulated second.", "short",
       lambda s: s.per_emulated_second(s.sum(VERIFIER_BATCH_SIZE, "_count"))),
    _d("verifier_utilisation", "Fraction of emulated time the verifier spent verifying.", "percentunit",
       lambda s: s.per_emulated_second(s.sum(VERIFIER_VERIFY, "_sum"))),
    _d("queue_wait_p50", "Verifier queue wait median (emulated seconds).", "s", lambda s: s.quantile(0.5, VERIFIER_QUEUE_WAIT)),
    _d("queue_wait_p95", "Verifier queue wait 95th percentile (emulated seconds).", "s", lambda s: s.quantile(0.95, VERIFIER_QUEUE_WAIT)),
    _d("emulation_speed", "Emulated seconds per wall second (1/time_scale when a wall-clock run keeps up).", "short",
       lambda s: f"max by (scenario) (deriv({s.series(EMULATED_TIME)}[{s.window or '1m'}]))"),
]}


# ---------------------------------------------------------------------------------------------
# Aggregation state (plain Python; also what the progress display reads)
# ---------------------------------------------------------------------------------------------
@dataclass
class TierTotals:
    drafted: int = 0
    committed: int = 0
    uploads: int = 0
    skips: int = 0
    accepted: int = 0
    resampled: int = 0
    uplink_bytes: int = 0
    payload_bytes: int = 0
    vocab_entries: int = 0

    def add(self, o: "TierTotals") -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(o, f))


class _Device:
    __slots__ = ("key", "n", "t_first_start", "t_last_commit", "recent")

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        self.n = 0
        self.t_first_start = math.inf
        self.t_last_commit = -math.inf
        self.recent: deque[float] = deque()


@dataclass
class Snapshot:
    """The collector's current figures (for the progress display and log lines)."""

    scenario: str
    emulated_s: float
    wall_s: float
    lag_s: float
    totals: TierTotals
    per_tier: dict[tuple[str, str], TierTotals]
    throughput: float
    """System tokens per emulated second over the whole run so far."""
    tier_throughput: dict[tuple[str, str], float]
    """(tier, policy) -> tokens per emulated second over the tier's span so far (first draft
    start to last commit; as summary.json's per-tier throughput)."""
    tier_throughput_window: dict[tuple[str, str], float]
    jain_window: float
    jain_run: float
    active_devices: dict[str, int]
    verifier_batches: int
    verifier_batch_size_mean: float
    protocol_errors: dict[str, int] = field(default_factory=dict)

    @property
    def skip_rate(self) -> float:
        return figures.skip_rate(self.totals.skips, self.totals.committed)

    @property
    def acceptance_rate(self) -> float:
        return figures.acceptance_rate(self.totals.accepted, self.totals.uploads)

    def log_line(self) -> str:
        """One line for logs / the progress display."""
        def pct(x: float) -> str:
            return "-" if math.isnan(x) else f"{100 * x:.1f}%"

        parts = [
            f"emu={self.emulated_s:.2f}s wall={self.wall_s:.1f}s" + (f" lag={self.lag_s:.2f}s" if self.lag_s > 0 else ""),
            f"tokens={self.totals.committed}",
            f"tok/s={self.throughput:.1f}",
            f"skip={pct(self.skip_rate)}",
            f"acc={pct(self.acceptance_rate)}",
            f"up={self.totals.uplink_bytes / 1e6:.2f}MB",
            f"jain={'-' if math.isnan(self.jain_run) else f'{self.jain_run:.3f}'}",
        ]
        tiers = " ".join(f"{t}:{v:.1f}" for (t, _), v in sorted(self.tier_throughput.items()))
        return " ".join(parts) + (f" | {tiers}" if tiers else "")


# ---------------------------------------------------------------------------------------------
# The collector
# ---------------------------------------------------------------------------------------------
class Collector:
    """Aggregates stat records and exports them as Prometheus metrics.

    Thread-safe: `ingest` may be called from any thread while the HTTP server scrapes.

    scenario: value of the ``scenario`` label. tiers: tier name -> policy name; pre-creates
    every tier's series at 0 (so rate() sees the first increments; recommended). vocab_size:
    |V| for the compression figure. window_s: sliding window, emulated seconds, of the
    windowed throughput and fairness gauges. registry: defaults to a new CollectorRegistry.
    """

    def __init__(
        self,
        scenario: str,
        *,
        tiers: Mapping[str, str] | None = None,
        vocab_size: int | None = None,
        window_s: float = DEFAULT_WINDOW_S,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.scenario = scenario
        self.vocab_size = vocab_size
        self.window_s = float(window_s)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._lock = threading.RLock()
        self._t0 = time.monotonic()
        self._finished_wall: float | None = None
        self._tier_policy: dict[str, str] = dict(tiers or {})
        self._totals: dict[tuple[str, str], TierTotals] = {}
        self._devices: dict[int, _Device] = {}
        self._tier_span: dict[tuple[str, str], list[float]] = {}  # key -> [first draft start, last commit]
        self._clocks: dict[str, ClockStat] = {}
        self._max_event_t = 0.0
        self._verifier_batches = 0
        self._verifier_requests = 0
        self._errors: dict[str, int] = {}
        self._server = None
        self._server_thread = None
        self.port: int | None = None

        self._prom: dict[str, Counter | Histogram] = {}
        for m in METRICS:
            base = dict(name=m.name.removesuffix("_total"), documentation=m.help, labelnames=m.labels, registry=self.registry)
            if m.kind == "counter":
                self._prom[m.name] = Counter(**base)
            elif m.kind == "histogram":
                self._prom[m.name] = Histogram(**base, buckets=m.buckets)
        self._children: dict[tuple[str, tuple[str, str]], object] = {}
        self.registry.register(_DerivedGauges(self))
        for m in METRICS:
            if m.kind != "gauge" and m.labels == RUN_LABELS:
                self._prom[m.name].labels(scenario)  # pre-create at 0
        for role in ACTOR_ROLES:
            self._prom[ACTOR_RESTARTS.name].labels(scenario, role)  # pre-create at 0
        from agents.protocol import ErrorCode

        for code in ErrorCode:  # every reason the verifier can answer with, at 0 until it happens
            self._prom[PROTOCOL_ERRORS.name].labels(scenario, code.name)
        for tier, policy in self._tier_policy.items():
            self._key((tier, policy))

    # -- ingest ----------------------------------------------------------------------------
    def ingest(self, stats: StatBatch | Iterable | TokenStat | VerifierBatchStat | LinkStat | ClockStat | ProtocolErrorStat) -> None:
        """Take a batch, one record, or an iterable of records and/or batches."""
        if isinstance(stats, StatBatch):
            batch = stats
        else:
            batch = StatBatch()
            if isinstance(stats, (TokenStat, VerifierBatchStat, LinkStat, ClockStat, ProtocolErrorStat)):
                batch.add(stats)
            else:
                for s in stats:
                    if isinstance(s, StatBatch):  # e.g. the results of ray.get over several actors
                        batch.merge(s)
                    else:
                        batch.add(s)
        with self._lock:
            self._ingest_tokens(batch)
            for v in batch.verifier:
                self._ingest_verifier(v)
            for link in batch.links:
                self._ingest_link(link)
            for c in batch.clocks:
                self._clocks[c.source] = c
                self._max_event_t = max(self._max_event_t, c.emulated_s)
            for e in batch.errors:
                self._errors[e.reason] = self._errors.get(e.reason, 0) + e.count
                self._prom[PROTOCOL_ERRORS.name].labels(self.scenario, e.reason).inc(e.count)

    def actor_restart(self, actor: str) -> None:
        """One actor restart (testbed.run.plan: a dead verifier or device group brought back)."""
        with self._lock:
            self._prom[ACTOR_RESTARTS.name].labels(self.scenario, actor).inc()

    def ingest_token_records(self, rows: Iterable) -> None:
        """Ingest committed tokens given as tokens.parquet rows (testbed.results.TokenRecord or
        dicts with its fields), for a runner that already collects those rows from its actors.
        fidelity_tv (absent from TokenStat) is observed from here, where it is finite: a row
        drained before its value came (a skipped token in a one-pass run) does not count."""
        batch = StatBatch()
        fidelity: list[tuple[tuple[str, str], float]] = []
        for r in rows:
            get = r.get if isinstance(r, Mapping) else (lambda name, _r=r: getattr(_r, name))
            t_commit, t_start = float(get("t_commit")), float(get("t_draft_start"))
            batch.add_token(
                device=int(get("device")), tier=str(get("tier")), policy=str(get("policy")),
                uncertainty=float(get("uncertainty")), transmitted=bool(get("transmitted")), k=int(get("k")),
                payload_bytes=int(get("payload_bytes")), uplink_bytes=int(get("uplink_bytes")),
                accepted=bool(get("accepted")), resampled=bool(get("resampled")),
                latency_s=t_commit - t_start if t_start == t_start else 0.0, t_commit=t_commit,
                drafted=int(get("draft_id")) >= 0,
            )
            f = float(r.get("fidelity_tv", math.nan) if isinstance(r, Mapping) else getattr(r, "fidelity_tv", math.nan))
            if math.isfinite(f):
                fidelity.append(((str(get("tier")), str(get("policy"))), f))
        with self._lock:
            self.ingest(batch)
            for key, f in fidelity:
                self._key(key)
                self._child(FIDELITY, key).observe(f)

    def ingest_events(self, events: Iterable) -> None:
        """Take the run's events (agents.events), as the runner forwards them: tokens from
        TokenCommitted (fidelity where known at the commit), the fidelity of skipped tokens from
        ShadowResolved, link counters from UploadSent / VerdictReceived / MessageLost, verifier
        batches from VerifierBatch."""
        from agents.events import MessageLost, ShadowResolved, TokenCommitted, UploadSent, VerdictReceived, VerifierBatch

        rows, stats, fidelity = [], [], []
        links: dict[tuple[str, str, str], list[int]] = {}  # (tier, policy, direction) -> messages, bytes, lost, retx

        def link(e, direction: str) -> list[int]:
            return links.setdefault((e.tier, e.policy, direction), [0, 0, 0, 0])

        for e in events:
            if isinstance(e, TokenCommitted):
                rows.append(e.row)
            elif isinstance(e, ShadowResolved):
                if math.isfinite(e.fidelity_tv):
                    fidelity.append((e.device, e.fidelity_tv))
            elif isinstance(e, UploadSent):
                acc = link(e, "uplink")
                acc[0] += 1
                acc[1] += e.bytes
                acc[3] += e.retransmissions
            elif isinstance(e, VerdictReceived):
                acc = link(e, "downlink")
                acc[0] += 1
                acc[1] += e.bytes
            elif isinstance(e, MessageLost):
                link(e, e.direction)[2] += e.count
            elif isinstance(e, VerifierBatch):
                stats.append(VerifierBatchStat(e.size, e.n_tokens, e.t_end - e.t_start, e.queue_waits, e.t_start))
        stats.extend(LinkStat(t, p, d, *acc) for (t, p, d), acc in links.items())
        with self._lock:
            if rows:
                self.ingest_token_records(rows)
            if stats:
                self.ingest(stats)
            for device, f in fidelity:
                dev = self._devices.get(device)  # its token was committed (and ingested) before
                if dev is not None:
                    self._child(FIDELITY, dev.key).observe(f)

    def _key(self, key: tuple[str, str]) -> TierTotals:
        t = self._totals.get(key)
        if t is None:
            t = self._totals[key] = TierTotals()
            self._tier_policy.setdefault(key[0], key[1])
            for m in METRICS:
                if m.kind != "gauge" and m.labels == TIER_LABELS:
                    self._children[(m.name, key)] = self._prom[m.name].labels(self.scenario, *key)
        return t

    def _child(self, m: Metric, key: tuple[str, str]):
        return self._children[(m.name, key)]

    def _ingest_tokens(self, batch: StatBatch) -> None:
        cols = batch.token_columns()
        n = len(cols.device)
        if not n:
            return
        deltas = [TierTotals() for _ in cols.labels]
        for lbl in cols.labels:
            self._key(lbl)
        unc = [self._child(UNCERTAINTY, k) for k in cols.labels]
        ks = [self._child(UPLOAD_K, k) for k in cols.labels]
        pay = [self._child(UPLOAD_PAYLOAD, k) for k in cols.labels]
        lat = [self._child(TOKEN_LATENCY, k) for k in cols.labels]
        devices = self._devices
        window = self.window_s
        touched: dict[int, _Device] = {}
        max_t = self._max_event_t
        for i in range(n):
            li = cols.label[i]
            f = cols.flags[i]
            d = deltas[li]
            d.committed += 1
            t_commit = cols.t_commit[i]
            latency = cols.latency_s[i]
            if f & FLAG_DRAFTED:
                d.drafted += 1
                u = cols.uncertainty[i]
                if u == u:  # not NaN
                    unc[li].observe(u)
            if f & FLAG_TRANSMITTED and f & FLAG_DRAFTED:  # an upload = a transmitted draft
                d.uploads += 1
                k = cols.k[i]
                d.vocab_entries += k
                d.payload_bytes += cols.payload_bytes[i]
                ks[li].observe(k)
                pay[li].observe(cols.payload_bytes[i])
                if f & FLAG_ACCEPTED:
                    d.accepted += 1
            elif not f & FLAG_TRANSMITTED:
                d.skips += 1
            if f & FLAG_RESAMPLED:
                d.resampled += 1
            d.uplink_bytes += cols.uplink_bytes[i]
            lat[li].observe(latency)
            dev = devices.get(cols.device[i])
            if dev is None:
                dev = devices[cols.device[i]] = _Device(cols.labels[li])
            touched[cols.device[i]] = dev
            dev.n += 1
            start = t_commit - latency
            if start < dev.t_first_start:
                dev.t_first_start = start
            if t_commit > dev.t_last_commit:
                dev.t_last_commit = t_commit
            r = dev.recent
            r.append(t_commit)
            while r[0] <= t_commit - window:
                r.popleft()
            if t_commit > max_t:
                max_t = t_commit
        self._max_event_t = max_t
        for dev in touched.values():
            span = self._tier_span.setdefault(dev.key, [math.inf, -math.inf])
            span[0] = min(span[0], dev.t_first_start)
            span[1] = max(span[1], dev.t_last_commit)
        for lbl, d in zip(cols.labels, deltas):
            self._totals[lbl].add(d)
            for m, v in ((TOKENS_DRAFTED, d.drafted), (TOKENS_COMMITTED, d.committed), (UPLOADS, d.uploads),
                         (SKIPS, d.skips), (ACCEPTED, d.accepted), (RESAMPLED, d.resampled),
                         (UPLINK_BYTES, d.uplink_bytes), (PAYLOAD_BYTES, d.payload_bytes), (VOCAB_ENTRIES, d.vocab_entries)):
                if v:
                    self._child(m, lbl).inc(v)

    def _ingest_verifier(self, v: VerifierBatchStat) -> None:
        s = self.scenario
        self._prom[VERIFIER_BATCH_SIZE.name].labels(s).observe(v.batch_size)
        self._prom[VERIFIER_BATCH_TOKENS.name].labels(s).observe(v.tokens)
        self._prom[VERIFIER_VERIFY.name].labels(s).observe(v.verify_s)
        self._prom[VERIFIER_TOKENS.name].labels(s).inc(v.tokens)
        qw = self._prom[VERIFIER_QUEUE_WAIT.name].labels(s)
        for w in v.queue_wait_s:
            qw.observe(w)
        self._verifier_batches += 1
        self._verifier_requests += v.batch_size
        if v.t_start == v.t_start:
            self._max_event_t = max(self._max_event_t, v.t_start + v.verify_s)

    def _ingest_link(self, link: LinkStat) -> None:
        key = (link.tier, link.policy)
        self._key(key)
        up = link.direction == "uplink"
        for m, v in (((UPLINK_MESSAGES if up else DOWNLINK_MESSAGES), link.messages),
                     ((UPLINK_WIRE_BYTES if up else DOWNLINK_WIRE_BYTES), link.bytes),
                     (LOST, link.lost), (RETRANSMISSIONS, link.retransmissions)):
            if v:
                self._child(m, key).inc(v)

    # -- derived figures -------------------------------------------------------------------
    def emulated_time(self) -> float:
        with self._lock:
            return self._max_event_t

    def wall_time(self) -> float:
        with self._lock:
            if self._clocks:
                return max(c.wall_s for c in self._clocks.values())
            end = self._finished_wall if self._finished_wall is not None else time.monotonic()
            return end - self._t0

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = self._max_event_t
            totals = TierTotals()
            for t in self._totals.values():
                totals.add(t)
            tier_run = {}
            for k, t in self._totals.items():
                first, last = self._tier_span.get(k, (math.inf, -math.inf))
                span = last - first if last > first else now
                tier_run[k] = t.committed / span if span > 0 else 0.0
            # sliding window
            w = min(self.window_s, now) if now > 0 else self.window_s
            cutoff = now - self.window_s
            window_counts: dict[tuple[str, str], int] = {k: 0 for k in self._totals}
            xs_window: list[float] = []
            xs_run: list[float] = []
            for dev in self._devices.values():
                r = dev.recent
                while r and r[0] <= cutoff:
                    r.popleft()
                if r:
                    window_counts[dev.key] = window_counts.get(dev.key, 0) + len(r)
                    xs_window.append(len(r) / w)
                span = dev.t_last_commit - dev.t_first_start
                if dev.n and span > 0:
                    xs_run.append(dev.n / span)
            active: dict[str, int] = {}
            for c in self._clocks.values():
                for tier, n in c.active_devices.items():
                    active[tier] = active.get(tier, 0) + n
            n_active = sum(active.values()) if active else None
            return Snapshot(
                scenario=self.scenario,
                emulated_s=now,
                wall_s=self.wall_time(),
                lag_s=max((c.lag_s for c in self._clocks.values()), default=0.0),
                totals=totals,
                per_tier={k: TierTotals(**vars(t)) for k, t in self._totals.items()},
                throughput=totals.committed / now if now > 0 else 0.0,
                tier_throughput=tier_run,
                tier_throughput_window={k: c / w for k, c in window_counts.items()},
                jain_window=figures.jain(xs_window, n_active),
                jain_run=figures.jain(xs_run),
                active_devices=active,
                verifier_batches=self._verifier_batches,
                verifier_batch_size_mean=(self._verifier_requests / self._verifier_batches
                                          if self._verifier_batches else math.nan),
                protocol_errors=dict(self._errors),
            )

    def log_line(self) -> str:
        return self.snapshot().log_line()

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format (what /metrics serves)."""
        return generate_latest(self.registry)

    # -- serving ---------------------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1") -> int | None:
        """Serve /metrics over HTTP. port > 0: that port; 0: off (returns None);
        < 0: a free port chosen by the OS. Returns the bound port."""
        if port == 0:
            return None
        if self._server is not None:
            raise RuntimeError(f"already serving on port {self.port}")
        from prometheus_client import start_http_server

        self._server, self._server_thread = start_http_server(max(port, 0), addr=host, registry=self.registry)
        self.port = self._server.server_port
        return self.port

    @property
    def url(self) -> str | None:
        if self._server is None:
            return None
        host = self._server.server_address[0]
        return f"http://{host}:{self.port}/metrics"

    def finish(self) -> None:
        """Mark the run finished: the wall time gauge stops advancing."""
        with self._lock:
            if self._finished_wall is None:
                self._finished_wall = time.monotonic()

    def linger(self, seconds: float) -> None:
        """Keep serving for `seconds` (after the run) so a scraper sees the final values."""
        self.finish()
        if self._server is not None and seconds > 0:
            time.sleep(seconds)

    def close(self) -> None:
        """Stop the HTTP server (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=5)
            self._server = self._server_thread = None

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _DerivedGauges:
    """prometheus-client custom collector: the gauges, computed from the collector at scrape."""

    def __init__(self, collector: Collector) -> None:
        self.c = collector

    def describe(self):
        return [GaugeMetricFamily(m.name, m.help, labels=m.labels) for m in METRICS if m.kind == "gauge"]

    def collect(self):
        c = self.c
        snap = c.snapshot()
        s = c.scenario
        fams = {m.name: GaugeMetricFamily(m.name, m.help, labels=m.labels) for m in METRICS if m.kind == "gauge"}
        fams[EMULATED_TIME.name].add_metric([s], snap.emulated_s)
        fams[WALL_TIME.name].add_metric([s], snap.wall_s)
        fams[LAG.name].add_metric([s], snap.lag_s)
        if c.vocab_size:
            fams[VOCAB_SIZE.name].add_metric([s], c.vocab_size)
        for (tier, policy) in snap.per_tier:
            fams[TIER_THROUGHPUT.name].add_metric([s, tier, policy], snap.tier_throughput_window.get((tier, policy), 0.0))
            fams[TIER_THROUGHPUT_RUN.name].add_metric([s, tier, policy], snap.tier_throughput.get((tier, policy), 0.0))
        for tier, n in snap.active_devices.items():
            fams[ACTIVE_DEVICES.name].add_metric([s, tier, c._tier_policy.get(tier, "unknown")], n)
        if not math.isnan(snap.jain_window):
            fams[JAIN.name].add_metric([s], snap.jain_window)
        if not math.isnan(snap.jain_run):
            fams[JAIN_RUN.name].add_metric([s], snap.jain_run)
        return list(fams.values())


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host` (for tests and `testbed dashboards up`)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
