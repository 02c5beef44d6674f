"""Every exported metric, and the PromQL of every derived figure written next to the metrics it is
built from (vLLM style: one place to read what /metrics serves; docs/design.md section 4, "Metrics").

Naming: prefix ``hlm_``, base units in the name (``_seconds``, ``_bytes``), counters end in
``_total``; labels are ``scenario`` (every metric) and ``tier``/``policy`` (per-tier metrics)
only. Devices are never labels: per-device figures (fairness) are aggregated by the collector.

What a rate means (two clocks)
------------------------------
Every counter advances when the collector folds the events, i.e. with the *emulated*
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

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from testbed.metrics.promql import Sel

RUN_LABELS = ("scenario",)
TIER_LABELS = ("scenario", "tier", "policy")
# A run's verifier metrics: by verifier, the label bounded (testbed.metrics.verifier_label): a run with
# up to MAX_VERIFIER_SERIES verifiers has a series each (their names); a larger one a series per pool of
# identical verifiers (servers[i].name), so hundreds of verifiers cost a few series, not hundreds.
VERIFIER_LABELS = ("scenario", "verifier")
MAX_VERIFIER_SERIES = 16


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


# Tokens (from TokenCommitted, ShadowResolved for a skipped token's fidelity)
TOKENS_DRAFTED = _m(
    "hlm_tokens_drafted_total",
    "counter",
    "Tokens drafted by a device SLM (committed drafts and drafts the LLM replaced).",
)
TOKENS_COMMITTED = _m("hlm_tokens_committed_total", "counter", "Tokens committed on devices (the generated text).")
UPLOADS = _m(
    "hlm_uploads_total",
    "counter",
    "Drafts whose (truncated) distribution was uploaded for verification (llm-only requests without a draft "
    "are not counted).",
)
SKIPS = _m("hlm_skips_total", "counter", "Tokens committed without an upload (drafts accepted on the device).")
ACCEPTED = _m("hlm_drafts_accepted_total", "counter", "Uploaded drafts the LLM accepted.")
RESAMPLED = _m(
    "hlm_drafts_resampled_total",
    "counter",
    "Uploaded drafts the LLM rejected and replaced by a token resampled from the residual.",
)
UPLINK_BYTES = _m(
    "hlm_uplink_bytes_total",
    "counter",
    "Bytes tokens put on the uplink (frame headers, payload, piggybacked ids, retransmissions).",
)
PAYLOAD_BYTES = _m(
    "hlm_payload_bytes_total",
    "counter",
    "Bytes of the encoded distribution payloads (indices + quantised probabilities).",
)
VOCAB_ENTRIES = _m("hlm_vocab_entries_sent_total", "counter", "Vocabulary entries sent in uploads (sum of k).")
UNCERTAINTY = _m(
    "hlm_token_uncertainty", "histogram", "Uncertainty u(t) of drafted tokens.", buckets=[i / 20 for i in range(21)]
)
UPLOAD_K = _m(
    "hlm_upload_vocab_entries",
    "histogram",
    "Vocabulary entries k per upload.",
    buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536, 262144],
)
UPLOAD_PAYLOAD = _m(
    "hlm_upload_payload_bytes",
    "histogram",
    "Payload bytes per upload.",
    buckets=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144, 1048576],
)
TOKEN_LATENCY = _m(
    "hlm_token_latency_seconds",
    "histogram",
    "Emulated seconds from a token's draft start to its commit.",
    buckets=[0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30],
)
# Fidelity (tokens.parquet's fidelity_tv, docs/design.md section 7): a histogram, so its series
# hlm_fidelity_tv_sum (the sum of per-token TV) and hlm_fidelity_tv_count (tokens with a value)
# give the mean (DERIVED["mean_fidelity_tv"]); only tokens whose value is known are observed.
FIDELITY = _m(
    "hlm_fidelity_tv",
    "histogram",
    "Exact total-variation distance between the law a committed token was drawn from and the LLM's "
    "distribution at its position (0: the LLM's own law).",
    buckets=[1e-6, 1e-4, 1e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1],
)

# Verifier (from VerifierBatch), by verifier (VERIFIER_LABELS)
VERIFIER_BATCH_SIZE = _m(
    "hlm_verifier_batch_size",
    "histogram",
    "Requests per verifier batch.",
    VERIFIER_LABELS,
    [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128],
)
VERIFIER_BATCH_TOKENS = _m(
    "hlm_verifier_batch_tokens",
    "histogram",
    "Tokens processed by the LLM per verifier batch (drafts + piggybacked ids).",
    VERIFIER_LABELS,
    [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096],
)
VERIFIER_QUEUE_WAIT = _m(
    "hlm_verifier_queue_wait_seconds",
    "histogram",
    "Emulated seconds a request waited at the verifier before its batch started.",
    VERIFIER_LABELS,
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5],
)
VERIFIER_VERIFY = _m(
    "hlm_verifier_verify_seconds",
    "histogram",
    "Emulated seconds per verifier batch (server profile).",
    VERIFIER_LABELS,
    [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2],
)
VERIFIER_TOKENS = _m("hlm_verifier_tokens_total", "counter", "Tokens processed by the verifier's LLM.", VERIFIER_LABELS)
PROTOCOL_ERRORS = _m(
    "hlm_protocol_errors_total",
    "counter",
    "Client messages answered with an error reply, by reason (the verifier's ErrorCode name: "
    "BAD_FRAME, OVERSIZED, OUT_OF_ORDER, UNKNOWN_SESSION, REFUSED, LIMIT, ...).",
    RUN_LABELS + ("reason",),
)
ACTOR_ROLES = ("verifier", "group")  # the actor label of hlm_actor_restarts_total
ACTOR_RESTARTS = _m(
    "hlm_actor_restarts_total",
    "counter",
    "Actors that died and were restarted by deterministic replay (actor: verifier or group).",
    RUN_LABELS + ("actor",),
)

# Links (from UploadSent, VerdictReceived, MessageLost)
UPLINK_MESSAGES = _m("hlm_link_uplink_messages_total", "counter", "Messages sent on uplinks (first transmissions).")
DOWNLINK_MESSAGES = _m(
    "hlm_link_downlink_messages_total", "counter", "Messages sent on downlinks (first transmissions)."
)
UPLINK_WIRE_BYTES = _m(
    "hlm_link_uplink_bytes_total", "counter", "Bytes put on uplinks, including headers and retransmissions."
)
DOWNLINK_WIRE_BYTES = _m(
    "hlm_link_downlink_bytes_total", "counter", "Bytes put on downlinks, including headers and retransmissions."
)
LOST = _m("hlm_link_lost_messages_total", "counter", "Transmissions dropped by a link.")
RETRANSMISSIONS = _m("hlm_link_retransmissions_total", "counter", "Retransmissions after a loss or timeout.")

# Gauges computed by the collector at scrape time
EMULATED_TIME = _m(
    "hlm_emulated_time_seconds", "gauge", "Emulated time reached by the run (seconds since its start).", RUN_LABELS
)
WALL_TIME = _m("hlm_wall_time_seconds", "gauge", "Real seconds since the run started.", RUN_LABELS)
LAG = _m(
    "hlm_lag_seconds",
    "gauge",
    "Wall clock: real seconds the emulation is behind schedule (0 when keeping up or virtual).",
    RUN_LABELS,
)
VOCAB_SIZE = _m(
    "hlm_vocabulary_size",
    "gauge",
    "Vocabulary size |V| of the model pair (entries of a full distribution).",
    RUN_LABELS,
)
ACTIVE_DEVICES = _m("hlm_active_devices", "gauge", "Devices that still have tokens to generate.")
TIER_THROUGHPUT = _m(
    "hlm_tokens_per_emulated_second",
    "gauge",
    "Tokens committed per emulated second over the collector's sliding window.",
)
TIER_THROUGHPUT_RUN = _m(
    "hlm_run_tokens_per_emulated_second",
    "gauge",
    "Tokens committed per emulated second over the whole run so far (over the tier's span: first "
    "draft start to last commit).",
)
JAIN = _m(
    "hlm_jain_fairness_ratio",
    "gauge",
    "Jain's fairness index over per-device throughput in the sliding window (active devices without tokens "
    "count as 0).",
    RUN_LABELS,
)
JAIN_RUN = _m(
    "hlm_jain_fairness_run_ratio",
    "gauge",
    "Jain's fairness index over per-device throughput (tokens / own draft-start-to-last-commit span) over "
    "the whole run.",
    RUN_LABELS,
)

METRICS: tuple[Metric, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Metric))


@dataclass(frozen=True)
class Derived:
    """A figure computed in PromQL from the metrics above. `unit` is a Grafana unit id."""

    name: str
    help: str
    unit: str
    promql: Callable[[Sel], str]

    def expr(self, sel: Sel | None = None, **kw) -> str:
        from testbed.metrics.promql import Sel

        return self.promql(sel if sel is not None else Sel(**kw))


def _d(name: str, help: str, unit: str, fn: Callable[[Sel], str]) -> Derived:
    return Derived(name, help, unit, fn)


DERIVED: dict[str, Derived] = {
    d.name: d
    for d in [
        _d(
            "throughput",
            "Tokens committed per emulated second.",
            "short",
            lambda s: s.per_emulated_second(s.sum(TOKENS_COMMITTED)),
        ),
        _d(
            "wall_throughput",
            "Tokens committed per wall second (emulation speed in the virtual clock).",
            "short",
            lambda s: (
                f"sum by ({s._by(TOKENS_COMMITTED)}) (rate({s.series(TOKENS_COMMITTED)}[{s.window}]))"
                if s.window
                else f"{s.sum(TOKENS_COMMITTED)} / on (scenario) group_left () "
                f"max by (scenario) ({s.series(WALL_TIME)})"
            ),
        ),
        _d(
            "skip_rate",
            "Fraction of committed tokens that were not uploaded (skipped).",
            "percentunit",
            lambda s: f"{s.sum(SKIPS)} / {s.sum(TOKENS_COMMITTED)}",
        ),
        _d(
            "acceptance_rate",
            "Fraction of uploaded drafts the LLM accepted.",
            "percentunit",
            lambda s: f"{s.sum(ACCEPTED)} / {s.sum(UPLOADS)}",
        ),
        _d(
            "vocab_compression",
            "1 - vocabulary entries sent / (|V| x uploads).",
            "percentunit",
            lambda s: (
                f"1 - {s.sum(VOCAB_ENTRIES)} / ({s.sum(UPLOADS)} * on (scenario) group_left () "
                f"max by (scenario) ({s.series(VOCAB_SIZE)}))"
            ),
        ),
        _d(
            "mean_k",
            "Mean vocabulary entries per upload.",
            "short",
            lambda s: f"{s.sum(VOCAB_ENTRIES)} / {s.sum(UPLOADS)}",
        ),
        _d(
            "uplink_bytes_rate",
            "Uplink bytes (draft uploads) per emulated second.",
            "Bps",
            lambda s: s.per_emulated_second(s.sum(UPLINK_BYTES)),
        ),
        _d(
            "uplink_bytes_per_token",
            "Uplink bytes per committed token.",
            "bytes",
            lambda s: f"{s.sum(UPLINK_BYTES)} / {s.sum(TOKENS_COMMITTED)}",
        ),
        _d(
            "wire_bytes_rate",
            "Bytes on the uplinks incl. headers and retransmissions, per emulated second.",
            "Bps",
            lambda s: s.per_emulated_second(s.sum(UPLINK_WIRE_BYTES)),
        ),
        _d(
            "downlink_bytes_rate",
            "Bytes on the downlinks per emulated second.",
            "Bps",
            lambda s: s.per_emulated_second(s.sum(DOWNLINK_WIRE_BYTES)),
        ),
        _d(
            "loss_rate",
            "Fraction of link transmissions lost.",
            "percentunit",
            lambda s: (
                f"{s.sum(LOST)} / ({s.sum(UPLINK_MESSAGES)} + {s.sum(DOWNLINK_MESSAGES)} + {s.sum(RETRANSMISSIONS)})"
            ),
        ),
        _d(
            "retransmission_rate",
            "Retransmissions per emulated second.",
            "short",
            lambda s: s.per_emulated_second(s.sum(RETRANSMISSIONS)),
        ),
        _d("latency_p50", "Token latency median (emulated seconds).", "s", lambda s: s.quantile(0.5, TOKEN_LATENCY)),
        _d(
            "latency_p95",
            "Token latency 95th percentile (emulated seconds).",
            "s",
            lambda s: s.quantile(0.95, TOKEN_LATENCY),
        ),
        _d(
            "latency_p99",
            "Token latency 99th percentile (emulated seconds).",
            "s",
            lambda s: s.quantile(0.99, TOKEN_LATENCY),
        ),
        _d("mean_uncertainty", "Mean uncertainty of drafted tokens.", "short", lambda s: s.mean(UNCERTAINTY)),
        _d(
            "mean_fidelity_tv",
            "Mean per-token TV distance to the LLM's distribution (hlm_fidelity_tv_sum / "
            "hlm_fidelity_tv_count; 0 = exactly the LLM).",
            "short",
            lambda s: s.mean(FIDELITY),
        ),
        _d(
            "verifier_batch_size_mean",
            "Mean requests per verifier batch.",
            "short",
            lambda s: s.mean(VERIFIER_BATCH_SIZE),
        ),
        _d(
            "verifier_batch_tokens_mean",
            "Mean tokens per verifier batch.",
            "short",
            lambda s: s.mean(VERIFIER_BATCH_TOKENS),
        ),
        _d(
            "verifier_batches_rate",
            "Verifier batches per emulated second.",
            "short",
            lambda s: s.per_emulated_second(s.sum(VERIFIER_BATCH_SIZE, "_count")),
        ),
        _d(
            "verifier_utilisation",
            "Fraction of emulated time a verifier spent verifying (grouped by verifier: each one's; else the "
            "mean over the verifiers, or pools of them, that verified).",
            "percentunit",
            lambda s: (
                s.per_emulated_second(s.sum(VERIFIER_VERIFY, "_sum"))
                if "verifier" in s.by
                else f"{s.per_emulated_second(s.sum(VERIFIER_VERIFY, '_sum'))} / on (scenario) group_left () "
                f"count by (scenario) (group by (scenario, verifier) ({s.series(VERIFIER_VERIFY, '_count')}))"
            ),
        ),
        _d(
            "queue_wait_p50",
            "Verifier queue wait median (emulated seconds).",
            "s",
            lambda s: s.quantile(0.5, VERIFIER_QUEUE_WAIT),
        ),
        _d(
            "queue_wait_p95",
            "Verifier queue wait 95th percentile (emulated seconds).",
            "s",
            lambda s: s.quantile(0.95, VERIFIER_QUEUE_WAIT),
        ),
        _d(
            "emulation_speed",
            "Emulated seconds per wall second (1/time_scale when a wall-clock run keeps up).",
            "short",
            lambda s: f"max by (scenario) (deriv({s.series(EMULATED_TIME)}[{s.window or '1m'}]))",
        ),
    ]
}
