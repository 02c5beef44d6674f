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
  uplink (frame headers, piggybacked skipped ids, retransmissions); 0 for a skipped token whose
  id rides on a later frame.
- beta = max(0, 1 - y_d / x_d) with y the LLM distribution; for a skipped token the shadow beta
  the LLM would have had (beta_is_shadow = True); NaN if unknown.
- fidelity_tv: the exact total-variation distance 0.5 * sum_v |P(v) - y(v)| between the law P the
  committed token was drawn from and the LLM's y at that position (same prefix), in float64, no
  sampling: P = x = softmax(z_slm / T) for a skipped token (slm-only tokens included: the final
  flush gives their y), P = hybrid(x, x_hat, y) for a verified draft (agents.speculative), P = y
  for llm-only (0). hlm gives 0 up to float32 rounding of the upload. NaN where unknown (a device
  past its memory budget for held distributions, agents.device.FIDELITY_HOLD_BYTES; older runs).

Summary definitions (summarize):
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
Undefined figures (e.g. acceptance with no uploads) are None (null in JSON).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

NAN = float("nan")
SCHEMA_VERSION = "1"


@dataclass(slots=True)
class TokenRecord:
    """One generated token of one device (one row of tokens.parquet)."""

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
    payload_bytes: int = 0
    uplink_bytes: int = 0
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


def _col(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)  # no nulls: "not applicable" is -1 or NaN


# Same names and order as TokenRecord (a test checks it).
TOKENS_SCHEMA = pa.schema(
    [
        _col("device", pa.int32()), _col("tier", pa.string()), _col("policy", pa.string()),
        _col("prompt_index", pa.int32()), _col("token_index", pa.int32()), _col("token_id", pa.int32()),
        _col("draft_id", pa.int32()), _col("uncertainty", pa.float64()), _col("transmitted", pa.bool_()),
        _col("k", pa.int32()), _col("prob_bits", pa.int32()),
        _col("payload_bytes", pa.int64()), _col("uplink_bytes", pa.int64()),  # summed over fleets: int64
        _col("accepted", pa.bool_()), _col("resampled", pa.bool_()),
        _col("beta", pa.float64()), _col("beta_is_shadow", pa.bool_()), _col("retransmissions", pa.int32()),
        _col("t_draft_start", pa.float64()), _col("t_upload_sent", pa.float64()),
        _col("t_verdict", pa.float64()), _col("t_commit", pa.float64()), _col("fidelity_tv", pa.float64()),
    ],
    metadata={"hlm_testbed.tokens_schema": SCHEMA_VERSION},
)
TOKEN_COLUMNS = tuple(TOKENS_SCHEMA.names)
# Columns added after schema 1, with the value that means "unknown": rows and files without them
# (hand-built rows, older runs) read as unknown rather than failing.
LATER_COLUMNS = {"fidelity_tv": NAN}


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


def read_tokens(path: str | Path) -> pd.DataFrame:
    return _frame(tokens_table(pq.read_table(path)))


class TokensWriter:
    """Append records as they come and flush to parquet in row groups, so a run cut short
    (error, Ctrl-C) still leaves a readable tokens.parquet after close()."""

    def __init__(self, path: str | Path, flush_rows: int = 65536):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.path, TOKENS_SCHEMA)
        self._pending: list = []
        self.flush_rows = flush_rows
        self.rows = 0

    def extend(self, records: Iterable[TokenRecord | dict]) -> None:
        self._pending.extend(records)
        if len(self._pending) >= self.flush_rows:
            self.flush()

    def add(self, record: TokenRecord | dict) -> None:
        self.extend([record])

    def flush(self) -> None:
        if self._pending:
            self._writer.write_table(tokens_table(self._pending))
            self.rows += len(self._pending)
            self._pending = []

    def close(self) -> None:
        if self._writer is not None:
            self.flush()
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TokensWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- summary


def _num(x: Any) -> float | None:
    """A JSON-safe float: None for NaN/inf/undefined."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def jain_fairness(x: Any) -> float | None:
    """(sum x)^2 / (n * sum x^2); 1 when all equal, 1/n when one takes everything."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    sq = float(np.sum(x * x))
    return _num(float(np.sum(x)) ** 2 / (len(x) * sq)) if len(x) and sq > 0 else None


def _ratio(num: float, den: float) -> float | None:
    return _num(num / den) if den else None


