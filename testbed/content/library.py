"""A content library: recorded content with its provenance, replayed by fleets without models
(docs/design.md section 8).

A library is a folder of recordings. A recording is what one virtual-clock run's content pass
produced (agents.record.Content), kept exactly as its timing replay consumes it, in three parquet
files whose schemas are derived from the record types:

    <library>/<recording>/sequences.parquet   a row per sequence (one device's): its recorded device
                                              id, tier, policy, prompt (index and token ids), tokens,
                                              verdicts, stop; the provenance in the file's metadata
    <library>/<recording>/tokens.parquet      a row per token: agents.record.DRAFTED (the draft, the
                                              decision, k, the payload size, uncertainty, x_d,
                                              fidelity, the stop), by (sequence, token_index)
    <library>/<recording>/verdicts.parquet    a row per verdict: agents.record.VERDICT (the token,
                                              accepted, resampled, beta) and its shadow betas, by
                                              (sequence, seq)

Every file carries FORMAT_VERSION in its metadata; a library of another version, or whose columns
are not the ones derived here, is refused (LibraryError) with what differs. Provenance: the models,
dtypes, policies with their parameters, prompts, seed, generation settings, the testbed version, the
CPU, when, and the command that rebuilds it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agents.record import DRAFTED, VERDICT, Content, PackedDrafted, PackedVerdicts

FORMAT_VERSION = 1
_KEY = b"hlm_testbed.content_library"

# The library's schemas, derived from the record types (a field added there is a column here, and
# a new FORMAT_VERSION). The verdict's device is the sequence it belongs to; its shadow betas are a
# list column instead of the record's (shadow_start, shadow_end) slice of one array.
TOKEN_COLUMNS = [("sequence", pa.int32()), ("token_index", pa.int32())] + [
    (name, pa.from_numpy_dtype(DRAFTED[name])) for name in DRAFTED.names
]
VERDICT_COLUMNS = (
    [("sequence", pa.int32())]
    + [(n, pa.from_numpy_dtype(VERDICT[n])) for n in VERDICT.names if n not in ("device", "shadow_start", "shadow_end")]
    + [("shadow_betas", pa.list_(pa.float64()))]
)
SEQUENCE_COLUMNS = [
    ("sequence", pa.int32()),
    ("device", pa.int64()),  # the device id it was recorded as
    ("tier", pa.string()),
    ("policy", pa.string()),  # the run's policy label (testbed.run.plan)
    ("prompt_index", pa.int32()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("n_tokens", pa.int32()),
    ("n_verdicts", pa.int32()),
    ("stop_reason", pa.string()),  # why it ended: eos, stop, length
]
SCHEMAS = {
    "sequences": pa.schema(SEQUENCE_COLUMNS),
    "tokens": pa.schema(TOKEN_COLUMNS),
    "verdicts": pa.schema(VERDICT_COLUMNS),
}


class LibraryError(ValueError):
    """A content library that cannot be read or used: what is wrong, and where."""


def canonical_policy(spec) -> str:
    """A policy as a scenario gives it (a preset name, or {name: ..., parameters}) in one canonical form:
    every parameter pinned (testbed.config.checks.check_policy, as a scenario resolves it), as sorted
    JSON; so `cu-hlm`, `{name: cu-hlm}` and the preset with its defaults written out are one policy."""
    from testbed.config.checks import check_policy

    try:
        spec = check_policy(spec)
    except ValueError:  # a spec that no longer loads: compared as written
        pass
    return json.dumps({"name": spec} if isinstance(spec, str) else dict(spec), sort_keys=True)


# --- writing ------------------------------------------------------------------------------------


def save_recording(
    library: str | Path,
    content: Content,
    specs,
    provenance: Mapping,
    name: str | None = None,
) -> Path:
    """Write a run's content record (`content`, packed or not; the devices `specs`: agents.device.DeviceSpec)
    as a new recording of `library` (made if missing). `provenance` must hold "policies" (label ->
    the policy as the scenario gave it), "vocab_size", "max_new_tokens" and "temperature"; the rest
    (models, prompts, seed, CPU, command...) is kept as given. Returns the recording's folder."""
    from agents.stop import CODE_REASONS

    for key in ("policies", "vocab_size", "max_new_tokens", "temperature"):
        if key not in provenance:
            raise LibraryError(f"provenance lacks {key!r}: a replay needs it")
    packed = content.packed()
    verdicts = packed.verdicts
    name = (
        name or f"{provenance.get('scenario', 'run')}-seed{provenance.get('seed', 0)}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    folder = Path(library) / name
    if folder.exists():
        raise LibraryError(f"{folder}: a recording of that name exists already")
    seqs, toks, verds = [], [], []
    for i, spec in enumerate(sorted(specs, key=lambda s: s.device)):
        a = packed.devices[spec.device].a
        start, end = verdicts.rows.get(spec.device, (0, 0))
        v = verdicts.a[start:end]
        stops = a["stop"][a["stop"] != 0]
        reason = CODE_REASONS[int(stops[-1])] if len(stops) else ("length" if len(a) else "")
        seqs.append(
            (
                i,
                spec.device,
                spec.tier,
                spec.policy_name,
                spec.prompt_index,
                list(spec.prompt_ids),
                len(a),
                len(v),
                reason,
            )
        )
        toks.append((i, a))
        verds.append((i, v, [verdicts.shadow[lo:hi].tolist() for lo, hi in zip(v["shadow_start"], v["shadow_end"])]))
    meta = {
        **dict(provenance),
        "format_version": FORMAT_VERSION,
        "recording": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    folder.mkdir(parents=True)
    _write(folder / "sequences.parquet", _sequences_table(seqs), meta)
    _write(folder / "tokens.parquet", _tokens_table(toks), meta)
    _write(folder / "verdicts.parquet", _verdicts_table(verds), meta)
    return folder


def _sequences_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[] for _ in SEQUENCE_COLUMNS]
    return pa.table([pa.array(list(c), t) for c, (_, t) in zip(cols, SEQUENCE_COLUMNS)], schema=SCHEMAS["sequences"])


def _tokens_table(parts: list[tuple[int, np.ndarray]]) -> pa.Table:
    a = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, DRAFTED)
    sequence = np.concatenate([np.full(len(p[1]), p[0], np.int32) for p in parts]) if parts else np.zeros(0, np.int32)
    index = np.concatenate([np.arange(len(p[1]), dtype=np.int32) for p in parts]) if parts else np.zeros(0, np.int32)
    arrays = [pa.array(sequence), pa.array(index)] + [pa.array(a[n]) for n in DRAFTED.names]
    return pa.table(arrays, schema=SCHEMAS["tokens"])


