"""The content record: what a virtual-clock content pass produced, as its timing replay consumes it
(agents.engine), and as a content library stores it (testbed.content, docs/design.md section 8).

Per device, its tokens in order (agents.content.Drafted: the draft, the policy's decision, the payload
size, the fidelity, the stop); per verdict, its frame (agents.protocol.Verdict: the token, accepted or
resampled, beta and the shadow betas), keyed by (device, seq). `Content` holds either as Python objects;
`Content.packed` as numpy records (PackedDrafted, PackedVerdicts), ~60 bytes a token. DRAFTED and
VERDICT are the record types; the library's parquet schema is derived from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from agents import protocol
from agents.content import Drafted
from policies.base import Decision


@dataclass
class Content:
    """A content pass's record: what every device emitted and what every verdict said."""

    devices: dict[int, list[Drafted]] = field(default_factory=dict)
    verdicts: dict[tuple[int, int], protocol.Verdict] = field(default_factory=dict)

    def update(self, other: Content) -> None:
        self.devices.update(other.devices)
        self.verdicts.update(other.verdicts)

    def packed(self) -> Content:
        """The same record in numpy arrays (PackedDrafted, PackedVerdicts)."""
        return Content(pack_devices(self.devices), PackedVerdicts.of(self.verdicts))

    def select(self, devices: Sequence[int]) -> Content:
        """The record of `devices` alone (increasing ids), packed: what a partition of them replays."""
        packed = self.packed()
        verdicts = packed.verdicts
        parts = []
        for d in devices:
            start, end = verdicts.rows.get(d, (0, 0))
            rows = verdicts.a[start:end].copy()
            lo = int(rows["shadow_start"][0]) if len(rows) else 0
            hi = int(rows["shadow_end"][-1]) if len(rows) else 0
            rows["shadow_start"] -= lo
            rows["shadow_end"] -= lo
            parts.append((rows, verdicts.shadow[lo:hi]))
        return Content({d: packed.devices[d] for d in devices}, PackedVerdicts.concat(parts))


# A content record as Python objects costs ~650 bytes a token (Drafted, Decision, Verdict, their
# floats and the dict keys): 400 MiB for 10,000 devices x 64 tokens, all in the driver that replays
# it. Packed in numpy records it is ~60 bytes a token, and pickles (Ray) as a few buffers. Every
# field is stored at its exact width (floats as float64, as Python holds them), so an item rebuilt
# from a record equals the original.
DRAFTED = np.dtype(
    [
        ("transmit", "?"),
        ("llm_samples", "?"),
        ("prob_bits", "i2"),
        ("k", "i4"),
        ("draft", "i4"),
        ("payload", "i8"),
        ("uncertainty", "f8"),
        ("draft_prob", "f8"),
        ("fidelity_tv", "f8"),
        ("fidelity_tv_branch", "f8"),
        ("stop", "i1"),
    ]
)


class PackedDrafted(Sequence):
    """One device's content record (its Drafted, in token order; payloads as their sizes) as one
    numpy record array; an item is rebuilt as a Drafted on access."""

    __slots__ = ("a",)

    @classmethod
    def of_array(cls, a: np.ndarray) -> PackedDrafted:
        """Over a DRAFTED record array as it is (a view of a content library's tokens: no copy)."""
        assert a.dtype == DRAFTED, f"expected the DRAFTED record type, got {a.dtype}"
        self = cls.__new__(cls)
        self.a = a
        return self

    def __init__(self, items: Sequence[Drafted]):
        self.a = np.array(
            [
                (
                    c.decision.transmit,
                    c.decision.llm_samples,
                    c.decision.prob_bits,
                    c.decision.k,
                    c.draft,
                    c.payload if isinstance(c.payload, int) else len(c.payload),
                    c.decision.uncertainty,
                    c.draft_prob,
                    c.fidelity_tv,
                    c.fidelity_tv_branch,
                    c.stop,
                )
                for c in items
            ],
            dtype=DRAFTED,
        )

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        transmit, llm_samples, prob_bits, k, draft, payload, u, draft_prob, fidelity, branch, stop = self.a[i].tolist()
        return Drafted(
            Decision(transmit, u, k, prob_bits, llm_samples), draft, draft_prob, payload, fidelity, branch, stop
        )


