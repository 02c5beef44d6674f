"""Where a run's events go (testbed.run forwards them): the metrics collector, the streaming
results writer and the live progress display."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from testbed import results

if TYPE_CHECKING:
    from testbed.run import Plan, RunOptions


class Sinks:
    """Where the run's events (agents.events) go; the runner only forwards them here:

    - the metrics collector (testbed.metrics.Collector; served on metrics.port when asked),
    - the streaming results writer (testbed.results.ResultsWriter: parquet shards as the run goes,
      tokens.parquet at the end),
    - the progress display (Progress: it shows a collector's snapshot).

    Virtual clock: the content pass's events (tokens and decisions final, no times, no links) feed
    progress and the partial results only (`content`); the replay's timed events feed everything
    (`events`: the progress display follows the timed collector from the first). Wall clock: the
    groups' events feed everything."""

    def __init__(self, p: Plan, opts: RunOptions):
        from testbed.metrics import Collector

        tiers = {d.tier: d.policy_name for d in p.specs}
        self.collector = opts.collector
        self.own = False
        if self.collector is None:
            self.collector = Collector(p.scenario.name, tiers=tiers, vocab_size=p.run.vocab_size)
            self.own = True
            if opts.metrics_port is not None:
                self.collector.serve(opts.metrics_port or -1, opts.metrics_host)  # Collector.serve: -1 = any free port
                print(f"metrics: {self.collector.url}", flush=True)
        self.served = self.collector  # what the exporter shows: timed events only
        self.t0 = time.time()
        self.codes_seen: dict[str, int] = {}  # protocol errors ingested, by reason (clock)
        self.tier_of = {d.device: d.tier for d in p.specs}
        self.ended: set[int] = set()  # devices whose sequence ended in the timed trace (eos, stop, length)
        self.content_tokens = self.timed_tokens = 0
        self.batch_sizes: list[int] = []  # every verifier batch's size (summary.json)
        self.partial: dict = {}  # summary entries a failed run still reports (restarts)
        shards = opts.out_dir / "tokens.shards"
        self.writer = results.ResultsWriter(shards, "trace")
        self.content_writer = results.ResultsWriter(shards, "content")
        # The content pass's progress: a private collector (its tokens have no times yet).
        self.content_collector = Collector(p.scenario.name, tiers=tiers, vocab_size=p.run.vocab_size)
        two_pass = opts.engine == "local" or p.scenario.clock == "virtual"
        self.progress = Progress(p, self.content_collector if two_pass else self.collector, enabled=opts.progress,
                                 phase="content pass" if two_pass else "")

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
        self.content_collector.ingest_events(events)
        self.content_writer.add(events)
        self.progress.update()

    def events(self, events: list) -> None:
        """Timed events: to the collector, the results writer and the progress display."""
        from agents.events import TokenCommitted, VerifierBatch

        for e in events:
            if isinstance(e, TokenCommitted):
                self.timed_tokens += 1
                if e.row.get("stop_reason"):
                    self.ended.add(e.device)
            elif isinstance(e, VerifierBatch):
                self.batch_sizes.append(e.size)
        self.collector.ingest_events(events)
        self.writer.add(events)
        if self.progress.collector is not self.collector:  # the virtual clock's replay: timed from here on
            self.progress.collector, self.progress.phase = self.collector, "replay (emulated times)"
        self.progress.update()

    def clock(self, lag_s: float, errors: int, codes: Mapping[str, int] | None = None) -> None:
        """The runner's clock, and the protocol errors so far (cumulative): `codes` by the verifier's
        ErrorCode name (the reason label of hlm_protocol_errors_total); errors without one count as
        "malformed"."""
        from agents.stats import ClockStat, ProtocolErrorStat

        active: dict[str, int] = {}
        for device, tier in self.tier_of.items():
            active[tier] = active.get(tier, 0) + (device not in self.ended)
        stats = [ClockStat("runner", self.collector.emulated_time(), time.time() - self.t0, lag_s, active)]
        codes = {**(codes or {})}
        if errors > sum(codes.values()):
            codes["malformed"] = errors - sum(codes.values())
        for reason, n in sorted(codes.items()):
            if n > self.codes_seen.get(reason, 0):
                stats.append(ProtocolErrorStat(reason, n - self.codes_seen.get(reason, 0)))
                self.codes_seen[reason] = n
        self.collector.ingest(stats)

    def restart(self, actor: str) -> None:
        """An actor ("verifier" or "group") died and is being restarted."""
        self.collector.actor_restart(actor)

    def results(self, path: Path):
        """Merge the shards into tokens.parquet (the trace's; the content pass's if no trace was
        written, a run cut short) and return the columns summary.json needs (results.SUMMARY_COLUMNS);
        None when nothing was committed."""
        self.writer.close()
        use, other = self.writer, self.content_writer
        if not use.rows:
            other.close()
            use, other = other, use
        other.discard()
        if not use.rows:
            use.discard()
            return None
        use.merge(path, frame=False)
        return results.read_tokens(path, results.SUMMARY_COLUMNS)  # what summary.json needs, not every column

    def close(self) -> None:
        self.progress.close()
        self.collector.finish()

    def linger(self, seconds: float) -> None:
        if self.own:
            if seconds > 0:
                self.collector.linger(seconds)
            self.collector.close()


# --- progress ----------------------------------------------------------------------------


class Progress:
    """A live table per tier on a terminal (tokens, emulated time and tokens/s, skip and
    acceptance rates); elsewhere (logs, CI) one line every `log_every_s` seconds. Both read a
    collector's snapshot (testbed.metrics.Snapshot), the figures the exporter serves. `phase` names
    the pass of a virtual-clock run (the content pass, then the replay, each counting every token)."""

    def __init__(self, p: Plan, collector, enabled: bool = True, log_every_s: float = 10.0, phase: str = ""):
        import sys

        self.phase = phase
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

    def update(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
        elif self.enabled and time.time() - self.last_log >= self.log_every_s:
            self.last_log = time.time()
            self.log_line()

    def _tiers(self, snap) -> list[tuple[str, object, float]]:
        """(tier, its totals, its tokens per emulated second) in the scenario's order."""
        from testbed.metrics import TierTotals

        by_tier = {t: (tot, snap.tier_throughput.get((t, pol), 0.0)) for (t, pol), tot in snap.per_tier.items()}
        return [(name, *by_tier.get(name, (TierTotals(), 0.0))) for name in self.tier_names]

    def log_line(self) -> None:
        import sys

        snap = self.collector.snapshot()
        done = snap.totals.committed
        # The virtual clock's content pass has no emulated times yet (the replay computes them).
        parts = [f"{name}: {t.committed} tok, " + (f"{rate:.1f} tok/s emulated, " if rate > 0 else "")
                 + f"skip {t.skips / max(1, t.committed):.0%}" for name, t, rate in self._tiers(snap)]
        print(f"[{time.time() - self.t0:6.0f}s] {self._phase()}tokens {done} (of at most {self.total}) | "
              + " | ".join(parts), file=sys.stderr, flush=True)

    def _table(self):
        from rich.table import Table

        snap = self.collector.snapshot()
        table = Table(title=f"{self._phase()}tokens {snap.totals.committed} (of at most {self.total})")
        for col in ("tier", "tokens", "emulated s", "tokens/s", "skip rate", "acceptance"):
            table.add_column(col, justify="right")
        for name, t, rate in self._tiers(snap):
            skip = t.skips / t.committed if t.committed else 0.0
            acc = t.accepted / t.uploads if t.uploads else float("nan")
            table.add_row(name, str(t.committed), f"{snap.emulated_s:.2f}", f"{rate:.1f}", f"{skip:.1%}", f"{acc:.1%}")
        return table

    def _phase(self) -> str:
        return f"{self.phase}: " if self.phase else ""

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
