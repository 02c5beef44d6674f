"""tokens.parquet: one row per generated token.

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
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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
    return pa.schema(
        [pa.field(f.name, f.metadata.get("arrow", _ARROW[types[f.name]]), nullable=False) for f in fields(record)],
        metadata={"hlm_testbed.tokens_schema": SCHEMA_VERSION},
    )


TOKENS_SCHEMA = _schema(TokenRecord)
TOKEN_COLUMNS = tuple(TOKENS_SCHEMA.names)
# Columns added after schema 1, with the value that means "unknown": rows and files without them
# (hand-built rows, older runs) read as unknown rather than failing.
LATER_COLUMNS = {
    "fidelity_tv": NAN,
    "fidelity_tv_branch": NAN,
    **{c: -1 for c in ("uplink_lost", "downlink_bytes", "downlink_lost", "flush_bytes", "flush_retransmissions")},
    "stop_reason": "",
}
_LATER_KEYS = LATER_COLUMNS.keys()


def tokens_table(data: Any) -> pa.Table:
    """An Arrow table in TOKENS_SCHEMA from TokenRecords, dicts, a DataFrame or a table."""
    if isinstance(data, pd.DataFrame):
        if missing := [c for c in LATER_COLUMNS if c not in data.columns]:
            data = data.assign(**{c: LATER_COLUMNS[c] for c in missing})
        _check_columns(data.columns)
        # from_pandas=False: NaN is a value here ("not applicable"), not a null.
        table = pa.Table.from_arrays(
            [pa.array(data[f.name].to_numpy(), type=f.type, from_pandas=False) for f in TOKENS_SCHEMA],
            schema=TOKENS_SCHEMA,
        )
    elif isinstance(data, pa.Table):
        for c in LATER_COLUMNS:
            if c not in data.column_names:
                data = data.append_column(c, pa.array(np.full(data.num_rows, LATER_COLUMNS[c])))
        _check_columns(data.column_names)
        table = data.select(list(TOKEN_COLUMNS)).cast(TOKENS_SCHEMA)
    else:
        rows = [r if isinstance(r, dict) else {c: getattr(r, c) for c in TOKEN_COLUMNS} for r in data]
        rows = [r if _LATER_KEYS <= r.keys() else {**LATER_COLUMNS, **r} for r in rows]
        for keys in {frozenset(r) for r in rows}:
            _check_columns(keys)
        # rows to columns at C speed (a streaming writer's every shard comes this way): each row's values
        # in TOKEN_COLUMNS order, then transposed
        columns = zip(*map(operator.itemgetter(*TOKEN_COLUMNS), rows)) if rows else [[] for _ in TOKEN_COLUMNS]
        table = pa.Table.from_arrays(
            [pa.array(col, type=f.type) for col, f in zip(columns, TOKENS_SCHEMA)], schema=TOKENS_SCHEMA
        )
    nulls = [c for c in TOKEN_COLUMNS if table.column(c).null_count]
    if nulls:
        raise ValueError(f"tokens table: null values in {nulls} (use -1 or NaN for 'not applicable')")
    return table


def _check_columns(cols: Iterable[str]) -> None:
    cols = set(cols)
    missing, extra = [c for c in TOKEN_COLUMNS if c not in cols], sorted(cols - set(TOKEN_COLUMNS))
    if missing or extra:
        raise ValueError(
            f"tokens table columns: missing {missing or 'none'}, unexpected {extra or 'none'}; "
            f"expected {', '.join(TOKEN_COLUMNS)}"
        )


def table_frame(table: pa.Table) -> pd.DataFrame:
    return table.replace_schema_metadata(None).to_pandas()


def tokens_frame(data: Any) -> pd.DataFrame:
    """A DataFrame with the canonical columns and dtypes (the ones read_tokens returns)."""
    return table_frame(tokens_table(data))


def write_tokens(data: Any, path: str | Path) -> Path:
    """Write TokenRecords / dicts / a DataFrame as tokens.parquet (rows in the given order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(tokens_table(data), path)
    return path


def read_tokens(path: str | Path, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """tokens.parquet as a frame; `columns`: only those, from a file in TOKENS_SCHEMA, in less memory
    (SUMMARY_COLUMNS are what summarize reads: 6.4 million rows of fleet-100k in ~0.4 GB): read a column
    at a time, labels as categoricals (a byte a row, not a string), integers at the width their values
    need (sums stay exact: numpy sums them in int64)."""
    if columns is None:
        return table_frame(tokens_table(pq.read_table(path)))
    data = {}
    for c in columns:
        label = c in ("tier", "policy", "stop_reason")
        col = pq.read_table(path, columns=[c], read_dictionary=[c] if label else None).column(0)
        if label:
            data[c] = col.to_pandas().cat.rename_categories(str)
        else:
            data[c] = _narrow(col.to_numpy())
        del col
        pa.default_memory_pool().release_unused()  # arrow keeps freed pages for reuse: hand them back
    return pd.DataFrame(data, copy=False)


def _narrow(a: np.ndarray) -> np.ndarray:
    """An integer array in int32 (or int16) when its values fit: the same numbers in less memory."""
    if a.dtype.kind != "i" or not len(a):
        return a
    lo, hi = int(a.min()), int(a.max())
    for t in (np.int16, np.int32):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return a.astype(t)
    return a


# The columns summarize (testbed.figures) reads.
SUMMARY_COLUMNS = (
    "device",
    "tier",
    "policy",
    "transmitted",
    "draft_id",
    "accepted",
    "k",
    "payload_bytes",
    "uplink_bytes",
    "beta",
    "beta_is_shadow",
    "retransmissions",
    "t_draft_start",
    "t_commit",
    "fidelity_tv",
    "fidelity_tv_branch",
    "stop_reason",
)
# ... and the report (testbed.report: the same figures, plus u against beta)
REPORT_COLUMNS = SUMMARY_COLUMNS + ("uncertainty",)