def pack_devices(devices: Mapping[int, Sequence[Drafted]]) -> dict[int, PackedDrafted]:
    return {d: c if isinstance(c, PackedDrafted) else PackedDrafted(c) for d, c in devices.items()}


VERDICT = np.dtype(
    [
        ("device", "i8"),
        ("seq", "i8"),
        ("session", "i8"),
        ("token_index", "i8"),
        ("token", "i8"),
        ("accepted", "?"),
        ("resampled", "?"),
        ("beta", "f8"),
        ("shadow_start", "i8"),
        ("shadow_end", "i8"),
    ]
)


class PackedVerdicts(Mapping):
    """A verifier's content log, (device, seq) -> protocol.Verdict, as one record array sorted by
    (device, seq) and the shadow betas end to end; a frame is rebuilt on access."""

    def __init__(self, a: np.ndarray, shadow: np.ndarray):
        self.a, self.shadow = a, shadow
        devices = a["device"]
        starts = np.flatnonzero(np.r_[True, devices[1:] != devices[:-1]]) if len(a) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(a)].astype(np.int64)
        self.rows = {int(devices[s]): (int(s), int(e)) for s, e in zip(starts, ends)}  # device -> its slice
        self._seq = a["seq"]  # one view, not one per lookup

    @classmethod
    def of(cls, log: Mapping) -> PackedVerdicts:
        if isinstance(log, PackedVerdicts):
            return log
        keys = sorted(log)
        shadow, recs = [], []
        for key in keys:
            v = log[key]
            recs.append(
                (
                    v.device,
                    v.seq,
                    v.session,
                    v.token_index,
                    v.token,
                    v.accepted,
                    v.resampled,
                    v.beta,
                    len(shadow),
                    len(shadow) + len(v.shadow_betas),
                )
            )
            shadow.extend(v.shadow_betas)
        return cls(np.array(recs, dtype=VERDICT), np.array(shadow, dtype=np.float64))

    @classmethod
    def concat(cls, parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> PackedVerdicts:
        """One log of several devices' (VERDICT rows, their shadow betas) parts, each part's
        shadow_start/shadow_end relative to its own shadow array; the parts' devices in increasing order
        and each device's rows by seq (as a content library hands them out)."""
        if not parts:
            return cls(np.zeros(0, VERDICT), np.zeros(0, np.float64))
        a = np.concatenate([p[0] for p in parts])
        shift = np.repeat(np.cumsum([0] + [len(p[1]) for p in parts[:-1]]), [len(p[0]) for p in parts])
        a["shadow_start"] += shift
        a["shadow_end"] += shift
        return cls(a, np.concatenate([p[1] for p in parts]))

    def __reduce__(self):  # pickle (Ray) the two arrays only
        return PackedVerdicts, (self.a, self.shadow)

    def _index(self, key) -> int:
        device, seq = key
        start, end = self.rows.get(device, (0, 0))
        i = start + seq  # a device's verdicts are its seqs 0, 1, 2, ... (every upload has one)
        if start <= i < end and self._seq[i] == seq:
            return i
        i = start + int(np.searchsorted(self._seq[start:end], seq))  # a record with gaps
        if i >= end or self._seq[i] != seq:
            raise KeyError(key)
        return i

    def __getitem__(self, key) -> protocol.Verdict:
        device, seq, session, token_index, token, accepted, resampled, beta, lo, hi = self.a[self._index(key)].tolist()
        return protocol.Verdict(
            device=device,
            session=session,
            seq=seq,
            token_index=token_index,
            token=token,
            accepted=accepted,
            resampled=resampled,
            beta=beta,
            shadow_betas=tuple(self.shadow[lo:hi].tolist()),
        )

    def __contains__(self, key) -> bool:
        try:
            self._index(key)
        except KeyError:
            return False
        return True

    def __iter__(self):
        return iter(zip(self.a["device"].tolist(), self.a["seq"].tolist()))

    def __len__(self) -> int:
        return len(self.a)
