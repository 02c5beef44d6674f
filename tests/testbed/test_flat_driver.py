"""A driver that stays flat (issue 9 item 5): what the driver holds while it replays the virtual
clock and writes the results must not grow with tokens. Small and quick: a few tiny-model devices
at two token counts; the 10,000-device measurement is `testbed run fleet-10k`."""

from __future__ import annotations

import dataclasses
import math
import tracemalloc

import pandas as pd
import pytest

from agents.device import DeviceSpec, RunParams
from agents.engine import replay_content, run_content, run_local
from agents.events import MessageLost, ShadowResolved, TokenCommitted, UploadSent, VerdictReceived
from agents.lm import BatchedLM
from agents.models import load_model
from agents.record import PackedDrafted, PackedVerdicts
from agents.verifier import ServerProfile
from netem import DuplexProfile
from policies import load_policy
from testbed.results import ResultsWriter, TokenRecord, merge_shards, read_tokens, tokens_frame

V = 512
DEVICES = 12
# slm-only never uploads before its final flush: the writer spills its waiting rows (max_pending)
POLICIES = ("cu-hlm", "u-hlm", "hlm", "llm-only", "slm-only")
MAX_PENDING = 16  # below the 16-token run's waiting rows, so both runs spill


@pytest.fixture(scope="module")
def lms():
    return BatchedLM(load_model("tiny:slm")), BatchedLM(load_model("tiny:llm"))


def _fleet(tokens: int):
    link = DuplexProfile.from_dict(
        {
            "uplink": {"rate_mbps": 5.0, "delay_ms": 10.0, "jitter_ms": 2.0, "loss": 0.1},
            "downlink": {"rate_mbps": 20.0, "delay_ms": 10.0, "loss": 0.1},
        }
    )
    specs = [DeviceSpec(i, "t", POLICIES[i % len(POLICIES)], 10.0, link, 0, (5, 6, 7)) for i in range(DEVICES)]
    return specs, RunParams(seed=3, max_new_tokens=tokens, temperature=1.0, vocab_size=V)


def _policies():
    return {p: load_policy(p) for p in POLICIES}


def _content(lms, tokens: int):
    specs, params = _fleet(tokens)
    return specs, params, run_content(specs, params, ServerProfile(), *lms, _policies()).content


def _replay_peak(
    specs, params, content, tmp_path, history: bool, max_pending: int = MAX_PENDING
) -> tuple[int, ResultsWriter]:
    """Peak Python memory of the driver's share: the replay feeding a results writer (as testbed.run.ray_driver)."""
    writer = ResultsWriter(tmp_path, flush_rows=64, max_pending=max_pending)
    policies = _policies()
    tracemalloc.start()
    try:
        replay_content(specs, params, ServerProfile(), policies, content, on_events=writer.add, history=history)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, writer


def test_packed_content_rebuilds_every_item(lms):
    _, _, content = _content(lms, 12)
    packed = content.packed()
    for device, drafted in content.devices.items():
        assert isinstance(packed.devices[device], PackedDrafted)
        # repr: the same fields, NaN (llm-only's draft_prob, a missing fidelity) included
        assert [repr(c.recorded()) for c in drafted] == [repr(c) for c in packed.devices[device]]
    assert isinstance(packed.verdicts, PackedVerdicts) and len(packed.verdicts) == len(content.verdicts)
    assert sorted(packed.verdicts) == sorted(content.verdicts)
    assert all(repr(packed.verdicts[k]) == repr(v) for k, v in content.verdicts.items())
    with pytest.raises(KeyError):
        packed.verdicts[(0, 10**6)]


