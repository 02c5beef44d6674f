"""Fidelity (docs/design.md section 7): per committed token, the exact TV distance between the law it
was drawn from and the LLM's y at its position. Checked against an independent closed form
(device + verifier on a fake LLM whose y is known), against a Monte-Carlo of the verification
rule (the closed form is the right law), and through the whole engine on the tiny models.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from agents import codec, protocol, wire
from agents import device as device_mod
from agents.device import Device, DeviceSpec, RunParams
from agents.speculative import (
    hybrid_distribution,
    sample_from_uniforms,
    softmax_t,
    tv_distance,
    verified_fidelity,
    verify_from_uniforms,
)
from agents.verifier import ServerProfile, VerifierCore
from netem import DuplexProfile
from policies import load_policy
from policies.base import Decision

V = 8
LINK = DuplexProfile.from_dict(
    {"uplink": {"rate_mbps": 10.0, "delay_ms": 5.0}, "downlink": {"rate_mbps": 10.0, "delay_ms": 5.0}}
)


# --- an independent closed form -----------------------------------------------------------------
def _softmax(z, T: float) -> np.ndarray:
    e = np.exp((np.asarray(z, np.float64) - np.max(z)) / T)
    return e / e.sum()


def _x_hat(x: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The server's reconstruction of the top-k of x at `bits` bits, written out from docs/design.md
    steps 5-6 (not through the codec)."""
    top = np.argsort(-x, kind="stable")[:k]
    p = x[top]
    p = p.astype(np.float32).astype(np.float64) if bits == 32 else np.round(p * (2**bits - 1)) / (2**bits - 1)
    out = np.full(len(x), max(0.0, 1.0 - p.sum()) / (len(x) - k) if k < len(x) else 0.0)
    out[top] = p
    return out


def _hybrid_by_drafts(x, x_hat, y) -> np.ndarray:
    """P(v) = sum_d x_d [a_d 1{v = d} + (1 - a_d) r_v], one draft d at a time."""
    residual = np.maximum(y - x_hat, 0.0)
    r = residual / residual.sum() if residual.sum() > 0 else y / y.sum()
    P = np.zeros(len(x))
    for d in range(len(x)):
        a = min(1.0, y[d] / x_hat[d]) if x_hat[d] > 0 else float(y[d] > 0)
        P[d] += x[d] * a
        P += x[d] * (1.0 - a) * r
    return P


def _tv(p, q) -> float:
    return 0.5 * float(sum(abs(a - b) for a, b in zip(p, q)))


class FakeLLM:
    """An LLM whose logits at input position `pos` of a session are a fixed random row: the y of
    every generated token is known without running the verifier."""

    def __init__(self, seed: int):
        self.seed, self.vocab_size, self.lengths = seed, V, {}

    def logits_at(self, session: int, pos: int) -> np.ndarray:
        return (2.0 * np.random.default_rng([self.seed, session, pos]).standard_normal(V)).astype(np.float32)

    def length(self, session) -> int:
        return self.lengths.get(session, 0)

    def extend(self, items, all_positions: bool = False, logits: bool = True):
        out = []
        for session, tokens in items:
            n0 = self.lengths.get(session, 0)
            self.lengths[session] = n0 + len(tokens)
            rows = np.stack([self.logits_at(session, n0 + i) for i in range(len(tokens))])
            out.append(rows if all_positions else rows[-1])
        return out if logits else None

    def drop(self, session) -> None:
        self.lengths.pop(session, None)


def _open(prompt, T: float, max_new_tokens: int, lookahead_s: float) -> wire.Open:
    frame = protocol.Open(device=0, session=wire.SESSION, seq=0, prompt=prompt, seed=0, temperature=T)
    return wire.Open(frame, wire.OpenStamp(max_new_tokens, lookahead_s))


