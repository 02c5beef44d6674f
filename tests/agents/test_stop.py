"""Generation that stops (agents.stop): the detector against the definition (the first committed token
at which an end id is committed or a stop sequence appears in the decoded completion), and the
engines: up to the stop the trace is the non-stopping run's, content and (isolated devices) timing,
the two passes of the virtual clock agree, a stopped device's session is closed on the verifier."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agents.device import DeviceSpec, RunParams
from agents.engine import run_local, run_virtual
from agents.lm import BatchedLM
from agents.models import ByteTokenizer, load_model
from agents.stop import StopRule
from agents.verifier import ServerProfile
from netem import DuplexProfile
from policies import load_policy

V = 512
CONTENT = ["token_id", "draft_id", "transmitted", "k", "accepted", "resampled", "beta", "uncertainty", "fidelity_tv"]
TIMING = ["t_draft_start", "t_upload_sent", "t_verdict", "t_commit"]


def reference_stop(ids, rule: StopRule, tokenizer, max_new: int) -> tuple[int, str]:
    """(index of the last token, reason) by the definition, decoding the whole prefix every time."""
    for i, t in enumerate(ids[:max_new]):
        if t in rule.eos_ids:
            return i, "eos"
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        if any(s in text for s in rule.stops):
            return i, "stop"
    return min(len(ids), max_new) - 1, "length"


def detect(ids, rule: StopRule, max_new: int) -> tuple[int, str]:
    d = rule.detector()
    for i, t in enumerate(ids[:max_new]):
        if r := d.push(t):
            return i, r
    return min(len(ids), max_new) - 1, "length"


def test_detector_matches_the_definition_on_multibyte_text():
    """Byte-level ids, where one character spans several tokens: random completions drawn from a
    text with 2-, 3- and 4-byte characters, stops that contain such characters too."""
    tok = ByteTokenizer(V)
    alphabet = "ab\n é€😀de#f"
    rng = np.random.default_rng(0)
    stops = ("\n#", "é€", "😀d", "\ndef")
    rule = StopRule(frozenset({tok.EOS_ID}), stops, tok)
    seen = {"eos": 0, "stop": 0, "length": 0}
    for _ in range(400):
        text = "".join(rng.choice(list(alphabet), 12))
        ids = tok.encode(text)
        if rng.random() < 0.2:  # a stray continuation byte or an eos somewhere
            ids.insert(int(rng.integers(len(ids))), int(rng.choice([0x80, 0xA9, tok.EOS_ID])))
        want = reference_stop(ids, rule, tok, 30)
        assert detect(ids, rule, 30) == want, (text, ids)
        seen[want[1]] += 1
    assert min(seen.values()) > 20, seen  # every reason was exercised


def test_detector_matches_the_definition_on_the_qwen_tokenizer():
    """The bundled pair's byte-level BPE (skipped where it is not prepared)."""
    from agents.models import ModelError, load_tokenizer

    try:
        tok = load_tokenizer("qwen2.5-coder:slm")
    except (ModelError, OSError) as e:
        pytest.skip(f"Qwen tokenizer not prepared: {e}")
    from testbed.accuracy import STOP_SEQUENCES, end_token_ids

    rule = StopRule(frozenset(end_token_ids(tok)), STOP_SEQUENCES, tok)
    rng = np.random.default_rng(1)
    pieces = [
        "    return",
        " x",
        "\n",
        "\n\n",
        "def",
        " f",
        "(",
        "):",
        "#",
        " é",
        "€",
        "😀",
        "if",
        "print",
        "```",
        "class",
    ]
    seen = set()
    for _ in range(150):
        ids = tok.encode("".join(rng.choice(pieces, 10)))
        ids = ids + [tok.eos_token_id] if rng.random() < 0.2 else ids
        want = reference_stop(ids, rule, tok, 40)
        assert detect(ids, rule, 40) == want
        seen.add(want[1])
    assert seen == {"eos", "stop", "length"}


def test_completion_for_scoring_is_the_same_whether_or_not_generation_stopped():
    from testbed.accuracy import STOP_SEQUENCES, completion_text

    tok = ByteTokenizer(V)
    rule = StopRule(frozenset({tok.EOS_ID}), STOP_SEQUENCES, tok)
    rng = np.random.default_rng(2)
    for _ in range(200):
        ids = tok.encode("".join(rng.choice(["  x = 1", "\n", "#", "def", "if", " ", "é"], 10)))
        last, _ = detect(ids, rule, len(ids))
        assert completion_text(ids[: last + 1], tok) == completion_text(ids, tok)


# ---------------------------------------------------------------------------- engines

POLICIES = ("cu-hlm", "slm-only", "llm-only", "u-hlm", "hlm", "rand-hlm")
N = 12
MAX_NEW = 24


