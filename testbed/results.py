"""Run results: the per-token table (tokens.parquet) and the summary (summary.json).

tokens.parquet has one row per generated token, schema TOKENS_SCHEMA (a TokenRecord per row).
Times are emulated seconds since the start of the run (NaN where a step did not happen, e.g.
t_upload_sent and t_verdict of a skipped token). Row meanings:

- transmitted: the device uploaded for this token (a draft distribution, or for llm-only a
  request with no draft: draft_id = -1, k = 0). Skipped tokens have transmitted = False.
- accepted: the draft became the token (True for skipped and slm-only tokens; for transmitted
  drafts, the verifier accepted). resampled: the verifier rejected the draft and drew from
  norm(max(0, y - xhat)). llm-only tokens have both False.
- k: vocabulary entries sent (|V| = full distribution, 0 = none); prob_bits their quantisation.
- payload_bytes: the encoded distribution; uplink_bytes: every byte this token put on the
  uplink (frame headers, piggybacked skipped ids, the packets retransmitted: a retransmission
  round resends only the packets lost, netem.Delivery); 0 for a skipped token whose id rides on a
  later frame. retransmissions: the upload's rounds after the first, and its resends after a lost
  verdict.
- beta = max(0, 1 - y_d / x_d) with y the LLM distribution; for a skipped token the shadow beta
  the LLM would have had (beta_is_shadow = True); NaN if unknown.
- fidelity_tv: the exact total-variation distance 0.5 * sum_v |P(v) - y(v)| between the law P the
  committed token was drawn from and the LLM's y at that position (same prefix), in float64, no
  sampling: P = x = softmax(z_slm / T) for a skipped token (slm-only tokens included: the final
  flush gives their y), P = hybrid(x, x_hat, y) for a verified draft (agents.speculative), P = y
  for llm-only (0). hlm gives 0 up to float32 rounding of the upload. NaN where unknown (a device
  past its memory budget for held distributions, agents.device.FIDELITY_HOLD_BYTES; older runs).

Summary definitions (summarize; computed by testbed.figures):
- throughput_tokens_per_s.system = tokens / emulated_seconds. For a device (and a tier) it is
  its tokens / its own span, from its first t_draft_start to its last t_commit, so fast devices
  that finish early show higher throughput (emulated_seconds is used when the span is unknown).
- token latency = t_commit - t_draft_start of each token (SLM step + upload + queueing +
  verification + downlink for a transmitted token; the SLM step alone for a skipped one);
  p50/p95/p99 by linear interpolation (numpy.percentile default).
- skip_rate = tokens not transmitted / tokens. acceptance_rate = accepted / transmitted drafts.
- vocab_compression = 1 - (sum of k over uploads) / (|V| x uploads), uploads = transmitted drafts.
- jain_fairness = (sum x)^2 / (n * sum x^2) over per-device throughput x (1 = perfectly fair).
- fidelity_tv_mean = mean fidelity_tv over the tokens where it is known (fidelity_tv_tokens of
  them). fidelity_tv_sequence_mean = the mean over devices of the sum of fidelity_tv over the
  device's tokens (devices with a value for every token: fidelity_tv_sequences). For one device
  the sum along its sequence, averaged over its randomness, bounds the TV distance between the
  law of its whole output and the LLM's for its prompt (the hybrid argument: swap one position's
  law at a time); one run gives one sample of that sum per device.
- stops: how the devices' sequences ended (eos, a stop sequence, length = max_new_tokens;
  unfinished = cut short) and the tokens each generated; tokens and throughput count the tokens
  actually generated (a stopped device generates fewer than max_new_tokens).
Undefined figures (e.g. acceptance with no uploads) are None (null in JSON).

Each figure is computed once: summary.json by summarize, from tokens.parquet's rows only (so a run cut
short, or a file from another machine, gives the same figures). The live collector (testbed.metrics)
folds the same events for Prometheus and the progress display, with the same definitions
(testbed.figures); nothing here reads it, and the progress display computes nothing itself.
"""
from __future__ import annotations

import array
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, get_type_hints

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from testbed.figures import device_throughput, jain, num, ratio, span_throughput, token_figures

NAN = float("nan")
SCHEMA_VERSION = "1"


