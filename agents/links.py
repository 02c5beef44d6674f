"""A device's links in emulated time: when its uploads reach the verifier and its verdicts come back
(docs/design.md section 2, the virtual clock).

Losses are resolved here, by the same rule in both clocks: the packets of an upload that did not get
through are sent again every rto_s until all have (selective repeat, as the TCP under ZeroMQ does:
netem.Delivery); a lost verdict makes the device resend its upload every rto_s, and the verifier
answers a repeat that arrives after the verdict left with the same verdict (earlier repeats find the
request still queued and are ignored).

A device composes one of two link models with its content source (agents.content):
- `Links`: its uplink and downlink (netem.Link), which also emit the link events (agents.events): the
  one-pass emulation and the virtual clock's timing replay;
- `NoLinks`: no time and no links, an upload arrives when it is sent and its verdict when it leaves,
  and no link event: the virtual clock's content pass (the replay runs the links).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agents import protocol
from agents.events import MessageLost, UploadSent, VerdictReceived
from agents.wire import Upload, UploadStamp, Verdict
from netem import Link, link_seed

MAX_RETRANSMISSIONS = 32


@dataclass(frozen=True, slots=True)
class Answer:
    """How a verdict reached its device: when, after how many resends of the upload, what the uplink
    carried of the upload in all (`wire_bytes`: every round, every resend), the row's link columns
    (`columns`: uplink_lost, downlink_bytes, downlink_lost) and the link events."""

    arrive: float
    retransmissions: int
    wire_bytes: int
    columns: dict
    events: list = field(default_factory=list)


class Links:
    """A device's uplink and downlink, each keyed by (seed, device, direction) (netem.link_seed)."""

    def __init__(self, spec, run):
        self.uplink = Link(spec.link.uplink, link_seed(run.seed, spec.device, "uplink"))
        self.downlink = Link(spec.link.downlink, link_seed(run.seed, spec.device, "downlink"))
        self.rto_s = run.rto_s

    def send(self, frame: protocol.Upload | protocol.Flush, t_sent: float) -> tuple[Upload, int]:
        """Send `frame` up at t_sent, and every rto_s its packets that did not get through. Returns the
        upload stamped with its arrival and the bytes the uplink carried."""
        delivery, t, arrive = self.uplink.message(protocol.wire_size(frame)), t_sent, None
        for retransmissions in range(MAX_RETRANSMISSIONS + 1):  # noqa: B007 - read after the loop
            arrive = delivery.round(t)
            if arrive is not None:
                break
            t += self.rto_s
        if arrive is None:
            raise RuntimeError(f"device {frame.device}: upload {frame.seq} lost {MAX_RETRANSMISSIONS + 1} times")
        return Upload(frame, UploadStamp(t_sent, arrive, retransmissions)), delivery.wire_bytes

    def answer(self, spec, upload: Upload, verdict: Verdict, wire_bytes: int) -> Answer:
        """The verdict on `upload` down the downlink; while it is lost, the upload resent every rto_s
        until a repeat is answered. `wire_bytes`: what the uplink carried of the upload so far.

        Only tries that could have been answered count toward MAX_RETRANSMISSIONS: a copy that reached
        the verifier before the verdict left (the request was still queued, so it was ignored), or a
        lost copy sent before then, is no lost transmission. Without this a verifier queue longer than
        MAX_RETRANSMISSIONS * rto_s ended a device on its first lost verdict. Every copy is still sent
        (the link's state and the uplink bytes count it), so a run that never reached the limit keeps
        its trace bit for bit. A resend is a new message; its packets that did not get through go again
        at the next rto_s (selective repeat, as in send) until it is through, then the next resend is new.
        """
        v, t_sent = verdict.frame, verdict.stamp.t_sent
        up_bytes, down_bytes = protocol.wire_size(upload.frame), protocol.wire_size(v)
        # each retransmission in send followed a lost copy; every downlink send is a copy of the verdict
        retx = up_lost = upload.stamp.retransmissions
        t_last = upload.stamp.t_sent + retx * self.rto_s  # the copy that reached the verifier
        arrive = self.downlink.send(down_bytes, t_sent)
        down_copies, down_lost = 1, int(arrive is None)
        lost, resend = 0, None
        while arrive is None:
            if lost >= MAX_RETRANSMISSIONS:
                raise RuntimeError(f"device {v.device}: verdict {v.seq} lost {MAX_RETRANSMISSIONS} times")
            t_last += self.rto_s
            retx += 1
            resend = resend or self.uplink.message(up_bytes)
            before = resend.wire_bytes
            again = resend.round(t_last)
            wire_bytes += resend.wire_bytes - before
            up_lost += again is None
            if again is not None:
                resend = None
            if (t_last if again is None else again) < t_sent:
                continue  # too early to be answered: not a loss (t_last grows, so this ends)
            lost += 1
            if again is not None:
                arrive = self.downlink.send(down_bytes, again)
                down_copies += 1
                down_lost += arrive is None
        # The link events, before the shadow betas (a results writer completes a flush's row with them)
        key = (spec.device, spec.tier, spec.policy_name, upload.frame.token_index, upload.frame.seq, upload.final)
        events: list = [
            UploadSent(*key, up_bytes, 1 + retx, upload.stamp.t_sent, wire_bytes),
            VerdictReceived(*key, down_bytes, down_copies, arrive),
        ]
        for direction, n in (("uplink", up_lost), ("downlink", down_lost)):
            if n:
                events.append(MessageLost(*key, direction, n))
        columns = dict(uplink_lost=up_lost, downlink_bytes=down_bytes * down_copies, downlink_lost=down_lost)
        return Answer(arrive, retx, wire_bytes, columns, events)


class NoLinks:
    """The content pass: nothing takes time and nothing is lost; no link event (the replay emits them)."""

    def __init__(self, spec=None, run=None):
        pass

    def send(self, frame: protocol.Upload | protocol.Flush, t_sent: float) -> tuple[Upload, int]:
        return Upload(frame, UploadStamp(t_sent, t_sent)), protocol.wire_size(frame)

    def answer(self, spec, upload: Upload, verdict: Verdict, wire_bytes: int) -> Answer:
        columns = dict(uplink_lost=0, downlink_bytes=0, downlink_lost=0)
        return Answer(verdict.stamp.t_sent, 0, wire_bytes, columns)
