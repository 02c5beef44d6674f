"""The collector: folds the run's events (agents.events) into per-tier totals, per-device spans and
the exporter's counters and histograms; its snapshot is what the progress display and the scrape-time
gauges read (docs/design.md section 3, the data flow, and section 4, "Metrics").

Data flow::

    device groups / the virtual clock's replay --agents.events--> testbed.run --> testbed.sinks.Sinks
        -> Collector.ingest_events(events) -> the Exporter's metrics (HTTP /metrics)
                                           -> snapshot() (the progress display, the gauges)
        -> testbed.results.ResultsWriter (tokens.parquet): the same events, so every counter equals
           its sum over tokens.parquet (tests/testbed/test_metrics_equal_results.py)

The virtual clock's content pass (tokens final, no times, no links) is folded apart
(`ingest_content`): it moves only the content totals the progress display shows, never a metric;
the timed figures come from the replay's events. The run reports its clock (`clock`) and the
verifier's protocol errors (`protocol_errors`) directly.

Usage::

    collector = Collector(scenario.name, tiers={"phone": "cu-hlm", "laptop": "u-hlm"}, vocab_size=151936)
    collector.serve(metrics_port)            # 0 = off; binds 127.0.0.1 unless host= is given
    ... for every list of events: collector.ingest_events(events)
    collector.finish()                       # freezes the wall clock gauge
    collector.linger(linger_seconds)         # keep serving so a scraper sees the final values
    collector.close()
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from agents.events import MessageLost, ShadowResolved, TokenCommitted, UploadSent, VerdictReceived, VerifierBatch
from testbed import figures
from testbed.metrics.definitions import (
    ACCEPTED,
    ACTOR_RESTARTS,
    DOWNLINK_MESSAGES,
    DOWNLINK_WIRE_BYTES,
    FIDELITY,
    LOST,
    MAX_VERIFIER_SERIES,
    PAYLOAD_BYTES,
    PROTOCOL_ERRORS,
    RESAMPLED,
    RETRANSMISSIONS,
    SKIPS,
    TOKEN_LATENCY,
    TOKENS_COMMITTED,
    TOKENS_DRAFTED,
    UNCERTAINTY,
    UPLINK_BYTES,
    UPLINK_MESSAGES,
    UPLINK_WIRE_BYTES,
    UPLOAD_K,
    UPLOAD_PAYLOAD,
    UPLOADS,
    VERIFIER_BATCH_SIZE,
    VERIFIER_BATCH_TOKENS,
    VERIFIER_QUEUE_WAIT,
    VERIFIER_TOKENS,
    VERIFIER_VERIFY,
    VOCAB_ENTRIES,
)
from testbed.metrics.exporter import Exporter

DEFAULT_WINDOW_S = 10.0
# The tokens.parquet fields the fold reads (testbed.results.TokenRecord), and fidelity_tv where a row has it.
TOKEN_FIELDS = (
    "device",
    "tier",
    "policy",
    "draft_id",
    "uncertainty",
    "transmitted",
    "k",
    "payload_bytes",
    "uplink_bytes",
    "accepted",
    "resampled",
    "t_draft_start",
    "t_commit",
)


def _row(record) -> dict:
    """A row dict from a record with the fields as attributes (a TokenRecord, a frame's itertuples)."""
    return {**{f: getattr(record, f) for f in TOKEN_FIELDS}, "fidelity_tv": getattr(record, "fidelity_tv", math.nan)}


@dataclass
class TierTotals:
    """Counts of one tier's committed tokens (or of the whole run's)."""

    drafted: int = 0
    committed: int = 0
    uploads: int = 0
    skips: int = 0
    accepted: int = 0
    resampled: int = 0
    uplink_bytes: int = 0
    payload_bytes: int = 0
    vocab_entries: int = 0

    def count(self, row: Mapping) -> None:
        """Count one committed token, given as its tokens.parquet row (testbed.results.TokenRecord's
        fields). An upload is a transmitted draft (llm-only sends a request without one: neither an
        upload nor a skip); a skip is a token committed without an upload."""
        drafted = int(row["draft_id"]) >= 0
        transmitted = bool(row["transmitted"])
        self.committed += 1
        self.drafted += drafted
        if transmitted and drafted:
            self.uploads += 1
            self.vocab_entries += int(row["k"])
            self.payload_bytes += int(row["payload_bytes"])
            self.accepted += bool(row["accepted"])
        elif not transmitted:
            self.skips += 1
        self.resampled += bool(row["resampled"])
        self.uplink_bytes += int(row["uplink_bytes"])

    def add(self, o: TierTotals) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(o, f))

    @property
    def skip_rate(self) -> float:
        return figures.skip_rate(self.skips, self.committed)

    @property
    def acceptance_rate(self) -> float:
        return figures.acceptance_rate(self.accepted, self.uploads)