# Arrow type of each TokenRecord field: by its Python type, or the field's metadata["arrow"].
_ARROW = {int: pa.int32(), float: pa.float64(), bool: pa.bool_(), str: pa.string()}
_INT64 = {"arrow": pa.int64()}  # byte counts summed over fleets


@dataclass(slots=True)
class TokenRecord:
    """One generated token of one device (one row of tokens.parquet; TOKENS_SCHEMA is derived
    from these fields, in this order)."""

    device: int
    tier: str
    policy: str
    prompt_index: int
    token_index: int  # 0-based position among the device's generated tokens
    token_id: int  # the committed token
    draft_id: int = -1  # the SLM draft; -1 when there is none (llm-only)
    uncertainty: float = NAN
    transmitted: bool = False
    k: int = 0
    prob_bits: int = 0
    payload_bytes: int = field(default=0, metadata=_INT64)
    uplink_bytes: int = field(default=0, metadata=_INT64)
    accepted: bool = False
    resampled: bool = False
    beta: float = NAN
    beta_is_shadow: bool = False
    retransmissions: int = 0
    t_draft_start: float = NAN
    t_upload_sent: float = NAN
    t_verdict: float = NAN
    t_commit: float = NAN
    fidelity_tv: float = NAN  # exact TV(law the token was drawn from, LLM's y); NaN if unknown
    # The TV of the branch that happened (agents.fidelity.branch_fidelity: TV(x, y) when skipped,
    # TV(hybrid, y) when verified), the measure before exact fidelity: an approximation, kept for
    # comparison; a policy that cannot state its decision law (a plug-in) has only this (fidelity_tv NaN).
    fidelity_tv_branch: float = NAN
    # Link columns (schema 1 + these; -1 in files written before them). Of this token's upload and its
    # verdict; on a device's last token when the device ended with a final flush (its skipped drafts
    # sent for the shadow betas, or an empty one closing a sequence that stopped at a verified token),
    # plus that flush's, whose uplink bytes and retransmissions are flush_bytes and flush_retransmissions
    # (uplink_bytes and retransmissions stay the token's own: 0 for a skipped one).
    uplink_lost: int = 0  # uplink copies the link dropped
    downlink_bytes: int = field(default=0, metadata=_INT64)  # every verdict copy put on the downlink
    downlink_lost: int = 0  # verdict copies the downlink dropped
    flush_bytes: int = field(default=0, metadata=_INT64)
    flush_retransmissions: int = 0
    # Why the device's sequence ended, on its last token only: "eos" (an end-of-sequence token), "stop"
    # (a stop sequence completed in the decoded text), "length" (max_new_tokens); "" on every other
    # row (and in files written before it). agents.stop decides it from the committed tokens.
    stop_reason: str = ""


def _schema(record: type) -> pa.Schema:
    types = get_type_hints(record)
    # nullable=False: no nulls, "not applicable" is -1 or NaN
    return pa.schema([pa.field(f.name, f.metadata.get("arrow", _ARROW[types[f.name]]), nullable=False)
                      for f in fields(record)], metadata={"hlm_testbed.tokens_schema": SCHEMA_VERSION})


TOKENS_SCHEMA = _schema(TokenRecord)
TOKEN_COLUMNS = tuple(TOKENS_SCHEMA.names)
# Columns added after schema 1, with the value that means "unknown": rows and files without them
# (hand-built rows, older runs) read as unknown rather than failing.
LATER_COLUMNS = {"fidelity_tv": NAN, "fidelity_tv_branch": NAN,
                 **{c: -1 for c in ("uplink_lost", "downlink_bytes", "downlink_lost", "flush_bytes",
                                    "flush_retransmissions")}, "stop_reason": ""}


