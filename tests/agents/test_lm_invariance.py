"""Batch invariance of BatchedLM: a session's logits are bit-identical alone and in any batch.

Each check runs one target session through a prefill and a few decode/verify steps, once alone and
then inside batches of 2..32 random companions (other lengths, other new-token counts, sessions
joining late); every logit must match bit for bit. The same check runs on the tiny models in fp32
and bf16, in both matmul layouts, and on the real Qwen pair where it is prepared, at every torch
thread count the engines use: 1, 2 and what actors.threads "auto" resolves to here (testbed.run.plan:
the content pass computes at that count).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.lm import ROW_TILE, BatchedLM, tiled_linear
from agents.models import TinyConfig, load_model
from agents.models.hardware import resolve_threads

# Every count a run computes at: the wall clock's actors (1 by default), 2, and auto (the usable cores).
THREAD_COUNTS = sorted({1, 2, resolve_threads("auto")})


@pytest.fixture(params=THREAD_COUNTS, ids=lambda n: f"threads{n}")
def threads(request):
    """torch at `n` threads for the test, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    assert torch.get_num_threads() == request.param
    yield request.param
    torch.set_num_threads(saved)


def target_script(rng: np.random.Generator, vocab: int, prompt_len: int, steps: int) -> list[list[int]]:
    """The target's calls: a prompt, then decode steps of 1 token or verify steps of 1 + piggyback."""
    calls = [rng.integers(0, vocab, prompt_len).tolist()]
    for _ in range(steps):
        calls.append(rng.integers(0, vocab, int(rng.choice([1, 1, 3]))).tolist())
    return calls


def run_alone(lm_factory, calls) -> list[np.ndarray]:
    lm = lm_factory()
    return [lm.extend([("target", c)], all_positions=True)[0] for c in calls]


def run_crowded(lm_factory, calls, rng: np.random.Generator, batch: int, vocab: int, max_prompt: int):
    """The same calls, each inside a batch of `batch` sessions with random companions."""
    lm = lm_factory()
    out = []
    for call in calls:
        companions = []
        for c in range(batch - 1):
            sid = ("companion", c)
            n = int(rng.integers(1, max_prompt)) if lm.length(sid) == 0 or rng.random() < 0.2 else 1
            companions.append((sid, rng.integers(0, vocab, n).tolist()))
        items = companions + [("target", call)]
        order = rng.permutation(len(items))  # the target sits anywhere in the batch
        items = [items[i] for i in order]
        got = lm.extend(items, all_positions=True)
        out.append(got[[sid for sid, _ in items].index("target")])
    return out


def assert_invariant(
    lm_factory,
    vocab: int,
    batches=(2, 3, 8, 17, 32),
    prompt_len: int = 37,
    steps: int = 4,
    max_prompt: int = 60,
    seed: int = 0,
) -> None:
    rng = np.random.default_rng(seed)
    calls = target_script(rng, vocab, prompt_len, steps)
    alone = run_alone(lm_factory, calls)
    for batch in batches:
        crowded = run_crowded(lm_factory, calls, np.random.default_rng(seed + batch), batch, vocab, max_prompt)
        for step, (a, b) in enumerate(zip(alone, crowded)):
            diff = float(np.abs(a - b).max())
            assert np.array_equal(a, b), (
                f"batch {batch}, step {step} ({'prefill' if step == 0 else 'decode'}): max |diff| {diff:.3g}"
            )