@dataclass(frozen=True)
class Clock:
    """What a clock reported last (the runner's, or one group's): the run's emulated time, wall time
    and lag are the maxima over sources, active devices (tier -> count) the sum."""

    emulated_s: float
    wall_s: float
    lag_s: float = 0.0
    active_devices: Mapping[str, int] = field(default_factory=dict)


class _Device:
    """One device's throughput: tokens, its span (first draft start to last commit) and the commits
    inside the sliding window."""

    __slots__ = ("key", "n", "t_first_start", "t_last_commit", "recent")

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        self.n = 0
        self.t_first_start = math.inf
        self.t_last_commit = -math.inf
        self.recent: deque[float] = deque()

    def commit(self, t_start: float, t_commit: float, window_s: float) -> None:
        """A token drafted from `t_start`, committed at `t_commit` (NaN, the content pass: no span)."""
        self.n += 1
        self.t_first_start = min(self.t_first_start, t_start)  # min/max keep the first on NaN
        self.t_last_commit = max(self.t_last_commit, t_commit)
        self.recent.append(t_commit)
        while self.recent[0] <= t_commit - window_s:
            self.recent.popleft()


@dataclass
class _Observed:
    """One tier's histogram observations of one call, in token order (Collector._fold_tokens)."""

    uncertainty: list[float] = field(default_factory=list)
    upload_k: list[int] = field(default_factory=list)
    upload_payload: list[int] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    fidelity: list[float] = field(default_factory=list)


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for every v of `values` in order, in one go: what prometheus_client's
    observe costs per value (a lock and a linear bucket search each) was the collector's largest cost
    at fleet scale. It has no batch form, so this reaches into its (stable since 0.4) internals, and
    leaves the series exactly as the one-by-one observes would: a value counts in the first bucket
    whose bound is >= it (NaN in none; searchsorted puts it past the last), and the sum adds the
    values one at a time, in order (float addition does not associate, so no np.sum)."""
    if not len(values):
        return
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds) + 1)
    for bucket, n in zip(histogram._buckets, counts[: len(bounds)].tolist()):
        if n:
            bucket.inc(n)
    total = histogram._sum.get()
    for v in values:
        total += v
    histogram._sum.set(total)


@dataclass
class Snapshot:
    """The collector's current figures (for the progress display and the gauges)."""

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
    content: dict[tuple[str, str], TierTotals] = field(default_factory=dict)
    """(tier, policy) -> the virtual clock's content pass so far (progress only, never exported)."""

    @property
    def skip_rate(self) -> float:
        return self.totals.skip_rate

    @property
    def acceptance_rate(self) -> float:
        return self.totals.acceptance_rate


def verifier_label(name: str, pool: str, n_verifiers: int) -> str:
    """The verifier label of a verifier's metrics: its name in a run of at most MAX_VERIFIER_SERIES
    verifiers, else its pool's (definitions.VERIFIER_LABELS: bounded cardinality)."""
    return name if n_verifiers <= MAX_VERIFIER_SERIES else pool


@dataclass
class CollectorState:
    """A collector's folded figures (Collector.state), to add to another's (Collector.absorb)."""

    totals: dict[tuple[str, str], TierTotals]
    devices: dict[int, tuple]  # device -> (key, n, first draft start, last commit, recent commits)
    tier_spans: dict[tuple[str, str], tuple[float, float]]
    max_event_t: float
    verifier_batches: int
    verifier_requests: int
    samples: list  # Exporter.samples()


