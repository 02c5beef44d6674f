"""The event stream (agents.events): every row of the trace is rebuilt from the events alone, each
token is committed once, each step's events come once, and the content pass carries no link events."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest

from agents.device import DeviceSpec, RunParams
from agents.engine import run_virtual
from agents.events import MessageLost, ShadowResolved, TokenCommitted, UploadSent, VerdictReceived, VerifierBatch
from agents.lm import BatchedLM
from agents.models import load_model
from agents.verifier import ServerProfile
from netem import DuplexProfile
from policies import load_policy
from testbed.results import ResultsWriter, tokens_frame

V = 512


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    link = DuplexProfile.from_dict(
        {
            "uplink": {"rate_mbps": 5.0, "delay_ms": 10.0, "loss": 0.25},
            "downlink": {"rate_mbps": 20.0, "delay_ms": 10.0, "loss": 0.25},
        }
    )
    specs = [DeviceSpec(i, "t", pol, 10.0, link, 0, (5, 6, 7)) for i, pol in enumerate(["cu-hlm"] * 3 + ["slm-only"])]
    params = RunParams(seed=3, max_new_tokens=10, temperature=1.0, vocab_size=V)
    content, timed = [], []
    result = run_virtual(
        specs,
        params,
        ServerProfile(),
        BatchedLM(load_model("tiny:slm")),
        BatchedLM(load_model("tiny:llm")),
        {p: load_policy(p) for p in ("cu-hlm", "slm-only")},
        on_content_events=content.extend,
        on_events=timed.extend,
    )
    writer = ResultsWriter(tmp_path_factory.mktemp("shards"), flush_rows=7)
    writer.add(timed)
    writer.close()
    return result, content, timed, writer.frame()


def test_rows_rebuilt_from_events_equal_the_trace(run):
    result, _, _, df = run
    want = tokens_frame(result.rows).sort_values(["device", "token_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(df, want, check_exact=True)


def test_each_token_and_each_upload_once(run):
    result, content, timed, _ = run
    for events in (content, timed):
        tokens = Counter((e.device, e.step) for e in events if isinstance(e, TokenCommitted))
        assert len(tokens) == len(result.rows) and set(tokens.values()) == {1}
        shadows = Counter((e.device, e.token_index) for e in events if isinstance(e, ShadowResolved))
        assert set(shadows.values()) == {1}
    uploads = Counter((e.device, e.seq) for e in timed if isinstance(e, UploadSent))
    verdicts = Counter((e.device, e.seq) for e in timed if isinstance(e, VerdictReceived))
    assert uploads == verdicts and set(uploads.values()) == {1}
    # per device, steps never go back: a restarted group can skip the steps already delivered
    for d in {e.device for e in timed if hasattr(e, "device")}:
        steps = [e.step for e in timed if not isinstance(e, VerifierBatch) and e.device == d]
        assert steps == sorted(steps)


def test_links_come_from_the_timed_pass_only(run):
    result, content, timed, df = run
    assert not [e for e in content if isinstance(e, (UploadSent, VerdictReceived, MessageLost, VerifierBatch))]
    lost = sum(e.count for e in timed if isinstance(e, MessageLost))
    assert lost == (df["uplink_lost"] + df["downlink_lost"]).sum() > 0
    # every verified request was in a batch (a flush of slm-only drafts may be answered without one)
    batched = sum(e.size for e in timed if isinstance(e, VerifierBatch))
    assert 0 < batched <= len([e for e in timed if isinstance(e, UploadSent)])
    assert (df.loc[df["flush_bytes"] > 0, "policy"] == "slm-only").any()  # the slm-only device's final flush