TINY = TinyConfig(vocab_size=300, layers=2, hidden=64, heads=4, kv_heads=2, seed=3)
# Wide enough that MKL's fp32 GEMMs split their work by thread count (measured here: the logits at
# 1 and 2 threads differ in the last bits), so invariance is tested where threads change rounding.
WIDE = TinyConfig(vocab_size=512, layers=1, hidden=512, heads=4, kv_heads=2, intermediate=1024, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_is_batch_invariant(dtype, threads):
    model = load_model(TINY, dtype=dtype)
    assert_invariant(lambda: BatchedLM(model), TINY.vocab_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_model_is_batch_invariant(dtype, threads):
    model = load_model(WIDE, dtype=dtype)
    assert_invariant(lambda: BatchedLM(model), WIDE.vocab_size, batches=(2, 17), prompt_len=20, steps=2, max_prompt=30)


def _logits_at(model, n_threads: int) -> np.ndarray:
    """Prefill + 2 decode steps of 4 sessions at `n_threads`, no prefix cache (it would copy bits)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        lm = BatchedLM(model)
        lm.prefixes = None
        rng = np.random.default_rng(5)
        out = [lm.extend([(i, rng.integers(0, WIDE.vocab_size, 20).tolist()) for i in range(4)])]
        out += [lm.extend([(i, [int(t)]) for i in range(4)]) for t in (7, 11)]
        return np.stack(out)
    finally:
        torch.set_num_threads(saved)


def test_fp32_logits_depend_on_the_thread_count():
    """Why a scenario resolves actors.threads once and every engine computes its content at that
    count: in fp32 the bits change with it (MKL's sgemm). Each count alone is deterministic."""
    model = load_model(WIDE, dtype=torch.float32)
    one, two = _logits_at(model, 1), _logits_at(model, 2)
    assert np.array_equal(one, _logits_at(model, 1)) and np.array_equal(two, _logits_at(model, 2))
    if np.array_equal(one, two):
        pytest.skip("this CPU's fp32 GEMMs round alike at 1 and 2 threads")
    assert float(np.abs(one - two).max()) < 1e-3  # last bits only


@pytest.mark.parametrize("layout", [{"forward": "hf"}, {"matmul": "plain"}])
def test_invariance_test_can_fail(layout, threads):
    """The hf forward (left-padded slab) and one GEMM call over all rows are not batch invariant
    in fp32 (MKL's sgemm): the check must see it."""
    model = load_model(TINY)
    with pytest.raises(AssertionError, match="max"):
        assert_invariant(lambda: BatchedLM(model, **layout), TINY.vocab_size, batches=(2, 8, 32))


def test_packed_forward_matches_transformers():
    """The packed forward computes the model's own function (fp32, to float tolerance)."""
    model = load_model(TINY)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, TINY.vocab_size, 40).tolist()
    lm = BatchedLM(model, forward="packed")
    got = np.concatenate(
        [
            lm.extend([("s", ids[:30])], all_positions=True)[0],
            lm.extend([("s", ids[30:31])], all_positions=True)[0],
            lm.extend([("s", ids[31:])], all_positions=True)[0],
        ]
    )
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0].float().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_tiled_linear_rows_do_not_depend_on_row_count():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(70, 64, generator=gen)
    full = tiled_linear(x, w, b, ROW_TILE)
    for m in (1, 5, ROW_TILE, ROW_TILE + 1, 70):
        assert torch.equal(tiled_linear(x[:m], w, b, ROW_TILE), full[:m])
    torch.testing.assert_close(full, torch.nn.functional.linear(x, w, b))


def test_describe_records_the_layout():
    assert BatchedLM(load_model(TINY)).describe()["batch_invariant"] is True
    assert BatchedLM(load_model(TINY), matmul="plain").describe()["batch_invariant"] is False


@pytest.mark.real_models
@pytest.mark.slow
@pytest.mark.parametrize("role", ["slm", "llm"])
def test_real_qwen_pair_is_batch_invariant(real_models, role, threads):
    model = real_models.slm() if role == "slm" else real_models.llm()
    lm_factory = lambda: BatchedLM(model)  # noqa: E731
    assert lm_factory().forward == "packed"
    assert_invariant(lm_factory, 151_936, batches=(2, 8, 32), prompt_len=50, steps=3, max_prompt=40)


def test_compute_turns_serialise_forwards_and_keep_the_bits(tmp_path):
    """agents.lm.ComputeTurn: forwards hold the machine's cores in turns (a flock); a forward that
    finds them taken waits, and a forward's bits are the same with or without turns."""
    import fcntl
    import os
    import threading

    from agents.lm import ComputeTurn

    model = load_model(TINY)
    plain = BatchedLM(model)
    turned = BatchedLM(model)
    turned.turn = ComputeTurn(str(tmp_path / "turn.lock"))
    ids = list(range(1, 20))
    assert np.array_equal(plain.extend([("s", ids)]), turned.extend([("s", ids)]))
    assert turned.describe()["compute_turn"] == {"waits": 0}
    # another holder (another process's lock: a separate open file description) keeps the cores
    fd = os.open(tmp_path / "turn.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (turned.extend([("s", [5])]), done.set()))
    worker.start()
    assert not done.wait(0.5)  # the forward waits for its turn
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    worker.join(10)
    assert done.is_set() and turned.describe()["compute_turn"] == {"waits": 1}
