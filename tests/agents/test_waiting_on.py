"""VerifierCore.waiting_on: in the virtual clock, the sessions that hold the next batch back (what
the runner's stall message names, testbed.run.failures.stall_message)."""

from __future__ import annotations

import math

from test_hostile import lm, open_msg, step_upload  # noqa: F401

from agents.verifier import ServerProfile, VerifierCore


def test_waiting_on_names_the_idle_session_that_holds_the_batch_back(lm):  # noqa: F811 - the fixture
    core = VerifierCore(lm, ServerProfile(), 7, lm.vocab_size, expected_sessions=2)
    try:
        core.open([open_msg(0, [3, 4, 5], 10), open_msg(1, [3, 4, 6], 10)])
        core.submit(step_upload(lm, 0, 0))  # arrives at 0.01 s; device 1 could still arrive earlier
        assert core.next_batch() is None
        w = core.waiting_on()
        assert w == {"idle": {1: 0.01}, "timed": True, "queued": [0], "blocking": [1]}
        core.submit(step_upload(lm, 1, 0, t_arrive=0.011))  # now nothing earlier can come
        start, batch = core.next_batch()
        assert [u.frame.device for u, _ in batch] == [0, 1]
        verdicts = core.verify(start, batch)
        assert core.waiting_on()["blocking"] == [] and set(core.waiting_on()["idle"]) == {0, 1}
        assert all(math.isfinite(b) for b in core.waiting_on()["idle"].values()) and len(verdicts) == 2
    finally:
        for sid in lm.sessions():
            lm.drop(sid)