def _drive(plan: list[tuple[bool, int, int]], seed: int, T: float = 1.0, policy: str = "hlm"):
    """One device against a VerifierCore on FakeLLM: token j skipped (plan[j][0] False) or sent
    with k = plan[j][1] entries at plan[j][2] bits; SLM logits random. Returns (rows, x per token,
    y per token, the device)."""
    rng = np.random.default_rng(seed)
    prompt = (1, 2, 3)
    spec = DeviceSpec(0, "t", policy, 10.0, LINK, 0, prompt)
    run = RunParams(seed=seed, max_new_tokens=len(plan), temperature=T, vocab_size=V)
    dev = Device(spec, run, load_policy(policy))
    llm = FakeLLM(seed)
    verifier = VerifierCore(llm, ServerProfile(), seed, V)
    verifier.open([_open(prompt, T, len(plan), 0.01)])
    xs = []
    for transmit, k, bits in plan:
        z = (3.0 * rng.standard_normal(V)).astype(np.float32)
        xs.append(_softmax(z, T))
        ctx = dev.draft(z)
        up = dev.apply(Decision(transmit, 0.0, k, bits), ctx)
        if up is not None:
            assert verifier.submit(up) is None
            while (ready := verifier.next_batch()) is not None:
                for v in verifier.verify(*ready):
                    dev.on_verdict(v)
    if (up := dev.flush()) is not None:
        dev.on_verdict(verifier.submit(up))
    assert dev.finished and dev.held_bytes == 0
    ys = [_softmax(llm.logits_at(0, len(prompt) - 1 + j), T) for j in range(len(plan))]
    return sorted(dev.rows, key=lambda r: r["token_index"]), xs, ys, dev


@pytest.mark.parametrize("seed", range(6))
def test_branch_fidelity_of_a_decision_without_a_law_equals_the_closed_form(seed):
    """Decisions without a decision law (as a plug-in policy gives; here a forced plan): fidelity_tv
    stays NaN and the approximation fidelity_tv_branch holds the TV of the branch that happened.
    Random x (SLM logits), x_hat (top-k at 8, 16 or 32 bits) and y (the fake LLM): the value equals
    0.5 * sum |hybrid - y| computed independently for a verified token, 0.5 * sum |x - y| for a
    skipped one (piggybacked on an upload or in the final flush)."""
    rng = np.random.default_rng(100 + seed)
    plan = [(bool(rng.random() < 0.6), int(rng.integers(1, V + 1)), int(rng.choice([8, 16, 32]))) for _ in range(10)]
    plan[-1] = (False, 0, 8)  # the last token rides on the final flush
    for T in (1.0, 0.7):
        rows, xs, ys, _ = _drive(plan, seed, T)
        for (transmit, k, bits), row, x, y in zip(plan, rows, xs, ys):
            assert row["transmitted"] == transmit
            want = _tv(_hybrid_by_drafts(x, _x_hat(x, k, bits), y), y) if transmit else _tv(x, y)
            assert row["fidelity_tv_branch"] == pytest.approx(want, abs=1e-12), (row, k, bits)
            assert math.isnan(row["fidelity_tv"])
    # the full float32 distribution: the LLM's law up to float32 rounding of the upload
    rows, *_ = _drive([(True, V, 32)] * 4, seed)
    assert all(r["fidelity_tv_branch"] < 1e-6 for r in rows)


def test_llm_only_tokens_are_the_llms_law():
    spec = DeviceSpec(0, "t", "llm-only", 10.0, LINK, 0, (1, 2, 3))
    dev = Device(spec, RunParams(seed=1, max_new_tokens=3, temperature=1.0, vocab_size=V), load_policy("llm-only"))
    verifier = VerifierCore(FakeLLM(1), ServerProfile(), 1, V)
    verifier.open([_open((1, 2, 3), 1.0, 3, 0.0)])
    while not dev.generated_all:
        verifier.submit(dev.apply(dev.policy.decide(None, None), None))
        for v in verifier.verify(*verifier.next_batch()):
            assert v.stamp.llm_logits is None  # nothing to measure: the LLM sampled from y itself
            dev.on_verdict(v)
    assert [r["fidelity_tv"] for r in dev.rows] == [0.0, 0.0, 0.0]


