"""The testbed's dashboards: the run overview and the policy comparison."""

from __future__ import annotations

from testbed.dashboards.model import (
    POLICY,
    TIER,
    TIER_LEGEND,
    VERIFIER,
    Dashboard,
    Panel,
    Row,
    d,
    g,
    heat,
    help_text,
    top,
    whole_run,
)
from testbed.metrics import DERIVED
from testbed.metrics import definitions as M

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
                    description=help_text("skip_rate"),
                    width=6,
                ),
                Panel(
                    "Acceptance rate",
                    (d("acceptance_rate", TIER, TIER_LEGEND),),
                    unit="percentunit",
                    min=0,
                    max=1,
                    description=help_text("acceptance_rate"),
                    width=6,
                ),
                Panel(
                    "Vocabulary compression",
                    (d("vocab_compression", TIER, TIER_LEGEND),),
                    unit="percentunit",
                    min=0,
                    max=1,
                    description=help_text("vocab_compression"),
                    width=6,
                ),
                Panel(
                    "Entries per upload (mean k)",
                    (d("mean_k", TIER, TIER_LEGEND),),
                    unit="short",
                    description=help_text("mean_k"),
                    width=6,
                ),
                Panel(
                    "Fidelity: TV to the LLM per token (mean)",
                    (d("mean_fidelity_tv", TIER, TIER_LEGEND),),
                    unit="short",
                    min=0,
                    description=help_text("mean_fidelity_tv") + " " + M.FIDELITY.help,
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
                    description=help_text("uplink_bytes_rate") + " " + RATE_NOTE,
                    width=6,
                ),
                Panel(
                    "Uplink bytes per token",
                    (d("uplink_bytes_per_token", TIER, TIER_LEGEND),),
                    unit="bytes",
                    description=help_text("uplink_bytes_per_token"),
                    width=6,
                ),
                Panel(
                    "Link bytes / emulated s",
                    (d("wire_bytes_rate", (), "uplink (wire)"), d("downlink_bytes_rate", (), "downlink (wire)")),
                    unit="Bps",
                    description=help_text("wire_bytes_rate", "downlink_bytes_rate"),
                    width=6,
                ),
                Panel(
                    "Loss and retransmissions",
                    (
                        d("loss_rate", TIER, "loss {{tier}}"),
                        d("retransmission_rate", TIER, "retransmissions/s {{tier}}"),
                    ),
                    unit="short",
                    description=help_text("loss_rate", "retransmission_rate"),
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
                    description=help_text("verifier_utilisation"),
                    width=6,
                ),
                Panel(
                    "Busiest verifiers (top 10)",
                    (top(10, "verifier_utilisation", VERIFIER, "{{verifier}}"),),
                    unit="percentunit",
                    min=0,
                    description="Utilisation of the 10 busiest verifiers (a run of more than "
                    f"{M.MAX_VERIFIER_SERIES} verifiers: of the busiest pools, its mean over the pool's verifiers "
                    "counts them as one; hlm_verifier_* carry a bounded verifier label).",
                    width=6,
                ),
                Panel(
                    "Batch size per verifier (top 10)",
                    (top(10, "verifier_batch_size_mean", VERIFIER, "{{verifier}}"),),
                    unit="short",
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
                    help_text("mean_fidelity_tv"),
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
