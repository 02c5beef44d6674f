"""Admission: which client may open and use which session, within which limits (docs/design.md
section 8). No sockets: the verifier actor hands it each message's parts and the ZeroMQ identity
they came from, and answers whatever it refuses (a ProtocolError) to that client alone.

A session belongs to the identity that opened it. After a group's restart the driver reserves its
devices for the new incarnation's identity (handover): no other client can open them.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents import protocol, wire
from agents.verifier import VerifierCore


@dataclass(frozen=True)
class Limits:
    """What one verifier admits. allowed_devices: the device ids the run has (None: any);
    max_sessions in total; per identity (a client): sessions, and prompt tokens prefilled over the run;
    max_prompt_tokens: one prompt (the model's positions)."""

    allowed_devices: frozenset[int] | None
    max_sessions: int
    max_sessions_per_identity: int
    max_prompt_tokens: int
    max_prefill_tokens: int


class Admission:
    def __init__(self, core: VerifierCore, limits: Limits):
        self.core, self.limits = core, limits
        self.owners: dict[int, bytes] = {}  # device -> the identity that opened its session (verdicts go there)
        self.reserved: dict[int, bytes] = {}  # device -> the only identity that may open it (after handover)
        self.identity_sessions: dict[bytes, int] = {}  # identities that opened a session: how many
        self.identity_prefill: dict[bytes, int] = {}  # ... and how many prompt tokens

    def admit(self, identity: bytes, parts: list[bytes], extra: int, opens: list) -> wire.Upload | None:
        """Decode and check one message ([frame, stamp], `extra` parts beyond them); raise ProtocolError
        to refuse it. An OPEN that passes is appended to `opens` (None is returned); an upload of the
        identity's own session is returned for VerifierCore.submit."""
        if extra:
            raise protocol.ProtocolError(
                f"message of {len(parts) + extra} parts, the protocol has {wire.PARTS} ([frame, stamp]); not decoded",
                protocol.ErrorCode.BAD_FRAME,
            )
        msg = wire.decode(parts)
        if isinstance(msg, wire.Open):
            self._admit_open(identity, msg, len(opens))
            opens.append(msg)
            return None
        f = msg.frame
        if not isinstance(msg, wire.Upload):
            raise protocol.ProtocolError(f"unexpected {f.TYPE.name} from a device", device=f.device, seq=f.seq)
        if self.owners.get(f.device) != identity:  # never open, or another client's: the same answer
            raise protocol.ProtocolError(
                f"device {f.device}: no session of this client",
                protocol.ErrorCode.UNKNOWN_SESSION,
                device=f.device,
                seq=f.seq,
            )
        return msg

    def _admit_open(self, identity: bytes, o: wire.Open, pending: int) -> None:
        """Admit an OPEN against the limits and VerifierCore.check_open; the session then
        belongs to `identity`. `pending`: admitted opens not yet handed to the core."""
        E, d, prompt, lim = protocol.ErrorCode, o.frame.device, o.frame.prompt, self.limits

        def refuse(text: str, code=E.LIMIT):
            raise protocol.ProtocolError(f"device {d}: OPEN refused: {text}", code, device=d, seq=0)

        if lim.allowed_devices is not None and d not in lim.allowed_devices:
            refuse("not a device of this run", E.REFUSED)
        holder = self.reserved.get(d)
        if holder is not None and holder != identity:
            refuse("the device is reserved for its restarted group", E.REFUSED)
        if d in self.owners and holder is None:
            refuse("a session is already open for this device", E.REFUSED)
        if len(self.core.sessions) + pending >= lim.max_sessions:
            refuse(f"the verifier holds its limit of {lim.max_sessions} sessions")
        opened, prefilled = self.identity_sessions.get(identity, 0), self.identity_prefill.get(identity, 0)
        if opened >= lim.max_sessions_per_identity:
            refuse(f"this client holds its limit of {lim.max_sessions_per_identity} sessions")
        if len(prompt) > lim.max_prompt_tokens:
            refuse(f"prompt of {len(prompt)} tokens, the limit is {lim.max_prompt_tokens}")
        if prefilled + len(prompt) > lim.max_prefill_tokens:
            refuse(
                f"this client's prompts would total {prefilled + len(prompt)} tokens, the limit is "
                f"{lim.max_prefill_tokens}"
            )
        self.core.check_open(o)
        self.reserved.pop(d, None)
        self.owners[d] = identity
        self.identity_sessions[identity] = opened + 1
        self.identity_prefill[identity] = prefilled + len(prompt)

    def handover(self, devices: list[int], identity: bytes) -> None:
        """The group that hosted `devices` died (its sessions are reset in the core): they belong to,
        and are reserved for, `identity`, the restarted group's."""
        for d in devices:
            self.owners[d] = self.reserved[d] = identity

    def restored(self, device: int, prompt_tokens: int, identity: bytes) -> None:
        """A session rebuilt by a new verifier (VerifierCore.restore) belongs to `identity`, the
        group that hosts the device, and counts against its limits."""
        self.owners[device] = identity
        self.identity_sessions[identity] = self.identity_sessions.get(identity, 0) + 1
        self.identity_prefill[identity] = self.identity_prefill.get(identity, 0) + prompt_tokens

    def unopened(self) -> list[int]:
        """The run's devices with no session yet ([] when any device may connect)."""
        allowed = self.limits.allowed_devices
        return sorted(allowed - set(self.core.sessions)) if allowed else []