def test_a_device_past_its_memory_budget_records_unknown(monkeypatch):
    """Held distributions are bounded (FIDELITY_HOLD_BYTES): tokens past it get NaN, the others
    their value, and everything held is freed when the verdict comes."""
    monkeypatch.setattr(device_mod, "FIDELITY_HOLD_BYTES", 2 * V * 4)  # two float32 rows of logits
    rows, xs, ys, dev = _drive([(False, 0, 8)] * 4 + [(True, V, 32)], seed=3)
    assert [r["fidelity_tv_branch"] == pytest.approx(_tv(x, y), abs=1e-12) for r, x, y in zip(rows[:2], xs, ys)] == [
        True
    ] * 2
    assert all(math.isnan(r["fidelity_tv_branch"]) for r in rows[2:])  # the draft too: budget still full then
    assert dev.held_bytes == 0


def test_the_closed_form_is_the_law_of_verified_tokens():
    """Monte-Carlo on V = 8: drafts d ~ x through the verification rule (verify's core, driven by
    uniforms) give tokens whose empirical law is hybrid(x, x_hat, y), not y; so the recorded
    TV(hybrid, y) is the fidelity of those tokens."""
    rng = np.random.default_rng(11)
    x, y = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
    x_hat = _x_hat(x, 2, 8)  # TV(hybrid, y) = 0.061 here, TV(x, y) = 0.73
    n = 400_000
    drafts = sample_from_uniforms(np.broadcast_to(x, (n, V)), rng.random(n))
    tokens, _ = verify_from_uniforms(
        drafts, np.broadcast_to(x_hat, (n, V)), np.broadcast_to(y, (n, V)), rng.random(n), rng.random(n)
    )
    empirical = np.bincount(tokens, minlength=V) / n
    hybrid = hybrid_distribution(x, x_hat, y)
    fidelity = verified_fidelity(x, x_hat, y)
    # E[TV(empirical, law)] ~ sum_v sqrt(p_v / (2 pi n)) ~ 1.5e-3 here
    assert tv_distance(empirical, hybrid) < 0.006
    assert fidelity > 0.05 and abs(tv_distance(empirical, y) - fidelity) < 0.006
    assert fidelity == pytest.approx(_tv(_hybrid_by_drafts(x, x_hat, y), y), abs=1e-12)


def test_verdict_logits_travel_in_the_stamp_and_only_there():
    z = np.random.default_rng(2).standard_normal((3, V)).astype(np.float32)
    frame = protocol.Verdict(
        device=4, session=1, seq=2, token_index=7, token=5, accepted=True, beta=0.125, shadow_betas=[0.25, 0.5]
    )  # float32 values: the decoded frame equals it
    parts = wire.encode(wire.Verdict(frame, wire.VerdictStamp(1.5, z)))
    plain = wire.encode(wire.Verdict(frame, wire.VerdictStamp(1.5)))
    assert parts[0] == plain[0] and len(plain[1]) == 8 and len(parts[1]) == 8 + 9 + z.nbytes  # the frame is unchanged
    back = wire.decode(parts)
    assert back.frame == frame and back.stamp.t_sent == 1.5 and np.array_equal(back.stamp.llm_logits, z)
    assert back.stamp.llm_logits.dtype == np.float32 and wire.decode(plain).stamp.llm_logits is None
    for bad in (parts[1][:-1], parts[1][:13], parts[1] + b"\0"):
        with pytest.raises(protocol.ProtocolError, match="VERDICT stamp"):
            wire.decode([parts[0], bad])
    up = wire.encode(_upload())
    with pytest.raises(protocol.ProtocolError, match="UPLOAD stamp"):
        wire.decode([up[0], up[1] + parts[1][8:]])


def _upload() -> wire.Upload:
    frame = protocol.Upload(
        device=0, session=1, seq=0, token_index=0, draft=1, draft_prob=0.5, payload=codec.encode_payload([1], [0.5], V)
    )
    return wire.Upload(frame, wire.UploadStamp(0.0, 0.1))


# --- the whole engine on the tiny models -------------------------------------------------------
def _run(tmp_path, phone: str, laptop: str):
    from testbed import results
    from testbed.run import RunOptions, plan, run_scenario
    from testbed.scenario import load_scenario, override

    s = override(
        load_scenario("smoke"),
        {"generation.max_new_tokens": 8, "tiers.phone.policy": phone, "tiers.laptop.policy": laptop},
    )
    out = tmp_path / f"{phone}-{laptop}"
    summary = run_scenario(s, RunOptions(out_dir=out, engine="local", progress=False, report=False))
    df = results.read_tokens(out / "tokens.parquet")
    return plan(s), df, summary