def _verdicts_table(parts: list[tuple[int, np.ndarray, list]]) -> pa.Table:
    a = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, VERDICT)
    sequence = np.concatenate([np.full(len(p[1]), p[0], np.int32) for p in parts]) if parts else np.zeros(0, np.int32)
    shadows = [s for p in parts for s in p[2]]
    names = [n for n, _ in VERDICT_COLUMNS[1:-1]]
    arrays = [pa.array(sequence)] + [pa.array(a[n]) for n in names] + [pa.array(shadows, pa.list_(pa.float64()))]
    return pa.table(arrays, schema=SCHEMAS["verdicts"])


def _write(path: Path, table: pa.Table, meta: Mapping) -> None:
    table = table.replace_schema_metadata({_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})
    pq.write_table(table, path, compression="zstd")


# --- reading ------------------------------------------------------------------------------------


@dataclass
class Recording:
    """One recording of a library: its provenance and its three tables (read when first needed)."""

    path: Path
    provenance: dict
    sequences: pa.Table
    _tokens: pa.Table | None = field(default=None, repr=False)
    _verdicts: pa.Table | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tokens(self) -> pa.Table:
        if self._tokens is None:
            self._tokens = _read(self.path / "tokens.parquet", "tokens")[0]
        return self._tokens

    @property
    def verdicts(self) -> pa.Table:
        if self._verdicts is None:
            self._verdicts = _read(self.path / "verdicts.parquet", "verdicts")[0]
        return self._verdicts


