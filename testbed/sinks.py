"""Where a run's events go (testbed.run forwards them): the metrics collector, the streaming
results writer and the live progress display."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from testbed import results

if TYPE_CHECKING:
    from testbed.metrics import TierTotals
    from testbed.run import Plan, RunOptions


class Sinks:
    """Where the run's events (agents.events) go; testbed.run only forwards them here:

    - the metrics collector (testbed.metrics.Collector; served on metrics.port when asked),
    - the streaming results writer (testbed.results.ResultsWriter: parquet shards as the run goes,
      tokens.parquet at the end),
    - the progress display (Progress: it shows the collector's snapshot).

    One collector and one writer for both clocks. Virtual clock: the content pass's events (tokens and
    decisions final, no times, no links) go to the collector's content totals (progress only, no
    metric) and to the writer with their times blanked, so a run cut short in that pass still leaves
    its rows (`content`); the replay's timed events feed everything (`events`), and its first token
    starts the writer again. Wall clock: the groups' events feed everything."""

    def __init__(self, p: Plan, opts: RunOptions):
        from testbed.metrics import Collector

        self.own = opts.collector is None  # else the caller's, which it serves and closes
        if opts.collector is not None:
            self.collector = cast(Collector, opts.collector)
        else:
            from testbed.run.plan import policy_labels

            tiers = policy_labels(p.scenario)[1]  # tier -> its policy's label
            self.collector = Collector(p.scenario.name, tiers=tiers, vocab_size=p.run.vocab_size)
            if opts.metrics_port is not None:
                self.collector.serve(opts.metrics_port or -1, opts.metrics_host)  # Collector.serve: -1 = any free port
                print(f"metrics: {self.collector.url}", flush=True)
        self.t0 = time.time()
        self.codes_seen: dict[str, int] = {}  # protocol errors ingested, by reason (clock)
        # Device ids run over the tiers in file order (testbed.config.devices): a device's tier is where
        # its id falls, so nothing is kept per device for it (a million devices).
        self.tier_names = [t.name for t in p.scenario.tiers]
        self.tier_ends = np.cumsum([t.count for t in p.scenario.tiers])
        self.ended: set[int] = set()  # devices whose sequence ended in the timed trace (eos, stop, length)
        self.ended_by_tier = np.zeros(len(self.tier_names), dtype=np.int64)
        self.content_tokens = self.timed_tokens = 0
        self.batch_sizes: list[int] = []  # every verifier batch's size (summary.json)
        self.partial: dict = {}  # summary entries a failed run still reports (restarts)
        self.writer = results.ResultsWriter(opts.out_dir / "tokens.shards", "tokens")
        self.writing_content = False  # the writer holds the content pass's rows (until the replay's first token)
        self.parts: list[Path] = []  # the rows of partitions replayed apart (partition), in order
        two_pass = opts.engine == "local" or p.scenario.clock == "virtual"
        self.progress = Progress(p, self.collector, enabled=opts.progress, content=two_pass)

    @property
    def tokens(self) -> int:
        """Tokens committed so far (by the content pass, or the timed trace when further)."""
        return max(self.content_tokens, self.timed_tokens)

    def content(self, events: list) -> None:
        """Events of the virtual clock's content pass: progress and partial results, with the times
        blanked (the replay computes them)."""
        from agents.events import TokenCommitted

        blank = {k: math.nan for k in ("t_draft_start", "t_upload_sent", "t_verdict", "t_commit")}
        events = [TokenCommitted({**e.row, **blank}) if isinstance(e, TokenCommitted) else e for e in events]
        self.content_tokens += sum(isinstance(e, TokenCommitted) for e in events)
        self.collector.ingest_content(events)
        self.writer.add(events)
        self.writing_content = True
        self.progress.update()

    def events(self, events: list) -> None:
        """Timed events: to the collector, the results writer and the progress display."""
        ended: set[int] = set()
        tokens = tally(events, ended, self.batch_sizes)
        self._ended(ended)
        self.timed_tokens += tokens
        if self.writing_content and tokens:  # the replay's rows replace the content pass's
            self.writer.reset()
            self.writing_content = False
        self.collector.ingest_events(events)
        self.writer.add(events)
        self.progress.timed()
        self.progress.update()

    def partition(self, part) -> None:
        """A partition replayed apart (testbed.run.partitions.PartitionResult): its figures into the
        collector, its rows (a parquet file of its own) into tokens.parquet at the end."""
        self.collector.absorb(part.collector)
        part.collector = None  # absorbed: its per-device spans need not stay twice
        self._ended(part.ended)
        self.batch_sizes.extend(part.batch_sizes)
        self.timed_tokens += part.tokens
        if part.path is not None:
            self.parts.append(part.path)
        self.progress.timed()
        self.progress.update()

    def _ended(self, devices: set[int]) -> None:
        """Devices whose sequence ended (a device ends once; a restarted wall-clock group may say it again)."""
        new = devices - self.ended
        if new:
            self.ended |= new
            tiers = np.searchsorted(self.tier_ends, np.fromiter(new, np.int64, len(new)), side="right")
            self.ended_by_tier += np.bincount(tiers, minlength=len(self.tier_names))

    def clock(self, lag_s: float, errors: int, codes: Mapping[str, int] | None = None) -> None:
        """The run's clock, and the protocol errors so far (cumulative): `codes` by the verifier's
        ErrorCode name (the reason label of hlm_protocol_errors_total); errors without one count as
        "malformed"."""
        active: dict[str, int] = {}
        for i, tier in enumerate(self.tier_names):
            count = int(self.tier_ends[i] - (self.tier_ends[i - 1] if i else 0))
            active[tier] = count - int(self.ended_by_tier[i])
        self.collector.clock("runner", self.collector.emulated_time(), time.time() - self.t0, lag_s, active)
        codes = {**(codes or {})}
        if errors > sum(codes.values()):
            codes["malformed"] = errors - sum(codes.values())
        for reason, n in sorted(codes.items()):
            if n > self.codes_seen.get(reason, 0):
                self.collector.protocol_errors(reason, n - self.codes_seen.get(reason, 0))
                self.codes_seen[reason] = n

    def restart(self, actor: str) -> None:
        """An actor ("verifier" or "group") died and is being restarted."""
        self.collector.actor_restart(actor)

    def results(self, path: Path):
        """Merge the shards into tokens.parquet (the trace's; the content pass's if the replay wrote no
        row, a run cut short) and return the columns summary.json needs (results.SUMMARY_COLUMNS);
        None when nothing was committed."""
        self.writer.close()
        if self.parts:  # partitions replayed apart: their files, one after the other
            self.writer.discard()
            results.concat_parts(self.parts, path)
        elif not self.writer.rows:
            self.writer.discard()
            return None
        else:
            self.writer.merge(path, frame=False)
        return results.read_tokens(path, results.SUMMARY_COLUMNS)  # what summary.json needs, not every column

    def close(self) -> None:
        self.progress.close()
        self.collector.finish()

    def linger(self, seconds: float) -> None:
        if self.own:
            if seconds > 0:
                self.collector.linger(seconds)
            self.collector.close()


