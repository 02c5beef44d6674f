"""Streaming the trace to parquet shards as a run goes (ResultsWriter), and merging them into
tokens.parquet at the end; rows a later event completes (a flush's shadow betas) are patched in."""

from __future__ import annotations

import array
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from testbed.results.tokens import NAN, TOKENS_SCHEMA, read_tokens, table_frame, tokens_table


class ResultsWriter:
    """The streaming results sink: takes the run's events (agents.events), writes settled rows to
    parquet shards as the run goes (each shard a complete file: a crash leaves readable shards), and
    merges the shards into tokens.parquet at the end.

    A transmitted token's row is settled at its commit (its verdict came with it). A skipped token's
    row waits for its shadow beta (ShadowResolved); the device's last skipped token also takes the
    final flush's link columns, whose events come just before its shadow beta. A transmitted token
    that stopped its sequence (eos, stop) waits for them too, added to its own (its device flushes to
    close its session, agents.device.Device.flush; they come together, with the flush's verdict).

    Memory: at most flush_rows settled rows (a shard's worth, ~1 kB each as dicts) plus at most
    max_pending skipped rows waiting for their verdict (a device's run of skips since its last upload;
    a device that never uploads, slm-only, waits to its final flush). Past max_pending the waiting
    rows are spilled: written as they stand, and what their verdicts bring later kept as patches
    (~40 B a row: the shadow beta and fidelity, the flush's link columns), applied when the shards
    are read or merged. The merge holds one block of devices at a time (merge_shards).
    """

    def __init__(
        self,
        shard_dir: str | Path,
        prefix: str = "tokens",
        flush_rows: int = 8192,
        flush_s: float = 5.0,
        max_pending: int = 32768,
    ):
        self.dir, self.prefix = Path(shard_dir), prefix
        self.flush_rows, self.flush_s, self.max_pending = flush_rows, flush_s, max_pending
        self._start()

    def _start(self) -> None:
        """No row yet (a new writer, or one reset)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending: dict[tuple[int, int], dict] = {}  # skipped rows waiting for their shadow beta
        # transmitted rows that stopped their sequence, waiting for the final flush's link events (all
        # emitted with the flush's verdict, so in one add): at most one per device, never spilled
        self.closing: dict[tuple[int, int], dict] = {}
        self.spilled: set[int] = set()  # _key of the skipped rows written before their shadow beta
        self.patches = _Patches()  # ... and what came for them since
        self.settled: list[dict] = []
        self.shards: list[Path] = []
        self.rows = 0  # rows written to shards
        self._last_flush = time.monotonic()

    def add(self, events: Iterable) -> None:
        from agents.events import LinkEvent, ShadowResolved, TokenCommitted, UploadSent, VerdictReceived

        closed = []
        for e in events:
            if isinstance(e, TokenCommitted):
                row = e.row
                if row["transmitted"] and row.get("stop_reason", "") not in ("", "length"):
                    self.closing[(row["device"], row["token_index"])] = dict(row)  # its flush follows
                elif row["transmitted"]:
                    self.settled.append(row)  # final: written as the event has it
                else:  # completed below: a copy, the event's row stays as committed
                    self.pending[(row["device"], row["token_index"])] = dict(row)
            elif isinstance(e, ShadowResolved):
                update = {"beta": e.beta, "beta_is_shadow": True}
                if math.isfinite(e.fidelity_tv):
                    update["fidelity_tv"] = e.fidelity_tv
                if math.isfinite(e.fidelity_tv_branch):
                    update["fidelity_tv_branch"] = e.fidelity_tv_branch
                row = self.pending.pop((e.device, e.token_index), None)
                if row is not None:
                    row.update(update)
                    self.settled.append(row)
                elif (key := _key(e.device, e.token_index)) in self.spilled:  # its last event
                    self.spilled.remove(key)
                    self.patches.add(key, update)
            elif isinstance(e, LinkEvent) and e.final:
                if isinstance(e, UploadSent):
                    update = {"flush_bytes": e.bytes, "flush_retransmissions": e.retransmissions}
                elif isinstance(e, VerdictReceived):
                    update = {"downlink_bytes": e.bytes}
                else:
                    update = {f"{e.direction}_lost": e.count}
                if (row := self.closing.get((e.device, e.step - 1))) is not None:  # added to the token's own
                    for k, n in update.items():
                        row[k] += n
                    if isinstance(e, VerdictReceived):
                        closed.append((e.device, e.step - 1))
                    continue
                row = self.pending.get((e.device, e.step - 1))  # the flush bills the device's last token
                if row is not None:
                    row.update(update)
                elif (key := _key(e.device, e.step - 1)) in self.spilled:
                    self.patches.add(key, update)
        for key in closed:  # the flush's MessageLost events came in this add too
            self.settled.append(self.closing.pop(key))
        if len(self.pending) > self.max_pending:
            self.spilled.update(_key(*k) for k in self.pending)
            self.settled.extend(self.pending.values())  # written as they stand; patched when read
            self.pending = {}
        if len(self.settled) >= self.flush_rows or (
            self.settled and time.monotonic() - self._last_flush >= self.flush_s
        ):
            self.flush()

    def flush(self, pending: bool = False) -> None:
        """Write the settled rows as one shard (with `pending`, the unsettled ones too: a run cut short)."""
        rows = self.settled + (list(self.pending.values()) + list(self.closing.values()) if pending else [])
        self._last_flush = time.monotonic()
        if not rows:
            return
        path = self.dir / f"{self.prefix}-{len(self.shards):05d}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(tokens_table(rows), tmp)
        tmp.replace(path)  # a shard is complete or absent
        self.shards.append(path)
        self.rows += len(rows)
        self.settled = []
        if pending:
            self.pending, self.closing = {}, {}

    def close(self) -> None:
        self.flush(pending=True)

    def frame(self) -> pd.DataFrame:
        """Every row written so far (after close: all), sorted by device and token index."""
        return read_shards(self.shards, self.patches.table())

    def merge(self, path: str | Path, frame: bool = True) -> pd.DataFrame | int:
        """Close, write the rows as tokens.parquet (sorted by device, token_index; merge_shards), remove
        the shards. Returns the rows read back (`frame`) or their count."""
        self.close()
        n = merge_shards(self.shards, path, patches=self.patches.table())
        self.discard()
        return read_tokens(path) if frame else n

    def reset(self) -> None:
        """Drop every row so far, written or waiting, and start again (the virtual clock's replay
        replaces the content pass's rows, kept until then for a run cut short)."""
        self.discard()
        self._start()

    def discard(self) -> None:
        for shard in self.shards:
            shard.unlink(missing_ok=True)
        self.shards = []
        try:
            self.dir.rmdir()
        except OSError:  # another writer's shards are still there
            pass


def _key(device: int, token_index: int) -> int:
    """One int for a (device, token_index) row: 8 bytes in a numpy array, not a tuple's ~70."""
    return (int(device) << 32) | int(token_index)


class _Patches:
    """Updates to rows written before their last events (ResultsWriter spills): a column per
    updated field, NaN where a row's update leaves it alone. ~40 B a row."""

    def __init__(self):
        self.keys = array.array("q")
        self.columns: dict[str, array.array] = {}  # made at a column's first update
        self.where: dict[int, int] = {}  # key -> index, only for the flush's few rows (updated twice)

    def add(self, key: int, update: Mapping[str, Any]) -> None:
        i = self.where.get(key)
        if i is None:
            i = len(self.keys)
            self.keys.append(key)
            for col in self.columns.values():
                col.append(NAN)
            if "beta" not in update:  # the final flush's link events come one by one, then the shadow beta
                self.where[key] = i
        for name, value in update.items():
            if name not in self.columns:
                self.columns[name] = array.array("d", [NAN]) * len(self.keys)
            self.columns[name][i] = float(value)
        if "beta" in update:
            self.where.pop(key, None)  # a row's last event

    def table(self) -> pd.DataFrame | None:
        if not len(self.keys):
            return None
        return pd.DataFrame(
            {
                "key": np.frombuffer(self.keys, np.int64),
                **{c: np.frombuffer(v, np.float64) for c, v in self.columns.items()},
            }
        )


def apply_patches(table: pa.Table, patches: pd.DataFrame | None) -> pa.Table:
    """`table` (TOKENS_SCHEMA) with the patches' values in place (_Patches: NaN leaves a value)."""
    if patches is None or not len(patches) or not table.num_rows:
        return table
    keys = (table.column("device").to_numpy().astype(np.int64) << 32) | table.column("token_index").to_numpy()
    at = pd.Index(keys).get_indexer(patches["key"].to_numpy())
    for name in patches.columns.drop("key"):
        values = patches[name].to_numpy()
        hit = (at >= 0) & ~np.isnan(values)
        if hit.any():
            i = TOKENS_SCHEMA.get_field_index(name)
            column = table.column(i).to_numpy().copy()
            column[at[hit]] = values[hit].astype(column.dtype)
            table = table.set_column(i, TOKENS_SCHEMA.field(i), pa.array(column, type=TOKENS_SCHEMA.field(i).type))
    return table


def merge_shards(
    shards: Iterable[str | Path], path: str | Path, block_rows: int = 65536, patches: pd.DataFrame | None = None
) -> int:
    """Write the shards' rows as one parquet file (TOKENS_SCHEMA) sorted by device and token index,
    one block of devices (about block_rows rows, one row group) at a time: memory holds a block, not
    the run. Every shard is read once per block (the replay writes every device into every shard).
    `patches` (ResultsWriter spills) are applied to each block. Returns the row count."""
    shards, path = list(shards), Path(path)
    devices = (
        np.concatenate([pq.read_table(s, columns=["device"]).column("device").to_numpy() for s in shards])
        if shards
        else np.zeros(0, np.int32)
    )
    ids, counts = np.unique(devices, return_counts=True)
    ends = np.cumsum(counts)  # rows up to and including each device
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, TOKENS_SCHEMA) as out:
        if not len(ids):
            out.write_table(TOKENS_SCHEMA.empty_table())
        start = 0
        while start < len(ids):
            before = ends[start - 1] if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, before + block_rows, side="right")))
            lo, hi = int(ids[start]), int(ids[stop - 1])
            parts = [
                tokens_table(pq.read_table(s, filters=[("device", ">=", lo), ("device", "<=", hi)])) for s in shards
            ]
            block = pa.concat_tables(parts).sort_by([("device", "ascending"), ("token_index", "ascending")])
            out.write_table(apply_patches(block, patches))
            start = stop
    tmp.replace(path)
    return len(devices)


def read_shards(shards: Iterable[str | Path], patches: pd.DataFrame | None = None) -> pd.DataFrame:
    """The rows of parquet shards (ResultsWriter) as one tokens frame, sorted by device and token
    index, with the writer's patches applied."""
    tables = [tokens_table(pq.read_table(s)) for s in shards]
    table = apply_patches(pa.concat_tables(tables) if tables else TOKENS_SCHEMA.empty_table(), patches)
    return table_frame(table).sort_values(["device", "token_index"], kind="stable").reset_index(drop=True)