def _read(path: Path, kind: str) -> tuple[pa.Table, dict]:
    """A library table, refused unless its version and columns are this testbed's."""
    if not path.is_file():
        raise LibraryError(f"{path}: missing (a recording holds sequences, tokens and verdicts .parquet)")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise LibraryError(f"{path}: not a parquet file ({exc})") from None
    raw = (schema.metadata or {}).get(_KEY)
    if raw is None:
        raise LibraryError(f"{path}: not a content library file (no {_KEY.decode()} metadata)")
    meta = json.loads(raw)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise LibraryError(
            f"{path}: content library format version {version}, this testbed reads version {FORMAT_VERSION}; "
            f"rebuild the library with this testbed ({meta.get('command', 'testbed content record ...')})"
        )
    want = SCHEMAS[kind]
    got = {f.name: f.type for f in schema}
    wrong = [
        f"{f.name} ({'missing' if f.name not in got else f'{got[f.name]}, expected {f.type}'})"
        for f in want
        if got.get(f.name) != f.type
    ]
    if wrong:
        raise LibraryError(f"{path}: columns differ from format version {FORMAT_VERSION}: {', '.join(wrong)}")
    return pq.read_table(path, columns=want.names), meta


def bundled_libraries() -> dict[str, Path]:
    """The libraries shipped with the testbed (package data), by name."""
    root = Path(__file__).parent / "libraries"
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() else {}


def library_path(ref: str | Path, base_dir: str | Path | None = None) -> Path:
    """A library given as a bundled name or a folder (relative to base_dir, the scenario's folder)."""
    bundled = bundled_libraries()
    if isinstance(ref, str) and ref in bundled:
        return bundled[ref]
    path = (Path(base_dir or ".") / Path(ref).expanduser()).resolve()
    if not path.is_dir():
        names = ", ".join(bundled) or "none"
        raise LibraryError(f"content library not found: {ref} (not a folder; bundled libraries: {names})")
    return path


@dataclass
class Library:
    """A content library as read: its recordings, in name order."""

    path: Path
    recordings: list[Recording]

    @classmethod
    def open(cls, ref: str | Path, base_dir: str | Path | None = None) -> Library:
        path = library_path(ref, base_dir)
        recordings = []
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            table, meta = _read(folder / "sequences.parquet", "sequences")
            recordings.append(Recording(folder, meta, table))
        if not recordings:
            raise LibraryError(
                f"{path}: no recording in this content library (testbed content record ... --out {path})"
            )
        return cls(path, recordings)

    def policies(self) -> dict[str, dict]:
        """canonical_policy -> {label, spec, sequences, recordings} over every recording."""
        out: dict[str, dict] = {}
        for r in self.recordings:
            labels = r.sequences.column("policy").to_pylist()
            for label, spec in r.provenance["policies"].items():
                entry = out.setdefault(
                    canonical_policy(spec), {"label": label, "spec": spec, "sequences": 0, "recordings": []}
                )
                entry["sequences"] += labels.count(label)
                entry["recordings"].append(r.name)
        return out

    def describe_policies(self) -> str:
        """The policies this library holds, for an error message."""
        return "; ".join(
            f"{p['label']} ({p['sequences']} sequences)"
            if p["spec"] == p["label"]
            else f"{p['spec']} ({p['sequences']} sequences)"
            for p in self.policies().values()
        )

    def pool(self, policy) -> Pool:
        """Every sequence of `policy` (as a scenario gives it) over the library's recordings, in
        (recording, sequence) order. LibraryError naming the library's policies when it has none."""
        key = canonical_policy(policy)
        parts = []
        for r in self.recordings:
            labels = [label for label, spec in r.provenance["policies"].items() if canonical_policy(spec) == key]
            if labels:
                parts.append((r, labels[0]))
        if not parts:
            raise LibraryError(
                f"content library {self.path} has no content of policy {policy}; it holds: {self.describe_policies()}"
            )
        return Pool.of(parts)

    def run_settings(self) -> dict:
        """The settings a replay takes from the recordings (equal in all of them, else LibraryError):
        vocab_size, max_new_tokens, temperature."""
        out: dict = {}
        for r in self.recordings:
            for key in ("vocab_size", "max_new_tokens", "temperature"):
                value = r.provenance[key]
                if out.setdefault(key, value) != value:
                    raise LibraryError(f"{self.path}: recordings differ in {key} ({out[key]} and {value} in {r.name})")
        return out


