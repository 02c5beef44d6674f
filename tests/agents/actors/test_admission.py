"""Admission alone, without sockets or threads (agents.actors.admission): who may open and use which
session, and every limit's refusal names what was wrong. The Verifier actor wires it to the ROUTER
(tests/agents/test_hostile.py checks the same rules end to end over ZeroMQ)."""

from __future__ import annotations

import pytest

from agents import codec, protocol, wire
from agents.actors.admission import Admission, Limits
from agents.protocol import ErrorCode
from agents.verifier import ServerProfile, VerifierCore

PROMPT = [3, 4, 5, 6]


@pytest.fixture(scope="module")
def lm():
    from agents.lm import BatchedLM
    from agents.models import load_model, parse_spec

    return BatchedLM(load_model(parse_spec("tiny:llm")))


def admission(lm, **limits) -> Admission:
    core = VerifierCore(lm, ServerProfile(), 7, lm.vocab_size)
    base = dict(
        allowed_devices=None, max_sessions=8, max_sessions_per_identity=8, max_prompt_tokens=64, max_prefill_tokens=1000
    )
    return Admission(core, Limits(**{**base, **limits}))


def open_parts(device: int, prompt=PROMPT) -> list[bytes]:
    frame = protocol.Open(device=device, session=wire.SESSION, seq=0, prompt=list(prompt), seed=0, temperature=1.0)
    return list(wire.encode(wire.Open(frame, wire.OpenStamp(16, 0.01))))


def upload_parts(lm, device: int) -> list[bytes]:
    frame = protocol.Upload(
        device=device,
        session=wire.SESSION,
        seq=1,
        token_index=0,
        draft=1,
        draft_prob=0.5,
        piggyback=[],
        piggyback_probs=[],
        payload=codec.encode_payload([1, 2], [0.5, 0.25], lm.vocab_size),
    )
    return list(wire.encode(wire.Upload(frame, wire.UploadStamp(0.0, 0.01))))


def admit_open(a: Admission, identity: bytes, device: int, prompt=PROMPT) -> None:
    opens: list = []
    assert a.admit(identity, open_parts(device, prompt), 0, opens) is None and len(opens) == 1
    a.core.open(opens)


def refused(a: Admission, identity: bytes, parts, code: ErrorCode, match: str, extra: int = 0):
    with pytest.raises(protocol.ProtocolError, match=match) as err:
        a.admit(identity, parts, extra, [])
    assert err.value.code == code
    return err.value


def test_a_session_belongs_to_the_identity_that_opened_it(lm):
    a = admission(lm)
    admit_open(a, b"A", 7)
    assert a.owners == {7: b"A"} and a.identity_sessions == {b"A": 1} and a.identity_prefill == {b"A": 4}
    assert isinstance(a.admit(b"A", upload_parts(lm, 7), 0, []), wire.Upload)
    # Another client's upload for it, and an upload for a session never opened, get the same answer.
    refused(a, b"B", upload_parts(lm, 7), ErrorCode.UNKNOWN_SESSION, "device 7: no session of this client")
    refused(a, b"A", upload_parts(lm, 9), ErrorCode.UNKNOWN_SESSION, "device 9: no session of this client")
    refused(a, b"B", open_parts(7), ErrorCode.REFUSED, "already open")


def test_handover_reserves_the_devices_for_the_restarted_group(lm):
    a = admission(lm)
    admit_open(a, b"group-0.0", 0)
    a.core.reset([0])
    a.handover([0], b"group-0.1")
    refused(a, b"thief", open_parts(0), ErrorCode.REFUSED, "reserved for its restarted group")
    admit_open(a, b"group-0.1", 0)
    assert a.owners[0] == b"group-0.1" and 0 not in a.reserved


def test_restored_sessions_count_against_their_group(lm):
    a = admission(lm, max_sessions_per_identity=2)
    a.restored(1, 4, b"G")
    a.restored(2, 4, b"G")
    assert a.owners == {1: b"G", 2: b"G"} and a.identity_prefill == {b"G": 8}
    refused(a, b"G", open_parts(3), ErrorCode.LIMIT, "this client holds its limit of 2 sessions")


@pytest.mark.parametrize(
    "limits, device, prompt, match",
    [
        (dict(allowed_devices=frozenset({7, 8})), 9, PROMPT, "not a device of this run"),
        (dict(max_prompt_tokens=3), 7, PROMPT, "prompt of 4 tokens, the limit is 3"),
        (dict(max_prefill_tokens=6), 8, PROMPT, "would total 8 tokens, the limit is 6"),
        (dict(max_sessions=1), 8, PROMPT, "holds its limit of 1 sessions"),
    ],
)
def test_each_limit_refuses_an_open_and_says_which(lm, limits, device, prompt, match):
    a = admission(lm, **limits)
    if device == 8:  # the limit bites on the second OPEN
        admit_open(a, b"A", 7)
    before = dict(a.owners)
    err = refused(
        a, b"A", open_parts(device, prompt), ErrorCode.REFUSED if "device of" in match else ErrorCode.LIMIT, match
    )
    assert err.device == device and a.owners == before  # nothing admitted, nothing counted


def test_extra_parts_are_refused_and_unopened_devices_are_listed(lm):
    a = admission(lm)
    refused(a, b"A", open_parts(7), ErrorCode.BAD_FRAME, "message of 5 parts", extra=3)
    assert a.unopened() == []
    b = admission(lm, allowed_devices=frozenset({1, 2}))
    admit_open(b, b"A", 1)
    assert b.unopened() == [2]
