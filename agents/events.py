"""The events a run emits, defined once: what the devices and the verifier did, as immutable records.

A device (agents.device.Device) appends events as its state machine moves; its group drains them
(DeviceGroupCore.drain_events) and hands them to the runner, which only forwards them to its sinks:
the metrics collector (testbed.metrics), the streaming results writer (testbed.results) and the
progress display. No sink rebuilds one kind of record from another.

Every device event has a `step`: the token position whose device step produced it (the final flush
is step = the tokens the device generated: max_new_tokens, or fewer when its sequence stopped). A
step's events are emitted together (one commit or one verdict), so a restarted group that skips the
steps its previous incarnation delivered emits nothing twice.

Two clocks: in the wall clock the groups emit every event. In the virtual clock the actors run a
content pass (no times, no links: only TokenCommitted and ShadowResolved, for progress) and the
driver's replay (agents.engine.replay_content) emits the timed events, link events included.

Only the standard library here (actors import it; events are pickled to the driver).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "TokenCommitted",
    "ShadowResolved",
    "LinkEvent",
    "UploadSent",
    "VerdictReceived",
    "MessageLost",
    "VerifierBatch",
    "Event",
    "DeviceEvent",
]


@dataclass(frozen=True, slots=True)
class TokenCommitted:
    """A device committed a token. `row` holds its tokens.parquet fields (testbed.results.TokenRecord;
    agents.device.token_row): a copy taken at the commit, never changed after. A skipped token's
    beta and fidelity come later (ShadowResolved)."""

    row: dict

    @property
    def device(self) -> int:
        return self.row["device"]

    @property
    def step(self) -> int:
        return self.row["token_index"]


@dataclass(frozen=True, slots=True)
class ShadowResolved:
    """A verdict gave a skipped token its shadow beta (the LLM's rejection probability) and, when the
    device measured it now, its fidelity (NaN: unchanged, e.g. a replay has it from the commit)."""

    device: int
    token_index: int  # the skipped token
    step: int  # the upload whose verdict resolved it (the tokens generated: the final flush)
    beta: float
    fidelity_tv: float = math.nan
    fidelity_tv_branch: float = math.nan  # the approximation, for a policy without a decision law


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """What the link events of one upload share: whose upload it was. Its subclasses (UploadSent,
    VerdictReceived, MessageLost) are emitted together when the upload is resolved."""

    device: int
    tier: str
    policy: str
    step: int  # the token it verifies; for the final flush the tokens generated (max_new_tokens or fewer)
    seq: int
    final: bool  # the final flush (only skipped drafts, for their shadow betas)


@dataclass(frozen=True, slots=True)
class UploadSent(LinkEvent):
    """An upload, once resolved: every copy it took on the uplink (first send, retransmissions after
    a lost copy or a lost verdict). Emitted at its verdict, when the count is known."""

    frame_bytes: int  # one copy
    copies: int  # 1 + retransmissions (rounds of the upload, then resends after a lost verdict)
    t_sent: float  # emulated time the first copy left
    wire_bytes: int  # what the uplink carried: a round resends only the packets lost (netem.Delivery)

    @property
    def bytes(self) -> int:
        return self.wire_bytes

    @property
    def retransmissions(self) -> int:
        return self.copies - 1


@dataclass(frozen=True, slots=True)
class VerdictReceived(LinkEvent):
    """A verdict reached its device: every copy the downlink carried (a lost verdict is sent again
    when the device's repeat of the upload arrives)."""

    frame_bytes: int
    copies: int
    t_arrive: float

    @property
    def bytes(self) -> int:
        return self.frame_bytes * self.copies


@dataclass(frozen=True, slots=True)
class MessageLost(LinkEvent):
    """Copies of one upload (uplink) or of its verdict (downlink) that the link dropped."""

    direction: Literal["uplink", "downlink"]
    count: int


@dataclass(frozen=True, slots=True)
class VerifierBatch:
    """One batch the verifier ran (from agents.verifier.BatchRecord; emulated times)."""

    t_start: float
    t_end: float
    size: int
    n_tokens: int
    queue_waits: tuple[float, ...] = ()

    @classmethod
    def of(cls, record) -> VerifierBatch:
        return cls(record.t_start, record.t_end, record.size, record.n_tokens, tuple(record.queue_waits))


DeviceEvent = TokenCommitted | ShadowResolved | UploadSent | VerdictReceived | MessageLost
Event = DeviceEvent | VerifierBatch