def tally(events: list, ended: set[int], batch_sizes: list[int]) -> int:
    """The committed tokens among `events`; devices whose sequence ended go in `ended`, every verifier
    batch's size in `batch_sizes` (summary.json)."""
    from agents.events import TokenCommitted, VerifierBatch

    tokens = 0
    for e in events:
        if isinstance(e, TokenCommitted):
            tokens += 1
            if e.row.get("stop_reason"):
                ended.add(e.device)
        elif isinstance(e, VerifierBatch):
            batch_sizes.append(e.size)
    return tokens


# --- progress ----------------------------------------------------------------------------


class Progress:
    """A live table per tier on a terminal (tokens, emulated time and tokens/s, skip and
    acceptance rates); elsewhere (logs, CI) one line every `log_every_s` seconds. Both read the
    collector's snapshot (testbed.metrics.Snapshot), the figures the exporter serves. A virtual-clock
    run shows its content pass first (`content`: the snapshot's content totals, no times yet), then
    the replay (`timed`), each counting every token: the line names the pass."""

    def __init__(self, p: Plan, collector, enabled: bool = True, log_every_s: float = 10.0, content: bool = False):
        import sys

        self.content = content
        self.phase = "content pass" if content else ""
        self.total = len(p.specs) * p.run.max_new_tokens  # at most: a sequence may stop before
        self.collector = collector
        self.tier_names = [t.name for t in p.scenario.tiers]
        self.live = None
        self.log_every_s, self.last_log, self.t0 = log_every_s, time.time(), time.time()
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from rich.live import Live

            self.live = Live(self._table(), refresh_per_second=4, transient=False)
            self.live.start()

    def timed(self) -> None:
        """Timed events came: the virtual clock's replay, from here on."""
        if self.content:
            self.content, self.phase = False, "replay (emulated times)"

    def update(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
        elif self.enabled and time.time() - self.last_log >= self.log_every_s:
            self.last_log = time.time()
            self.log_line()

    def _tiers(self, snap) -> list[tuple[str, TierTotals, float]]:
        """(tier, its totals, its tokens per emulated second) in the scenario's order: the content pass's
        totals (no emulated times yet: no rate) or the timed ones."""
        from testbed.metrics import TierTotals

        per_tier, rates = (snap.content, {}) if self.content else (snap.per_tier, snap.tier_throughput)
        by_tier = {t: (tot, rates.get((t, pol), 0.0)) for (t, pol), tot in per_tier.items()}
        return [(name, *by_tier.get(name, (TierTotals(), 0.0))) for name in self.tier_names]

    def log_line(self) -> None:
        import sys

        snap = self.collector.snapshot()
        tiers = self._tiers(snap)
        parts = [
            f"{name}: {t.committed} tok, "
            + (f"{rate:.1f} tok/s emulated, " if rate > 0 else "")
            + f"skip {_pct(t.skip_rate, '.0%')}"
            for name, t, rate in tiers
        ]
        print(
            f"[{time.time() - self.t0:6.0f}s] {self._phase()}tokens {sum(t.committed for _, t, _ in tiers)} "
            f"(of at most {self.total}) | " + " | ".join(parts),
            file=sys.stderr,
            flush=True,
        )

    def _table(self):
        from rich.table import Table

        snap = self.collector.snapshot()
        tiers = self._tiers(snap)
        table = Table(title=f"{self._phase()}tokens {sum(t.committed for _, t, _ in tiers)} (of at most {self.total})")
        for col in ("tier", "tokens", "emulated s", "tokens/s", "skip rate", "acceptance"):
            table.add_column(col, justify="right")
        for name, t, rate in tiers:
            table.add_row(
                name,
                str(t.committed),
                f"{snap.emulated_s:.2f}",
                f"{rate:.1f}",
                _pct(t.skip_rate),
                _pct(t.acceptance_rate),
            )
        return table

    def _phase(self) -> str:
        return f"{self.phase}: " if self.phase else ""

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def _pct(x: float, spec: str = ".1%") -> str:
    """A rate for the display; "-" when undefined (no tokens, no uploads)."""
    return "-" if math.isnan(x) else format(x, spec)
