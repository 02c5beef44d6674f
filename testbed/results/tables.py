"""A run's summary, and several side by side, as tables for the terminal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_bytes(n: float | None) -> str:
    """1234567 -> '1.2 MB' (decimal units); None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _ms(block: dict, q: str) -> str:
    x = block["token_latency_s"][q]
    return "-" if x is None else f"{1000 * x:.1f}"


_ROWS = [
    ("devices", lambda b: str(b.get("devices", "-"))),
    ("tokens", lambda b: str(b["tokens"])),
    ("throughput (tok/s)", lambda b: _fmt(b["throughput_tokens_per_s"])),
    ("skip rate", lambda b: _pct(b["skip_rate"])),
    ("acceptance", lambda b: _pct(b["acceptance_rate"])),
    ("vocab compression", lambda b: _pct(b["vocab_compression"])),
    ("uplink", lambda b: format_bytes(b["uplink_bytes"])),
    ("uplink / token", lambda b: format_bytes(b["uplink_bytes_per_token"])),
    ("latency p50 (ms)", lambda b: _ms(b, "p50")),
    ("latency p95 (ms)", lambda b: _ms(b, "p95")),
    ("latency p99 (ms)", lambda b: _ms(b, "p99")),
    ("fidelity TV / token", lambda b: _fmt(b.get("fidelity_tv_mean"), ".2e")),
    ("jain fairness", lambda b: _fmt(b["jain_fairness"], ".3f")),
]


def _system_block(summary: Mapping[str, Any]) -> dict:
    return {**summary, "throughput_tokens_per_s": summary["throughput_tokens_per_s"]["system"]}


def summary_table(summary: Mapping[str, Any], title: str | None = None):
    """A rich Table: one column for the whole run, one per tier."""
    from rich.table import Table

    name = summary.get("scenario") or summary.get("name")
    title = title or (f"{name}: " if name else "") + (
        f"{_fmt(summary['emulated_seconds'], '.2f')} s emulated, {_fmt(summary['wall_seconds'], '.1f')} s wall"
    )
    table = Table(
        title=title,
        caption=f"verifier batch size mean {_fmt(summary['verifier_batch_size_mean'], '.2f')} "
        f"over {summary['verifier_batches']} batches",
    )
    tiers = summary.get("tiers", {})
    table.add_column("")
    table.add_column("all", justify="right", style="bold")
    for t, b in tiers.items():
        table.add_column(f"{t}\n[dim]{b.get('policy', '')}[/dim]", justify="right")
    blocks = [_system_block(summary), *tiers.values()]
    for label, cell in _ROWS:
        table.add_row(label, *(cell(b) for b in blocks))
    return table


def comparison_table(summaries: Mapping[str, Mapping[str, Any]], title: str = "comparison"):
    """Several runs side by side (e.g. the policies of a sweep), one column per run."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    for label in summaries:
        table.add_column(label, justify="right")
    blocks = [_system_block(s) for s in summaries.values()]
    for label, cell in [("emulated (s)", lambda b: _fmt(b["emulated_seconds"], ".2f")), *_ROWS]:
        table.add_row(label, *(cell(b) for b in blocks))
    return table