def test_engine_fidelity_on_the_tiny_models(tmp_path):
    """hlm: < 1e-6 on every verified token; llm-only: 0; a skipped (slm-only) token: TV(x, y)
    recomputed from the tiny models directly; cu-hlm: > 0 on average; summary.json agrees."""
    from agents.lm import BatchedLM
    from agents.models import load_model

    p, df, summary = _run(tmp_path, "slm-only", "hlm")
    hlm, slm_only = df[df.policy == "hlm"], df[df.policy == "slm-only"]
    assert len(hlm) and hlm.transmitted.all() and (hlm.fidelity_tv < 1e-6).all()
    assert len(slm_only) and not slm_only.transmitted.any() and slm_only.fidelity_tv.notna().all()
    T = p.run.temperature
    slm = BatchedLM(load_model(p.slm, dtype=p.slm_dtype))
    llm = BatchedLM(load_model(p.llm, dtype=p.llm_dtype))
    for device in slm_only.device.unique()[:2]:
        rows = slm_only[slm_only.device == device].sort_values("token_index")
        prompt = list(p.specs[device].prompt_ids)
        seq = prompt + rows.token_id.tolist()[:-1]
        zs = slm.extend([(("s", device), seq)], all_positions=True)[0][len(prompt) - 1 :]
        zl = llm.extend([(("l", device), seq)], all_positions=True)[0][len(prompt) - 1 :]
        want = tv_distance(softmax_t(zs, T), softmax_t(zl, T))
        np.testing.assert_allclose(rows.fidelity_tv.to_numpy(), want, rtol=0, atol=1e-5)
    assert summary["fidelity_tv_mean"] == pytest.approx(df.fidelity_tv.mean())
    assert summary["fidelity_tv_tokens"] == len(df) and summary["fidelity_tv_sequences"] == df.device.nunique()
    assert summary["fidelity_tv_sequence_mean"] == pytest.approx(df.groupby("device").fidelity_tv.sum().mean())
    assert summary["tiers"]["laptop"]["fidelity_tv_mean"] < 1e-6

    _, df, summary = _run(tmp_path, "cu-hlm", "llm-only")
    assert (df[df.policy == "llm-only"].fidelity_tv == 0.0).all()
    cu = df[df.policy == "cu-hlm"]
    assert (
        cu.fidelity_tv.notna().all() and cu.fidelity_tv.mean() > 0 and summary["tiers"]["phone"]["fidelity_tv_mean"] > 0
    )


def test_summary_and_metrics_of_fidelity():
    from testbed.metrics import Collector
    from testbed.results import TokenRecord, summarize

    values = {0: [0.1, 0.2, 0.3], 1: [0.0, math.nan, 0.5]}
    rows = [
        TokenRecord(
            device=d,
            tier="phone",
            policy="cu-hlm",
            prompt_index=0,
            token_index=i,
            token_id=1,
            draft_id=1,
            transmitted=True,
            t_draft_start=float(i),
            t_commit=i + 0.5,
            fidelity_tv=f,
        )
        for d, fs in values.items()
        for i, f in enumerate(fs)
    ]
    s = summarize(rows, emulated_seconds=3.0, wall_seconds=1.0, vocab_size=V, verifier_batches=[1])
    assert s["fidelity_tv_mean"] == pytest.approx(1.1 / 5) and s["fidelity_tv_tokens"] == 5
    assert s["fidelity_tv_sequence_mean"] == pytest.approx(0.6) and s["fidelity_tv_sequences"] == 1  # device 1 unknown
    c = Collector("fid")
    c.ingest_token_records(rows)
    labels = {"scenario": "fid", "tier": "phone", "policy": "cu-hlm"}
    assert c.registry.get_sample_value("hlm_fidelity_tv_sum", labels) == pytest.approx(1.1)
    assert c.registry.get_sample_value("hlm_fidelity_tv_count", labels) == 5