class Collector:
    """Folds the run's events and exports them as Prometheus metrics (testbed.metrics.exporter).

    Thread-safe: events may be folded from any thread while the HTTP server scrapes.

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
        verifier: str = "verifier",
    ) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.scenario = scenario
        self.vocab_size = vocab_size
        self.window_s = float(window_s)
        self._lock = threading.RLock()
        self._t0 = time.monotonic()
        self._finished_wall: float | None = None
        self._tier_policy: dict[str, str] = dict(tiers or {})
        self._totals: dict[tuple[str, str], TierTotals] = {}
        self._content: dict[tuple[str, str], TierTotals] = {}
        self._devices: dict[int, _Device] = {}
        self._tier_span: dict[tuple[str, str], list[float]] = {}  # key -> [first draft start, last commit]
        self._clocks: dict[str, Clock] = {}
        self._max_event_t = 0.0
        self._verifier_batches = 0
        self._verifier_requests = 0
        self._errors: dict[str, int] = {}
        self.verifier = verifier  # the verifier label of the batches folded here (verifier_label)
        self.exporter = Exporter(scenario, registry)
        self.registry = self.exporter.registry
        self.exporter.add_gauges(self.snapshot, vocab_size, lambda tier: self._tier_policy.get(tier, "unknown"))
        for tier, policy in self._tier_policy.items():
            self._key((tier, policy))

    # -- folding events --------------------------------------------------------------------
    def ingest_events(self, events: Iterable) -> None:
        """Fold the run's timed events (agents.events), as testbed.run forwards them: tokens from
        TokenCommitted (fidelity where known at the commit), the fidelity of skipped tokens from
        ShadowResolved, link counters from UploadSent / VerdictReceived / MessageLost, verifier
        batches from VerifierBatch."""
        rows, shadows, batches = [], [], []
        # (tier, policy, direction) -> messages, bytes, lost, retransmissions
        links: defaultdict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for e in events:
            if isinstance(e, TokenCommitted):
                rows.append(e.row)
            elif isinstance(e, ShadowResolved):
                if math.isfinite(e.fidelity_tv):
                    shadows.append(e)
            elif isinstance(e, UploadSent):
                acc = links[(e.tier, e.policy, "uplink")]
                acc[0] += 1
                acc[1] += e.bytes
                acc[3] += e.retransmissions
            elif isinstance(e, VerdictReceived):
                acc = links[(e.tier, e.policy, "downlink")]
                acc[0] += 1
                acc[1] += e.bytes
            elif isinstance(e, MessageLost):
                links[(e.tier, e.policy, e.direction)][2] += e.count
            elif isinstance(e, VerifierBatch):
                batches.append(e)
        with self._lock:
            self._fold_tokens(rows)
            for b in batches:
                self._fold_batch(b)
            for (tier, policy, direction), acc in links.items():
                self._fold_link((tier, policy), direction, *acc)
            fidelity: dict[tuple[str, str], list[float]] = {}
            for e in shadows:
                dev = self._devices.get(e.device)  # its token was committed (and folded) before
                if dev is not None:
                    fidelity.setdefault(dev.key, []).append(e.fidelity_tv)
            for key, values in fidelity.items():
                observe_all(self.exporter.tier(FIDELITY, key), values)

    def ingest_token_records(self, rows: Iterable) -> None:
        """Fold committed tokens given as tokens.parquet rows (testbed.results.TokenRecord or dicts
        or any record with its fields as attributes), as if each came in a TokenCommitted."""
        self.ingest_events(TokenCommitted(dict(r) if isinstance(r, Mapping) else _row(r)) for r in rows)

    def ingest_content(self, events: Iterable) -> None:
        """Fold the virtual clock's content pass: its tokens count in the content totals only
        (Snapshot.content, for progress); no metric moves (the replay's events bring the timed ones)."""
        with self._lock:
            for e in events:
                if isinstance(e, TokenCommitted):
                    key = (str(e.row["tier"]), str(e.row["policy"]))
                    self._content.setdefault(key, TierTotals()).count(e.row)

    def clock(
        self,
        source: str,
        emulated_s: float,
        wall_s: float,
        lag_s: float = 0.0,
        active_devices: Mapping[str, int] | None = None,
    ) -> None:
        """A clock's progress (the runner's, or a group's): the latest report per source counts."""
        with self._lock:
            self._clocks[source] = Clock(emulated_s, wall_s, lag_s, dict(active_devices or {}))
            self._max_event_t = max(self._max_event_t, emulated_s)

    def protocol_errors(self, reason: str, count: int = 1) -> None:
        """`count` more client messages answered with an error reply (reason: the verifier's ErrorCode name)."""
        with self._lock:
            self._errors[reason] = self._errors.get(reason, 0) + count
            self.exporter.run(PROTOCOL_ERRORS, reason).inc(count)

    def actor_restart(self, actor: str) -> None:
        """One actor restart (testbed.run.recovery: a dead verifier or device group brought back)."""
        with self._lock:
            self.exporter.run(ACTOR_RESTARTS, actor).inc()

    def _key(self, key: tuple[str, str]) -> TierTotals:
        t = self._totals.get(key)
        if t is None:
            t = self._totals[key] = TierTotals()
            self._tier_policy.setdefault(key[0], key[1])
            self.exporter.add_tier(key)
        return t

    def _fold_tokens(self, rows: list[dict]) -> None:
        """Committed tokens: totals per tier (counted once per call, then added to the counters),
        the histograms (each series' values gathered, then observed at once: observe_all), and each
        device's span and recent commits."""
        deltas: dict[tuple[str, str], TierTotals] = {}
        observed: dict[tuple[str, str], _Observed] = {}
        window = self.window_s
        touched: dict[int, _Device] = {}
        max_t = self._max_event_t
        for row in rows:
            key = (str(row["tier"]), str(row["policy"]))
            d = deltas.get(key)
            if d is None:
                self._key(key)
                d = deltas[key] = TierTotals()
                observed[key] = _Observed()
            d.count(row)
            o = observed[key]
            t_commit, t_start = float(row["t_commit"]), float(row["t_draft_start"])
            latency = t_commit - t_start if t_start == t_start else 0.0  # the content pass has no times
            drafted, transmitted = int(row["draft_id"]) >= 0, bool(row["transmitted"])
            u = float(row["uncertainty"])
            if drafted and u == u:  # not NaN
                o.uncertainty.append(u)
            if transmitted and drafted:
                o.upload_k.append(int(row["k"]))
                o.upload_payload.append(int(row["payload_bytes"]))
            o.latency.append(latency)
            f = float(row.get("fidelity_tv", math.nan))
            if math.isfinite(f):
                o.fidelity.append(f)
            device = int(row["device"])
            dev = self._devices.get(device)
            if dev is None:
                dev = self._devices[device] = _Device(key)
            touched[device] = dev
            dev.commit(t_commit - latency, t_commit, window)
            max_t = max(max_t, t_commit)
        self._max_event_t = max_t
        for dev in touched.values():
            span = self._tier_span.setdefault(dev.key, [math.inf, -math.inf])
            span[0] = min(span[0], dev.t_first_start)
            span[1] = max(span[1], dev.t_last_commit)
        for key, d in deltas.items():
            self._add_totals(key, d)
        series = self.exporter.tier
        for key, o in observed.items():
            for m, values in (
                (UNCERTAINTY, o.uncertainty),
                (UPLOAD_K, o.upload_k),
                (UPLOAD_PAYLOAD, o.upload_payload),
                (TOKEN_LATENCY, o.latency),
                (FIDELITY, o.fidelity),
            ):
                observe_all(series(m, key), values)

    def _add_totals(self, key: tuple[str, str], d: TierTotals) -> None:
        """A tier's counts of one call: to its totals and its counters."""
        self._totals[key].add(d)
        for m, v in (
            (TOKENS_DRAFTED, d.drafted),
            (TOKENS_COMMITTED, d.committed),
            (UPLOADS, d.uploads),
            (SKIPS, d.skips),
            (ACCEPTED, d.accepted),
            (RESAMPLED, d.resampled),
            (UPLINK_BYTES, d.uplink_bytes),
            (PAYLOAD_BYTES, d.payload_bytes),
            (VOCAB_ENTRIES, d.vocab_entries),
        ):
            if v:
                self.exporter.tier(m, key).inc(v)

    def _fold_batch(self, b: VerifierBatch) -> None:
        verify_s = b.t_end - b.t_start
        v = self.verifier

        def run(m):
            return self.exporter.run(m, v)

        run(VERIFIER_BATCH_SIZE).observe(b.size)
        run(VERIFIER_BATCH_TOKENS).observe(b.n_tokens)
        run(VERIFIER_VERIFY).observe(verify_s)
        run(VERIFIER_TOKENS).inc(b.n_tokens)
        observe_all(run(VERIFIER_QUEUE_WAIT), b.queue_waits)
        self._verifier_batches += 1
        self._verifier_requests += b.size
        if b.t_start == b.t_start:
            self._max_event_t = max(self._max_event_t, b.t_start + verify_s)

    def _fold_link(
        self, key: tuple[str, str], direction: str, messages: int, nbytes: int, lost: int, retransmissions: int
    ) -> None:
        """One tier's link events in one direction, as increments."""
        self._key(key)
        up = direction == "uplink"
        for m, v in (
            ((UPLINK_MESSAGES if up else DOWNLINK_MESSAGES), messages),
            ((UPLINK_WIRE_BYTES if up else DOWNLINK_WIRE_BYTES), nbytes),
            (LOST, lost),
            (RETRANSMISSIONS, retransmissions),
        ):
            if v:
                self.exporter.tier(m, key).inc(v)

    # -- partitions ------------------------------------------------------------------------
    def state(self) -> CollectorState:
        """What this collector folded, to be added to another (absorb): a partition replayed in a worker
        folds its own events, and the driver's collector absorbs the result."""
        with self._lock:
            return CollectorState(
                {k: TierTotals(**vars(t)) for k, t in self._totals.items()},
                {d: (v.key, v.n, v.t_first_start, v.t_last_commit, list(v.recent)) for d, v in self._devices.items()},
                {k: tuple(v) for k, v in self._tier_span.items()},
                self._max_event_t,
                self._verifier_batches,
                self._verifier_requests,
                self.exporter.samples(),
            )

    def absorb(self, st: CollectorState) -> None:
        """Add a collector's state() of other devices (another partition) to this one: totals, spans,
        counters and histograms, as if its events had been folded here."""
        with self._lock:
            for key, t in st.totals.items():
                self._key(key)
                self._totals[key].add(t)
            for device, (key, n, first, last, recent) in st.devices.items():
                dev = self._devices[device] = _Device(key)
                dev.n, dev.t_first_start, dev.t_last_commit = n, first, last
                dev.recent.extend(recent)
            for key, (first, last) in st.tier_spans.items():
                span = self._tier_span.setdefault(key, [math.inf, -math.inf])
                span[0], span[1] = min(span[0], first), max(span[1], last)
            self._max_event_t = max(self._max_event_t, st.max_event_t)
            self._verifier_batches += st.verifier_batches
            self._verifier_requests += st.verifier_requests
            self.exporter.add_samples(st.samples)

    # -- figures ---------------------------------------------------------------------------
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
                verifier_batch_size_mean=(
                    self._verifier_requests / self._verifier_batches if self._verifier_batches else math.nan
                ),
                protocol_errors=dict(self._errors),
                content={k: TierTotals(**vars(t)) for k, t in self._content.items()},
            )

    # -- serving (testbed.metrics.exporter) -------------------------------------------------
    def exposition(self) -> bytes:
        """The metrics in Prometheus text format (what /metrics serves)."""
        return self.exporter.exposition()

    def serve(self, port: int, host: str = "127.0.0.1") -> int | None:
        """Serve /metrics over HTTP (Exporter.serve: port 0 is off, < 0 any free port)."""
        return self.exporter.serve(port, host)

    @property
    def port(self) -> int | None:
        return self.exporter.port

    @property
    def url(self) -> str | None:
        return self.exporter.url

    def finish(self) -> None:
        """Mark the run finished: the wall time gauge stops advancing."""
        with self._lock:
            if self._finished_wall is None:
                self._finished_wall = time.monotonic()

    def linger(self, seconds: float) -> None:
        """Keep serving for `seconds` (after the run) so a scraper sees the final values."""
        self.finish()
        if self.exporter.serving and seconds > 0:
            time.sleep(seconds)

    def close(self) -> None:
        """Stop the HTTP server (idempotent)."""
        self.exporter.close()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
