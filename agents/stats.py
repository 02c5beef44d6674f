"""Plain stat records the actors emit, and `StatBatch`, the container that carries them.

Style (vLLM v1): stats are plain data, separate from their sinks. What the devices and the
verifier did travels as agents.events (one stream for the collector, the results writer and the
progress display); the collector turns those events into these records internally, and the runner
reports its clock (ClockStat) and protocol errors (ProtocolErrorStat) as records directly.

Conventions for every record:
- Emulated times are seconds on the run's emulated clock, which starts at 0.0 at the run start
  (both clocks: in `wall` the emulated clock is real time x time_scale since the start).
- Wall times are real seconds since the run start (`time.monotonic()` differences).
- `tier` and `policy` are the scenario's tier name and that tier's policy name (the Prometheus
  labels). `device` is the global device index; it is never a label, the collector only uses it
  to compute per-device throughput and Jain's fairness.

Emitting (in an actor, e.g. a DeviceGroup)::

    batch = StatBatch(source="group-3")
    batch.add(TokenStat(device=17, tier="phone", policy="cu-hlm", ...))   # or batch.add_token(...)
    batch.add(LinkStat(tier="phone", policy="cu-hlm", direction="uplink", messages=1, bytes=812))
    ...
    return batch.drain()          # hand over (e.g. as a Ray return value); `batch` is empty again

and in the runner's process: `collector.ingest(batch)`.

This module imports only the standard library (it is imported by the actors).
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Mapping, NamedTuple, Union

__all__ = [
    "TokenStat",
    "VerifierBatchStat",
    "LinkStat",
    "ClockStat",
    "ProtocolErrorStat",
    "Stat",
    "StatBatch",
    "TokenColumns",
    "FLAG_TRANSMITTED",
    "FLAG_ACCEPTED",
    "FLAG_RESAMPLED",
    "FLAG_DRAFTED",
]


@dataclass(frozen=True, slots=True)
class TokenStat:
    """One committed token of one device (emitted by the device group when the token commits).

    A *skipped* token (``transmitted=False``) is accepted on the device without an upload; a
    *transmitted* token's draft distribution was uploaded and verified by the LLM, which either
    accepted the draft or rejected it and resampled.
    """

    device: int
    """Global device index. Used only for per-device throughput / fairness, never as a label."""
    tier: str
    """Tier name from the scenario (label)."""
    policy: str
    """Policy name of the tier, e.g. ``cu-hlm`` (label)."""
    uncertainty: float
    """u(t) of the draft as computed by the policy's estimator, in [0, 1] for the paper's
    temperature-perturbation estimator. ``math.nan`` when the policy computed none (e.g.
    llm-only); NaN values are not observed in the histogram."""
    transmitted: bool
    """True when the device uploaded for this token (its draft distribution; for llm-only a
    request without a draft); False when skipped."""
    k: int
    """Vocabulary entries sent in the upload (top-k after truncation; |V| for a full
    distribution); 0 when skipped."""
    payload_bytes: int
    """Bytes of the encoded distribution payload (bit-packed indices + quantised
    probabilities); 0 when skipped."""
    uplink_bytes: int
    """Every byte this token put on the uplink: frame header + payload + piggybacked ids of
    earlier skipped tokens + retransmissions (same as tokens.parquet's uplink_bytes); 0 when
    skipped (its id rides on a later upload, billed there)."""
    accepted: bool
    """The committed token is the draft: True for skipped tokens (accepted on the device) and
    for uploads the LLM accepted; False when the LLM rejected the draft."""
    resampled: bool
    """The committed token was resampled by the LLM from norm(max(0, y - xhat)) after a
    rejection (transmitted and not accepted)."""
    latency_s: float
    """Emulated seconds from the start of this token's draft to its commit on the device."""
    t_commit: float
    """Emulated time of the commit (seconds since the run start)."""
    drafted: bool = True
    """False only when no SLM draft exists (llm-only: the LLM generates the token)."""


@dataclass(frozen=True, slots=True)
class VerifierBatchStat:
    """One batch the verifier ran (emitted by the Verifier when the batch completes)."""

    batch_size: int
    """Requests (device uploads) in the batch."""
    tokens: int
    """Tokens the LLM forward processed for the batch: the verified drafts plus any
    piggybacked context tokens (ids of skipped tokens) it had to catch up on."""
    verify_s: float
    """Emulated seconds the verification took (from the server profile, as a function of
    batch size and tokens)."""
    queue_wait_s: tuple[float, ...] = ()
    """Per request in the batch: emulated seconds from its arrival at the verifier to the
    start of the batch. Length ``batch_size`` (may be empty if not measured)."""
    t_start: float = math.nan
    """Emulated time at which the batch started (optional; used to advance the clock)."""

    def __post_init__(self) -> None:
        if self.batch_size < 0 or self.tokens < 0:
            raise ValueError(f"VerifierBatchStat: negative batch_size/tokens: {self!r}")
        if self.queue_wait_s and len(self.queue_wait_s) != self.batch_size:
            raise ValueError(
                f"VerifierBatchStat: {len(self.queue_wait_s)} queue waits for batch_size {self.batch_size}"
            )


Direction = Literal["uplink", "downlink"]


@dataclass(frozen=True, slots=True)
class LinkStat:
    """Link events of one tier in one direction, as deltas since the last record.

    Emit one per message or aggregate several; every field is an increment.
    """

    tier: str
    policy: str
    direction: Direction
    """``uplink`` (device -> verifier) or ``downlink`` (verifier -> device)."""
    messages: int = 0
    """Messages handed to the link (first transmissions only)."""
    bytes: int = 0
    """Bytes put on the wire, including headers and retransmissions."""
    lost: int = 0
    """Transmissions the link dropped (each loss of a first send or of a retransmission)."""
    retransmissions: int = 0
    """Retransmissions sent after a loss or timeout."""

    def __post_init__(self) -> None:
        if self.direction not in ("uplink", "downlink"):
            raise ValueError(f"LinkStat.direction must be 'uplink' or 'downlink', got {self.direction!r}")
        if min(self.messages, self.bytes, self.lost, self.retransmissions) < 0:
            raise ValueError(f"LinkStat: negative increment: {self!r}")


@dataclass(frozen=True, slots=True)
class ClockStat:
    """Progress of the clocks, reported by the runner (or by each device group).

    The collector keeps the latest record per `source`: the run's emulated time, wall time and
    lag are the maxima over sources, active devices are summed over sources.
    """

    source: str
    """Who reports, e.g. ``runner`` or ``group-3``."""
    emulated_s: float
    """Emulated time reached (seconds since the run start). In the virtual clock: the time up
    to which the source has emulated; in the wall clock: real time x time_scale."""
    wall_s: float
    """Real seconds since the run start."""
    lag_s: float = 0.0
    """Wall clock: how many real seconds the emulation is behind its schedule (0 when keeping
    up, always 0 in the virtual clock)."""
    active_devices: Mapping[str, int] = field(default_factory=dict)
    """Devices of each tier (tier name -> count) that still have tokens to generate."""


@dataclass(frozen=True, slots=True)
class ProtocolErrorStat:
    """Malformed, oversized or out-of-order frames answered with an error reply."""

    reason: str
    """Short reason, e.g. ``malformed``, ``oversized``, ``out-of-order`` (log only, not a label)."""
    count: int = 1


Stat = Union[TokenStat, VerifierBatchStat, LinkStat, ClockStat, ProtocolErrorStat]

# Token flags packed into one byte per token.
_TRANSMITTED, _ACCEPTED, _RESAMPLED, _DRAFTED = 1, 2, 4, 8


class TokenColumns(NamedTuple):
    """Column view of the tokens in a batch (what the collector reads; no per-token objects).

    ``label[i]`` indexes ``labels``, a list of ``(tier, policy)`` pairs.
    """

    labels: list[tuple[str, str]]
    device: array
    label: array
    uncertainty: array
    flags: array
    k: array
    payload_bytes: array
    uplink_bytes: array
    latency_s: array
    t_commit: array

    def __len__(self) -> int:  # type: ignore[override]
        return len(self.device)


class StatBatch:
    """A batch of stat records from one source, cheap to pickle (e.g. as a Ray return value).

    Tokens (the high-volume record) are stored column-wise in `array.array`s with the
    (tier, policy) pairs dictionary-encoded, so pickling a batch costs a few bytes per token and
    no per-token objects. The other, rarer records are kept as lists of dataclasses.
    """

    __slots__ = ("source", "_labels", "_label_ix", "_cols", "verifier", "links", "clocks", "errors")

    def __init__(self, source: str = "") -> None:
        self.source = source
        self._labels: list[tuple[str, str]] = []
        self._label_ix: dict[tuple[str, str], int] = {}
        self._cols = _empty_columns()
        self.verifier: list[VerifierBatchStat] = []
        self.links: list[LinkStat] = []
        self.clocks: list[ClockStat] = []
        self.errors: list[ProtocolErrorStat] = []

    # -- recording -------------------------------------------------------------------------
    def add(self, stat: Stat) -> None:
        """Append any stat record."""
        if isinstance(stat, TokenStat):
            self.add_token(
                device=stat.device, tier=stat.tier, policy=stat.policy, uncertainty=stat.uncertainty,
                transmitted=stat.transmitted, k=stat.k, payload_bytes=stat.payload_bytes,
                uplink_bytes=stat.uplink_bytes, accepted=stat.accepted, resampled=stat.resampled,
                latency_s=stat.latency_s, t_commit=stat.t_commit, drafted=stat.drafted,
            )
        elif isinstance(stat, VerifierBatchStat):
            self.verifier.append(stat)
        elif isinstance(stat, LinkStat):
            self.links.append(stat)
        elif isinstance(stat, ClockStat):
            self.clocks.append(stat)
        elif isinstance(stat, ProtocolErrorStat):
            self.errors.append(stat)
        else:
            raise TypeError(f"StatBatch.add: not a stat record: {type(stat).__name__}")

    def extend(self, stats: Iterable[Stat]) -> None:
        for s in stats:
            self.add(s)

    def add_token(
        self, *, device: int, tier: str, policy: str, uncertainty: float, transmitted: bool, k: int,
        payload_bytes: int, uplink_bytes: int, accepted: bool, resampled: bool, latency_s: float,
        t_commit: float, drafted: bool = True,
    ) -> None:
        """Append one token without building a `TokenStat` (same fields, same meaning)."""
        key = (tier, policy)
        ix = self._label_ix.get(key)
        if ix is None:
            ix = self._label_ix[key] = len(self._labels)
            self._labels.append(key)
        c = self._cols
        c["device"].append(device)
        c["label"].append(ix)
        c["uncertainty"].append(uncertainty)
        c["flags"].append(
            (_TRANSMITTED if transmitted else 0) | (_ACCEPTED if accepted else 0)
            | (_RESAMPLED if resampled else 0) | (_DRAFTED if drafted else 0)
        )
        c["k"].append(k)
        c["payload_bytes"].append(payload_bytes)
        c["uplink_bytes"].append(uplink_bytes)
        c["latency_s"].append(latency_s)
        c["t_commit"].append(t_commit)

    def merge(self, other: "StatBatch") -> None:
        """Append all records of `other` (e.g. to combine the batches of several actors)."""
        remap = array("I", (self._label_of(lbl) for lbl in other._labels))
        c, o = self._cols, other._cols
        for name in _COLUMNS:
            if name == "label":
                c["label"].extend(remap[i] for i in o["label"])
            else:
                c[name].extend(o[name])
        self.verifier.extend(other.verifier)
        self.links.extend(other.links)
        self.clocks.extend(other.clocks)
        self.errors.extend(other.errors)

    def drain(self) -> "StatBatch":
        """Return a batch with everything recorded so far and leave this one empty."""
        out = StatBatch(self.source)
        out._labels, out._label_ix, out._cols = self._labels, self._label_ix, self._cols
        out.verifier, out.links, out.clocks, out.errors = self.verifier, self.links, self.clocks, self.errors
        self._labels, self._label_ix, self._cols = [], {}, _empty_columns()
        self.verifier, self.links, self.clocks, self.errors = [], [], [], []
        return out

    # -- reading ---------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self._cols["device"])

    def __len__(self) -> int:
        """Number of records of all kinds."""
        return self.n_tokens + len(self.verifier) + len(self.links) + len(self.clocks) + len(self.errors)

    def __bool__(self) -> bool:
        return len(self) > 0

    def token_columns(self) -> TokenColumns:
        c = self._cols
        return TokenColumns(self._labels, *(c[name] for name in _COLUMNS))

    def tokens(self) -> Iterator[TokenStat]:
        """The tokens as `TokenStat` records (convenient, slower than `token_columns`)."""
        c = self._cols
        for i in range(self.n_tokens):
            tier, policy = self._labels[c["label"][i]]
            f = c["flags"][i]
            yield TokenStat(
                device=c["device"][i], tier=tier, policy=policy, uncertainty=c["uncertainty"][i],
                transmitted=bool(f & _TRANSMITTED), k=c["k"][i], payload_bytes=c["payload_bytes"][i],
                uplink_bytes=c["uplink_bytes"][i], accepted=bool(f & _ACCEPTED),
                resampled=bool(f & _RESAMPLED), latency_s=c["latency_s"][i], t_commit=c["t_commit"][i],
                drafted=bool(f & _DRAFTED),
            )

    def stats(self) -> Iterator[Stat]:
        """Every record (tokens first, then verifier, link, clock and error records)."""
        yield from self.tokens()
        yield from self.verifier
        yield from self.links
        yield from self.clocks
        yield from self.errors

    def __repr__(self) -> str:
        return (
            f"StatBatch(source={self.source!r}, tokens={self.n_tokens}, verifier={len(self.verifier)}, "
            f"links={len(self.links)}, clocks={len(self.clocks)}, errors={len(self.errors)})"
        )

    # -- pickling --------------------------------------------------------------------------
    def __getstate__(self) -> tuple:
        return (self.source, self._labels, self._cols, self.verifier, self.links, self.clocks, self.errors)

    def __setstate__(self, state: tuple) -> None:
        self.source, self._labels, self._cols, self.verifier, self.links, self.clocks, self.errors = state
        self._label_ix = {lbl: i for i, lbl in enumerate(self._labels)}

    def _label_of(self, key: tuple[str, str]) -> int:
        ix = self._label_ix.get(key)
        if ix is None:
            ix = self._label_ix[key] = len(self._labels)
            self._labels.append(key)
        return ix


# Column name -> array typecode (q: int64, I: uint32, d: float64, B: uint8).
_COLUMNS: dict[str, str] = {
    "device": "q",
    "label": "I",
    "uncertainty": "d",
    "flags": "B",
    "k": "q",
    "payload_bytes": "q",
    "uplink_bytes": "q",
    "latency_s": "d",
    "t_commit": "d",
}


def _empty_columns() -> dict[str, array]:
    return {name: array(code) for name, code in _COLUMNS.items()}


# Flag bits, exported for readers of `TokenColumns.flags`.
FLAG_TRANSMITTED, FLAG_ACCEPTED, FLAG_RESAMPLED, FLAG_DRAFTED = _TRANSMITTED, _ACCEPTED, _RESAMPLED, _DRAFTED
