"""The metric definitions (testbed.metrics.definitions) and the PromQL of each derived figure
(testbed.metrics.promql.Sel)."""

from __future__ import annotations

import re

from testbed.metrics import DERIVED, METRICS, Sel


def test_metric_names_follow_prometheus_rules() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"hlm_[a-z0-9_]+", m.name), m.name
        # actor: verifier | group (hlm_actor_restarts_total), reason: an ErrorCode name
        # (hlm_protocol_errors_total), bounded like tier and policy
        assert (
            set(m.labels) <= {"scenario", "tier", "policy", "actor", "reason", "verifier"} and m.labels[0] == "scenario"
        ), m
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert m.help.strip(), m.name
        if m.kind == "histogram":
            assert list(m.buckets) == sorted(m.buckets) and m.buckets, m.name
        for bad in ("_ms", "milliseconds", "_kb", "_mb"):
            assert bad not in m.name, m.name
        if "latency" in m.name or "wait" in m.name or "time" in m.name:
            assert m.name.endswith(("_seconds", "_seconds_total")), m.name


def test_derived_promql_builds_for_every_figure() -> None:
    for d in DERIVED.values():
        for sel in (Sel(), Sel(by=("tier", "policy")), Sel(window=None, by=("policy",))):
            expr = d.expr(sel)
            assert "hlm_" in expr and expr.count("(") == expr.count(")"), (d.name, expr)
            assert not re.search(r"\bdevice\b", expr)


def test_promql_of_a_figure_per_emulated_second() -> None:
    # a counter's increase over the window, divided by the emulated seconds that passed in it
    expr = DERIVED["throughput"].expr(Sel(window="5m", scenario="s", tier=".*", policy=".*"))
    assert expr == (
        'sum by (scenario) (increase(hlm_tokens_committed_total{scenario=~"s", tier=~".*", '
        'policy=~".*"}[5m])) / on (scenario) group_left () max by (scenario) '
        '(delta(hlm_emulated_time_seconds{scenario=~"s"}[5m]))'
    )
    assert DERIVED["skip_rate"].expr(window=None, by=("tier",)).startswith("sum by (scenario, tier) (hlm_skips_total{")


def test_the_verifier_label_stays_bounded_for_hundreds_of_verifiers() -> None:
    from testbed.metrics import verifier_label
    from testbed.metrics.definitions import MAX_VERIFIER_SERIES

    few = {verifier_label(f"gpu-{i}", "gpu", MAX_VERIFIER_SERIES) for i in range(MAX_VERIFIER_SERIES)}
    assert len(few) == MAX_VERIFIER_SERIES  # a series per verifier
    many = {verifier_label(f"{pool}-{i}", pool, 300) for pool in ("h100", "a10") for i in range(150)}
    assert many == {"h100", "a10"}  # a series per pool