def test_replay_memory_does_not_grow_with_tokens(lms, tmp_path):
    """Without history (the runner's replay) the peak is the same at 16 and 64 tokens a device, up to
    what the verifier's batch records and the writer's pending rows hold; with history the rows alone
    (~1 kB each) make it grow. The traces are the same either way."""
    peaks, kept, frames = {}, {}, {}
    specs, params, content = _content(lms, 16)
    _replay_peak(specs, params, content.packed(), tmp_path / "warm", history=False)  # first-call allocations
    for tokens in (16, 64):
        specs, params, content = _content(lms, tokens)
        content = content.packed()
        peaks[tokens], writer = _replay_peak(specs, params, content, tmp_path / f"flat{tokens}", history=False)
        frames[tokens] = writer.merge(tmp_path / f"flat{tokens}.parquet")
        kept[tokens], writer = _replay_peak(specs, params, content, tmp_path / f"kept{tokens}", history=True)
        pd.testing.assert_frame_equal(writer.merge(tmp_path / f"kept{tokens}.parquet"), frames[tokens])
    extra_tokens = DEVICES * (64 - 16)
    grown, grown_kept = peaks[64] - peaks[16], kept[64] - kept[16]
    print(
        f"replay peak: {peaks[16] / 1024:.0f} -> {peaks[64] / 1024:.0f} KiB without rows "
        f"({grown / extra_tokens:.0f} B per extra token), {kept[16] / 1024:.0f} -> {kept[64] / 1024:.0f} KiB with"
    )
    assert grown_kept > 600 * extra_tokens  # the check can see rows being kept
    assert grown < 150 * extra_tokens  # ... and the runner's replay keeps none of them


def test_spilled_rows_are_patched_to_the_rows_kept_whole(lms, tmp_path):
    """Skipped rows spilled before their shadow betas and the final flush's link columns (slm-only's
    every row; lossy links, so retransmitted flushes) come out of the merge exactly as if the writer
    had held them whole."""
    specs, params, content = _content(lms, 40)
    content = content.packed()
    _, spilling = _replay_peak(specs, params, content, tmp_path / "spill", history=False)
    _, whole = _replay_peak(specs, params, content, tmp_path / "whole", history=False, max_pending=10**9)
    assert spilling.patches.table() is not None and whole.patches.table() is None
    assert len(spilling.patches.table()) >= 40 and not spilling.spilled  # every spilled row resolved
    assert len(spilling.pending) <= MAX_PENDING
    spilling.close(), whole.close()
    frame = spilling.frame()
    pd.testing.assert_frame_equal(frame, whole.frame())
    pd.testing.assert_frame_equal(spilling.merge(tmp_path / "spill.parquet"), whole.merge(tmp_path / "whole.parquet"))
    slm_only = frame[frame.policy == "slm-only"]
    assert slm_only.beta_is_shadow.all() and (slm_only.beta >= 0).all()
    assert (slm_only.groupby("device").flush_bytes.last() > 0).all()


def test_the_final_flush_patches_a_spilled_last_row(tmp_path):
    """The flush's link columns, event by event (upload copies, verdict copies, losses each way), then
    the shadow betas, on rows spilled at every add: as a writer holding them whole writes them."""

    def skipped(d, t):
        return dataclasses.asdict(
            TokenRecord(
                device=d,
                tier="t",
                policy="slm-only",
                prompt_index=0,
                token_index=t,
                token_id=t,
                transmitted=False,
                beta=math.nan,
                t_commit=0.01 * t,
            )
        )

    T = 5
    batches = [[TokenCommitted(skipped(d, t)) for d in range(3)] for t in range(T)]
    for d in range(3):  # device 2 loses nothing
        batches.append(
            [UploadSent(d, "t", "slm-only", T, 0, True, 700 + d, 1 + (d < 2), 0.5, (700 + d) * (1 + (d < 2)))]
        )
        if d < 2:
            batches.append(
                [
                    MessageLost(d, "t", "slm-only", T, 0, True, "uplink", 1),
                    MessageLost(d, "t", "slm-only", T, 0, True, "downlink", d),
                ]
            )
        batches.append([VerdictReceived(d, "t", "slm-only", T, 0, True, 40, 1 + d, 0.6)])
        batches.append([ShadowResolved(d, t, T, 0.1 * t + d, 0.01 * t if t % 2 else math.nan) for t in range(T)])
    frames = []
    for name, max_pending in (("spill", 0), ("whole", 10**9)):
        writer = ResultsWriter(tmp_path / name, flush_rows=4, max_pending=max_pending)
        for events in batches:
            writer.add(events)
        assert not writer.spilled and not writer.pending
        frames.append(writer.merge(tmp_path / f"{name}.parquet"))
    spilled, whole = frames
    pd.testing.assert_frame_equal(spilled, whole)
    last = whole[whole.token_index == T - 1].set_index("device")
    assert list(last.flush_bytes) == [1400, 1402, 702] and list(last.flush_retransmissions) == [1, 1, 0]
    assert list(last.downlink_bytes) == [40, 80, 120] and list(last.uplink_lost) == [1, 1, 0]
    assert list(last.downlink_lost) == [0, 1, 0]
    assert (whole[whole.token_index < T - 1].flush_bytes == 0).all() and whole.beta_is_shadow.all()
    assert whole.beta.tolist() == [0.1 * t + d for d in range(3) for t in range(T)]