def tokens_table(data: Any) -> pa.Table:
    """An Arrow table in TOKENS_SCHEMA from TokenRecords, dicts, a DataFrame or a table."""
    if isinstance(data, pd.DataFrame):
        if missing := [c for c in LATER_COLUMNS if c not in data.columns]:
            data = data.assign(**{c: LATER_COLUMNS[c] for c in missing})
        _check_columns(data.columns)
        # from_pandas=False: NaN is a value here ("not applicable"), not a null.
        table = pa.Table.from_arrays([pa.array(data[f.name].to_numpy(), type=f.type, from_pandas=False)
                                      for f in TOKENS_SCHEMA], schema=TOKENS_SCHEMA)
    elif isinstance(data, pa.Table):
        for c in LATER_COLUMNS:
            if c not in data.column_names:
                data = data.append_column(c, pa.array(np.full(data.num_rows, LATER_COLUMNS[c])))
        _check_columns(data.column_names)
        table = data.select(list(TOKEN_COLUMNS)).cast(TOKENS_SCHEMA)
    else:
        rows = [r if isinstance(r, dict) else {c: getattr(r, c) for c in TOKEN_COLUMNS} for r in data]
        rows = [r if all(c in r for c in LATER_COLUMNS) else {**LATER_COLUMNS, **r} for r in rows]
        for keys in {frozenset(r) for r in rows}:
            _check_columns(keys)
        table = pa.Table.from_pydict({c: [r[c] for r in rows] for c in TOKEN_COLUMNS}, schema=TOKENS_SCHEMA)
    nulls = [c for c in TOKEN_COLUMNS if table.column(c).null_count]
    if nulls:
        raise ValueError(f"tokens table: null values in {nulls} (use -1 or NaN for 'not applicable')")
    return table


def _check_columns(cols: Iterable[str]) -> None:
    cols = set(cols)
    missing, extra = [c for c in TOKEN_COLUMNS if c not in cols], sorted(cols - set(TOKEN_COLUMNS))
    if missing or extra:
        raise ValueError(f"tokens table columns: missing {missing or 'none'}, unexpected {extra or 'none'}; "
                         f"expected {', '.join(TOKEN_COLUMNS)}")


def _frame(table: pa.Table) -> pd.DataFrame:
    return table.replace_schema_metadata(None).to_pandas()


def tokens_frame(data: Any) -> pd.DataFrame:
    """A DataFrame with the canonical columns and dtypes (the ones read_tokens returns)."""
    return _frame(tokens_table(data))


