"""The prompt prefix cache of BatchedLM (agents/lm.py PrefixCache): a prefill served from the cache,
or copied from another session of the same call, is bit for bit the prefill computed alone, and the
decode steps after it are too; the cache is bounded, keyed by thread count, and can be turned off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import lm as lm_mod
from agents.lm import BatchedLM
from agents.models import TinyConfig, load_model

TINY = TinyConfig(vocab_size=300, layers=2, hidden=64, heads=4, kv_heads=2, seed=5)


@pytest.fixture
def model():
    return load_model(TINY, dtype=torch.float32)


def script(rng, n_prompt=23, steps=3):
    return rng.integers(0, TINY.vocab_size, n_prompt).tolist(), [[int(t)] for t in rng.integers(0, 300, steps)]


def run(lm, sid, prompt, steps, companions=()):
    """Prefill `sid` (with companions prefilled in the same call), then decode `steps`; logits per call."""
    out = [lm.extend([*companions, (sid, prompt)])[-1]]
    for s in steps:
        out.append(lm.extend([(sid, s)])[0])
    return out


def kv(lm, sid):
    s = lm._sessions[sid]
    return s.keys[:, :, : s.length].clone(), s.values[:, :, : s.length].clone()


def test_cached_and_shared_prefills_equal_the_computed_one(model, monkeypatch):
    rng = np.random.default_rng(0)
    prompt, steps = script(rng)
    monkeypatch.setenv("HLM_PREFIX_CACHE_MB", "0")
    plain = BatchedLM(model)
    assert plain.prefixes is None
    want = run(plain, "a", prompt, steps)
    want_kv = kv(plain, "a")
    monkeypatch.setenv("HLM_PREFIX_CACHE_MB", "64")
    first = BatchedLM(model)
    assert first.prefixes is not None
    got = run(first, "a", prompt, steps)  # computed, and stored
    again = BatchedLM(model)  # another runner over the same model (a later run of a study)
    assert again.prefixes is first.prefixes
    hits = again.prefixes.hits
    got2 = run(again, "b", prompt, steps)  # served from the cache
    assert again.prefixes.hits == hits + 1
    other = rng.integers(0, 300, 11).tolist()
    lm_mod._PREFIX_CACHES.pop(model)  # a fresh cache: two sessions of one call with the same prompt
    shared = BatchedLM(model)
    out = shared.extend([("x", prompt), ("y", other), ("z", prompt)])
    assert np.array_equal(out[0], out[2]) and np.array_equal(out[0], want[0])
    for logits in (got, got2):
        for a, b in zip(want, logits):
            assert np.array_equal(a, b)
    for sid in ("x", "z"):
        k, v = kv(shared, sid)
        assert torch.equal(k, want_kv[0][:, :, : len(prompt)]) and torch.equal(v, want_kv[1][:, :, : len(prompt)])
    for s in steps:  # decoding on from a copied prefill: still the same bits
        assert np.array_equal(shared.extend([("z", s)])[0], shared.extend([("x", s)])[0])


def test_a_session_that_is_not_new_is_never_served_from_the_cache(model, monkeypatch):
    monkeypatch.setenv("HLM_PREFIX_CACHE_MB", "64")
    lm_mod._PREFIX_CACHES.pop(model, None)
    lm = BatchedLM(model)
    lm.extend([("a", [1, 2, 3])])
    hits = lm.prefixes.hits
    lm.extend([("b", [9]), ("b2", [9])])  # new sessions: b2 copies b's prefill
    lm.extend([("a", [1, 2, 3])])  # a continues: [1, 2, 3, 1, 2, 3], not a prompt
    assert lm.length("a") == 6 and lm.prefixes.hits == hits
    assert BatchedLM(model, forward="hf").prefixes is None  # not batch invariant: never cached
    assert BatchedLM(model, matmul="plain").prefixes is None


def test_the_cache_is_bounded_and_keyed_by_thread_count(model, monkeypatch):
    monkeypatch.setenv("HLM_PREFIX_CACHE_MB", "0.01")  # ~10 KB: a few short prompts
    lm_mod._PREFIX_CACHES.pop(model, None)
    lm = BatchedLM(model)
    for i in range(20):
        lm.extend([(i, [i, i + 1, i + 2, i + 3])])
    cache = lm.prefixes
    assert 0 < cache.bytes <= cache.max_bytes and len(cache.entries) < 20
    assert (torch.get_num_threads(), 19, 20, 21, 22) in cache.entries  # the most recent stays
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        hits = cache.hits
        lm.extend([("t", [19, 20, 21, 22])])
        assert cache.hits == hits  # another thread count: computed again, not served
    finally:
        torch.set_num_threads(threads)