def test_writer_buffers_a_bounded_number_of_rows(tmp_path):
    """The results writer holds at most flush_rows settled rows plus the skipped ones waiting for their
    shadow beta, however many tokens go through it; merging keeps one block of devices in memory."""
    writer = ResultsWriter(tmp_path / "shards", flush_rows=50, flush_s=math.inf)
    held = 0
    rows = []
    for t in range(40):
        for d in range(20):  # the replay's order: every device's token t, then t + 1
            row = dataclasses.asdict(
                TokenRecord(
                    device=d,
                    tier="t",
                    policy="hlm",
                    prompt_index=0,
                    token_index=t,
                    token_id=t,
                    transmitted=True,
                    t_commit=0.01 * t,
                )
            )
            rows.append(row)
            writer.add([TokenCommitted(row)])
            held = max(held, len(writer.settled) + len(writer.pending))
    writer.close()
    assert held <= 50 and writer.rows == 800 and len(writer.shards) == 16
    out = tmp_path / "tokens.parquet"
    assert merge_shards(writer.shards, out, block_rows=100) == 800  # 8 blocks of devices
    want = tokens_frame(rows).sort_values(["device", "token_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(read_tokens(out), want)


def test_a_stopped_device_flush_is_billed_to_its_last_row(tmp_path):
    """A sequence that stops at a verified token flushes (empty) to close its session: the writer holds
    that row for the flush's link columns, spilled or not, and writes what the device's own rows say."""
    from agents.stop import StopRule

    def fresh():  # new sessions: a BatchedLM keeps each device's cache from a previous run
        return BatchedLM(load_model("tiny:slm")), BatchedLM(load_model("tiny:llm"))

    specs, params = _fleet(24)
    full = pd.DataFrame(run_local(specs, params, ServerProfile(), *fresh(), _policies()).rows)
    by = full.set_index(["policy", "device", "token_index"]).token_id
    eos = {int(by[("llm-only", 3, 4)]), int(by[("slm-only", 4, 9)])}
    params = dataclasses.replace(params, stop=StopRule(frozenset(eos)))
    rows = tokens_frame(run_local(specs, params, ServerProfile(), *fresh(), _policies()).rows)
    rows = rows.sort_values(["device", "token_index"]).reset_index(drop=True)
    content = run_content(specs, params, ServerProfile(), *fresh(), _policies()).content.packed()
    last = rows.groupby("device").tail(1)
    stopped = last[last.stop_reason == "eos"]
    assert stopped.transmitted.any() and (~stopped.transmitted).any() and (last.stop_reason == "length").any()
    assert (stopped.flush_bytes > 0).all()  # every stopped device flushed, with or without skipped tokens
    for max_pending in (0, 10**9):
        _, writer = _replay_peak(
            specs, params, content, tmp_path / f"w{max_pending}", history=False, max_pending=max_pending
        )
        merged = writer.merge(tmp_path / f"w{max_pending}.parquet")
        assert not writer.spilled
        pd.testing.assert_frame_equal(merged, rows, check_exact=True)