def write_tokens(data: Any, path: str | Path) -> Path:
    """Write TokenRecords / dicts / a DataFrame as tokens.parquet (rows in the given order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(tokens_table(data), path)
    return path


def read_tokens(path: str | Path, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """tokens.parquet as a frame; `columns`: only those, from a file in TOKENS_SCHEMA (less memory:
    SUMMARY_COLUMNS are what summarize reads)."""
    if columns is None:
        return _frame(tokens_table(pq.read_table(path)))
    # self_destruct: each Arrow column is freed once converted, so the read never holds two copies
    return pq.read_table(path, columns=list(columns)).replace_schema_metadata(None).to_pandas(
        split_blocks=True, self_destruct=True)


# The columns summarize (testbed.figures) reads.
SUMMARY_COLUMNS = ("device", "tier", "policy", "transmitted", "draft_id", "accepted", "k", "payload_bytes", "uplink_bytes",
                   "beta", "beta_is_shadow", "retransmissions", "t_draft_start", "t_commit", "fidelity_tv",
                   "fidelity_tv_branch", "stop_reason")
# ... and the report (testbed.report: the same figures, plus u against beta)
REPORT_COLUMNS = SUMMARY_COLUMNS + ("uncertainty",)


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

    def __init__(self, shard_dir: str | Path, prefix: str = "tokens", flush_rows: int = 8192,
                 flush_s: float = 5.0, max_pending: int = 32768):
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
        if len(self.settled) >= self.flush_rows or (self.settled and time.monotonic() - self._last_flush >= self.flush_s):
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
        return pd.DataFrame({"key": np.frombuffer(self.keys, np.int64),
                             **{c: np.frombuffer(v, np.float64) for c, v in self.columns.items()}})


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


def merge_shards(shards: Iterable[str | Path], path: str | Path, block_rows: int = 65536,
                 patches: pd.DataFrame | None = None) -> int:
    """Write the shards' rows as one parquet file (TOKENS_SCHEMA) sorted by device and token index,
    one block of devices (about block_rows rows, one row group) at a time: memory holds a block, not
    the run. Every shard is read once per block (the replay writes every device into every shard).
    `patches` (ResultsWriter spills) are applied to each block. Returns the row count."""
    shards, path = list(shards), Path(path)
    devices = (np.concatenate([pq.read_table(s, columns=["device"]).column("device").to_numpy() for s in shards])
               if shards else np.zeros(0, np.int32))
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
            parts = [tokens_table(pq.read_table(s, filters=[("device", ">=", lo), ("device", "<=", hi)]))
                     for s in shards]
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
    return _frame(table).sort_values(["device", "token_index"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------- summary


def summarize(tokens: Any, *, emulated_seconds: float, wall_seconds: float, vocab_size: int,
              verifier_batches: list[int] | np.ndarray, extra: Mapping[str, Any] | None = None) -> dict:
    """Every summary.json figure (module docstring has the definitions).

    tokens: the tokens table (DataFrame, records or dicts). verifier_batches: the size of every
    verifier batch. extra: more top-level fields (scenario name, lag, ...), must not clash.
    """
    df = tokens if isinstance(tokens, pd.DataFrame) else tokens_frame(tokens)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    per_device = device_throughput(df, emulated_seconds)
    batches = np.asarray(verifier_batches, dtype=np.float64)
    whole = token_figures(df, vocab_size)
    tiers = {}
    for tier, tdf in df.groupby("tier", sort=False):  # tiers in order of first appearance
        tiers[str(tier)] = {
            "devices": int(tdf["device"].nunique()),
            "policy": ",".join(dict.fromkeys(tdf["policy"].astype(str))),
            "throughput_tokens_per_s": num(span_throughput(tdf, emulated_seconds)),
            "jain_fairness": num(jain(per_device[tdf["device"].unique()])),
            **token_figures(tdf, vocab_size),
            "stops": stop_figures(tdf),
        }
    summary = {
        "emulated_seconds": num(emulated_seconds),
        "wall_seconds": num(wall_seconds),
        "tokens": whole.pop("tokens"),
        "devices": int(len(per_device)),
        "throughput_tokens_per_s": {
            "system": num(ratio(len(df), emulated_seconds)),
            "tiers": {t: b["throughput_tokens_per_s"] for t, b in tiers.items()},
            "devices": {str(d): num(x) for d, x in per_device.items()},
        },
        **whole,
        "jain_fairness": num(jain(per_device.to_numpy())),
        "verifier_batch_size_mean": num(batches.mean()) if len(batches) else None,
        "verifier_batches": int(len(batches)),
        "vocab_size": int(vocab_size),
        "stops": stop_figures(df, devices=True),
        "tiers": tiers,
    }
    for key, value in (extra or {}).items():
        if key in summary:
            raise ValueError(f"extra field {key!r} clashes with a computed summary field")
        summary[key] = value
    return summary


STOP_REASONS = ("eos", "stop", "length")


def stop_figures(df: pd.DataFrame, devices: bool = False) -> dict:
    """How the devices' sequences ended (stop_reason of each device's last row): devices per reason
    ("unfinished": no reason, a run cut short or a file from before stop_reason), and the tokens each
    device generated (mean, min, max); with `devices`, each device's tokens and reason too."""
    per_device = df.groupby("device", sort=True).size()
    reasons = dict.fromkeys(STOP_REASONS, 0)
    ended = pd.Series(dtype=str)
    if "stop_reason" in df.columns:
        ends = df["stop_reason"].astype(str)
        ended = pd.Series(ends[ends != ""].to_numpy(), index=df.loc[ends != "", "device"].to_numpy())
        for reason, n in ended.value_counts().items():
            reasons[str(reason)] = int(n)
    reasons["unfinished"] = int(len(per_device) - sum(reasons.values()))
    tokens = {"mean": num(per_device.mean()), "min": int(per_device.min()), "max": int(per_device.max())} \
        if len(per_device) else {"mean": None, "min": None, "max": None}
    out = {"reasons": reasons, "tokens_per_device": tokens}
    if devices:
        out["devices"] = {str(d): {"tokens": int(n), "reason": str(ended.get(d, "unfinished"))}
                          for d, n in per_device.items()}
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "tolist"):
        return _json_safe(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_summary(summary: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- tables


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
        f"{_fmt(summary['emulated_seconds'], '.2f')} s emulated, {_fmt(summary['wall_seconds'], '.1f')} s wall")
    table = Table(title=title, caption=f"verifier batch size mean {_fmt(summary['verifier_batch_size_mean'], '.2f')} "
                                       f"over {summary['verifier_batches']} batches")
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