def device_throughput(df: pd.DataFrame, emulated_seconds: float) -> pd.Series:
    """Tokens per emulated second of each device over its own span (index: device id)."""
    g = df.groupby("device", sort=True)
    span = (g["t_commit"].max() - g["t_draft_start"].min()).fillna(emulated_seconds)
    span = span.where(span > 0, emulated_seconds)
    return (g.size() / span).astype(np.float64)


def _figures(df: pd.DataFrame, vocab_size: int) -> dict:
    """The figures shared by the whole run and each tier."""
    n = len(df)
    transmitted = df["transmitted"].to_numpy()
    uploads = transmitted & (df["draft_id"].to_numpy() >= 0)
    n_up = int(uploads.sum())
    lat = (df["t_commit"] - df["t_draft_start"]).to_numpy(dtype=np.float64)
    lat = lat[np.isfinite(lat)]
    beta, shadow = df["beta"].to_numpy(), df["beta_is_shadow"].to_numpy()
    real_beta, shadow_beta = beta[~shadow & np.isfinite(beta)], beta[shadow & np.isfinite(beta)]
    fid = df["fidelity_tv"].to_numpy(dtype=np.float64) if "fidelity_tv" in df else np.full(n, np.nan)
    known = np.isfinite(fid)
    # per device: the sum over its sequence, where every token of it has a value
    seq = pd.Series(fid).groupby(df["device"].to_numpy()).agg(lambda f: f.sum() if np.isfinite(f).all() else np.nan)
    seq = seq[np.isfinite(seq)]
    uplink = int(df["uplink_bytes"].sum())
    return {
        "tokens": n,
        "skip_rate": _ratio(n - int(transmitted.sum()), n),
        "acceptance_rate": _ratio(int(df["accepted"].to_numpy()[uploads].sum()), n_up),
        "vocab_compression": _num(1.0 - df["k"].to_numpy()[uploads].sum(dtype=np.int64) / (vocab_size * n_up))
        if n_up else None,
        "uplink_bytes": uplink,
        "uplink_bytes_per_token": _ratio(uplink, n),
        "payload_bytes": int(df["payload_bytes"].sum()),
        "uploads": n_up,
        "retransmissions": int(df["retransmissions"].sum()),
        "token_latency_s": {
            "p50": _num(np.percentile(lat, 50)) if len(lat) else None,
            "p95": _num(np.percentile(lat, 95)) if len(lat) else None,
            "p99": _num(np.percentile(lat, 99)) if len(lat) else None,
            "mean": _num(lat.mean()) if len(lat) else None,
        },
        "beta_mean": _num(real_beta.mean()) if len(real_beta) else None,
        "shadow_beta_mean": _num(shadow_beta.mean()) if len(shadow_beta) else None,
        "fidelity_tv_mean": _num(fid[known].mean()) if known.any() else None,
        "fidelity_tv_tokens": int(known.sum()),
        "fidelity_tv_sequence_mean": _num(seq.mean()) if len(seq) else None,
        "fidelity_tv_sequences": int(len(seq)),
    }


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
    figures = _figures(df, vocab_size)
    tiers = {}
    for tier, tdf in df.groupby("tier", sort=False):  # tiers in order of first appearance
        span = float(tdf["t_commit"].max() - tdf["t_draft_start"].min())
        span = span if math.isfinite(span) and span > 0 else emulated_seconds
        tiers[str(tier)] = {
            "devices": int(tdf["device"].nunique()),
            "policy": ",".join(dict.fromkeys(tdf["policy"].astype(str))),
            "throughput_tokens_per_s": _ratio(len(tdf), span),
            "jain_fairness": jain_fairness(per_device[tdf["device"].unique()]),
            **_figures(tdf, vocab_size),
        }
    summary = {
        "emulated_seconds": _num(emulated_seconds),
        "wall_seconds": _num(wall_seconds),
        "tokens": figures.pop("tokens"),
        "devices": int(len(per_device)),
        "throughput_tokens_per_s": {
            "system": _ratio(len(df), emulated_seconds),
            "tiers": {t: b["throughput_tokens_per_s"] for t, b in tiers.items()},
            "devices": {str(d): _num(x) for d, x in per_device.items()},
        },
        **figures,
        "jain_fairness": jain_fairness(per_device.to_numpy()),
        "verifier_batch_size_mean": _num(batches.mean()) if len(batches) else None,
        "verifier_batches": int(len(batches)),
        "vocab_size": int(vocab_size),
        "tiers": tiers,
    }
    for key, value in (extra or {}).items():
        if key in summary:
            raise ValueError(f"extra field {key!r} clashes with a computed summary field")
        summary[key] = value
    return summary


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


def read_summary(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


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