@dataclass
class Pool:
    """The sequences of one policy, ready to hand out: tokens and verdicts as record arrays, each
    sequence a slice (tokens[tok[s]:tok[s+1]], verdicts[ver[s]:ver[s+1]]), ~60 bytes a token."""

    label: str
    spec: object
    tokens: np.ndarray  # DRAFTED
    tok: np.ndarray  # offsets, len n + 1
    verdicts: np.ndarray  # VERDICT (device: the pool's sequence index; shadow_* into `shadow`)
    ver: np.ndarray
    shadow: np.ndarray
    prompt_index: np.ndarray
    prompt_ids: list[tuple[int, ...]]
    recorded_device: np.ndarray  # the device id each sequence was recorded as
    recording: list[str]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @classmethod
    def of(cls, parts: list[tuple[Recording, str]]) -> Pool:
        toks, verds, shadows, n_shadow = [], [], [], 0
        prompt_index, prompt_ids, devices, recording, tok_lens, ver_lens = [], [], [], [], [], []
        for r, label in parts:
            seqs = r.sequences.to_pydict()
            chosen = [i for i, p in enumerate(seqs["policy"]) if p == label]
            ids = np.array([seqs["sequence"][i] for i in chosen], dtype=np.int32)
            t = r.tokens.filter(pa.compute.is_in(r.tokens.column("sequence"), pa.array(ids))).to_pydict()
            a = np.zeros(len(t["sequence"]), DRAFTED)
            for n in DRAFTED.names:
                a[n] = t[n]
            order = np.lexsort((np.asarray(t["token_index"]), np.asarray(t["sequence"])))
            toks.append(a[order])
            v = r.verdicts.filter(pa.compute.is_in(r.verdicts.column("sequence"), pa.array(ids))).to_pydict()
            vorder = np.lexsort((np.asarray(v["seq"]), np.asarray(v["sequence"])))
            b = np.zeros(len(vorder), VERDICT)
            rank = {int(s): len(recording) + j for j, s in enumerate(ids)}
            b["device"] = [rank[v["sequence"][i]] for i in vorder]
            for n in VERDICT.names:
                if n not in ("device", "shadow_start", "shadow_end"):
                    b[n] = np.asarray(v[n])[vorder]
            lens = np.array([len(v["shadow_betas"][i]) for i in vorder], dtype=np.int64)
            b["shadow_start"] = n_shadow + np.r_[0, np.cumsum(lens)[:-1]] if len(lens) else []
            b["shadow_end"] = b["shadow_start"] + lens
            n_shadow += int(lens.sum())
            shadows.extend(x for i in vorder for x in v["shadow_betas"][i])
            verds.append(b)
            for i in chosen:
                prompt_index.append(seqs["prompt_index"][i])
                prompt_ids.append(tuple(seqs["prompt_ids"][i]))
                devices.append(seqs["device"][i])
                recording.append(r.name)
                tok_lens.append(seqs["n_tokens"][i])
                ver_lens.append(seqs["n_verdicts"][i])
        spec = parts[0][0].provenance["policies"][parts[0][1]]
        return cls(
            parts[0][1],
            spec,
            np.concatenate(toks),
            np.r_[0, np.cumsum(tok_lens)].astype(np.int64),
            np.concatenate(verds),
            np.r_[0, np.cumsum(ver_lens)].astype(np.int64),
            np.asarray(shadows, dtype=np.float64),
            np.asarray(prompt_index, dtype=np.int64),
            prompt_ids,
            np.asarray(devices, dtype=np.int64),
            recording,
        )

    def drafted(self, s: int) -> PackedDrafted:
        """Sequence s's tokens, as a replay's device consumes them (a view, no copy)."""
        return PackedDrafted.of_array(self.tokens[self.tok[s] : self.tok[s + 1]])

    def verdict_part(self, s: int, device: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence s's verdicts addressed to `device`, with their shadow betas (PackedVerdicts.concat)."""
        v = self.verdicts[self.ver[s] : self.ver[s + 1]].copy()
        lo = int(v["shadow_start"][0]) if len(v) else 0
        hi = int(v["shadow_end"][-1]) if len(v) else 0
        v["device"] = device
        v["shadow_start"] -= lo
        v["shadow_end"] -= lo
        return v, self.shadow[lo:hi]


def content_for(assigned: list[tuple[int, Pool, int]]) -> Content:
    """The content record of a replay whose devices take library sequences: (device, pool, sequence)
    for each device, in increasing device order."""
    devices = {d: pool.drafted(s) for d, pool, s in assigned}
    return Content(devices, PackedVerdicts.concat([pool.verdict_part(s, d) for d, pool, s in assigned]))