@pytest.fixture(scope="module")
def fleet():
    """Isolated devices (the paper setting, as testbed.study.scenarios isolate_devices: every request is
    served on arrival by a zero-time server), so a device's timing depends on it alone."""
    link = DuplexProfile.from_dict(
        {
            "uplink": {"rate_mbps": 2.0, "delay_ms": 20.0, "jitter_ms": 3.0, "loss": 0.1},
            "downlink": {"rate_mbps": 20.0, "delay_ms": 10.0},
        }
    )
    rng = np.random.default_rng(3)
    specs = [
        DeviceSpec(
            i,
            "t",
            POLICIES[i % len(POLICIES)],
            10.0 + 5 * (i % 3),
            link,
            i % 4,
            tuple(rng.integers(0, 256, 3 + i % 3).tolist()),
        )
        for i in range(N)
    ]
    server = ServerProfile(
        verify_ms_base=0.0, verify_ms_per_token=0.0, verify_ms_per_sequence=0.0, max_batch=N, max_wait_ms=0.0
    )
    return specs, server


def _frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows).sort_values(["device", "token_index"]).reset_index(drop=True)


def _run(engine, specs, server, stop: StopRule, **kw):
    run = RunParams(seed=5, max_new_tokens=MAX_NEW, temperature=1.0, vocab_size=V, stop=stop)
    lms = BatchedLM(load_model("tiny:slm")), BatchedLM(load_model("tiny:llm"))
    return engine(specs, run, server, *lms, {p: load_policy(p) for p in POLICIES}, **kw)


@pytest.fixture(scope="module")
def unstopped(fleet):
    return _frame(_run(run_local, *fleet, StopRule()).rows)


def _stops_from(full: pd.DataFrame) -> StopRule:
    """A rule the run provably meets mid-run: an eos id = what an llm-only device (a verified token)
    commits at index 5, and a stop string = the text a slm-only device (skipped tokens) commits at
    indices 7-8 (a pair of ASCII bytes, so it is one piece of text)."""
    tok = ByteTokenizer(V)
    llm_only = full[(full.policy == "llm-only")]
    eos = int(llm_only[llm_only.token_index == 5].token_id.iloc[0])
    stop = None
    for _, g in full[full.policy == "slm-only"].groupby("device"):
        ids = g.token_id.tolist()
        for j in range(7, MAX_NEW - 1):
            text = tok.decode(ids[j : j + 2])
            if len(text) == 2 and text.isascii() and ids[j] != eos and ids[j + 1] != eos:
                stop = text
                break
        if stop:
            break
    assert stop is not None
    return StopRule(frozenset({eos}), (stop,), tok)


def test_a_stop_ends_the_trace_where_the_definition_says_and_nothing_before_it_changes(fleet, unstopped):
    specs, server = fleet
    rule = _stops_from(unstopped)
    tok = ByteTokenizer(V)
    seen: dict = {}
    result = _run(run_local, specs, server, rule, on_step=lambda g, v: seen.update(verifier=v))
    stopped = _frame(result.rows)
    reasons = {}
    for d, full in unstopped.groupby("device"):
        last, reason = reference_stop(full.token_id.tolist(), rule, tok, MAX_NEW)
        got = stopped[stopped.device == d].reset_index(drop=True)
        want = full.iloc[: last + 1].reset_index(drop=True)
        assert len(got) == last + 1, (d, reason)
        # content up to the stop, and timing too (isolated devices)
        pd.testing.assert_frame_equal(got[CONTENT + TIMING], want[CONTENT + TIMING], check_exact=True)
        assert got.stop_reason.tolist() == [""] * last + [reason]
        reasons[d] = (reason, bool(got.transmitted.iloc[-1]))
        if reason != "length":  # the verifier freed the session (the device's final flush)
            assert seen["verifier"].sessions[d].closed
    kinds = set(reasons.values())
    # every reason, a stop at a verified token and one at a skipped token
    assert {r for r, _ in kinds} == {"eos", "stop", "length"}, reasons
    assert ("eos", True) in kinds and any(r != "length" and not t for r, t in kinds), reasons
    assert len(stopped) < len(unstopped)


def test_the_virtual_clock_replays_the_stops_of_its_content_pass(fleet, unstopped):
    """Two passes (content, then the replay from the record) = one pass, every column, with stops;
    and with devices sharing a busy server (a stop frees the server for the others)."""
    specs, server = fleet
    rule = _stops_from(unstopped)
    for srv in (server, ServerProfile(max_batch=3, max_wait_ms=3.0)):
        one = _frame(_run(run_local, specs, srv, rule).rows)
        two = _frame(_run(run_virtual, specs, srv, rule).rows)
        pd.testing.assert_frame_equal(one, two, check_exact=True)
        assert (one.groupby("device").stop_reason.last() != "").all()
        assert len(one) < N * MAX_NEW
