"""HumanEval pass@1 (testbed.accuracy): known answers, the sandboxed executor, and whole runs."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from agents.models import ByteTokenizer
from testbed import accuracy as A
from testbed.prompts import humaneval_problems


@pytest.fixture(scope="module")
def problems() -> tuple[dict, ...]:
    return humaneval_problems()


# ---------------------------------------------------------------------------- known answers


def test_canonical_solutions_pass_and_empty_completions_fail(problems) -> None:
    """All 164 canonical solutions score 100 %, the bare prompts 0 %, through the same executor."""
    assert len(problems) == 164
    programs = [A.check_program(p, p["canonical_solution"]) for p in problems]
    programs += [A.check_program(p, "") for p in problems]
    t0 = time.monotonic()
    results = A.run_programs(programs, timeout_s=10.0, progress=False)
    elapsed = time.monotonic() - t0
    canonical, empty = results[:164], results[164:]
    assert [r for r in canonical if r != A.PASSED] == []
    assert all(r.startswith("failed: ") for r in empty), [r for r in empty if not r.startswith("failed: ")]
    assert A.pass_stats(r == A.PASSED for r in canonical) == {"n": 164, "passed": 164, "pass_at_1": 1.0, "stderr": 0.0}
    assert A.pass_stats(r == A.PASSED for r in empty)["pass_at_1"] == 0.0
    assert elapsed < 45, f"328 programs took {elapsed:.1f} s"


# ---------------------------------------------------------------------------- completions


def test_completion_cut_at_eos_and_stop_sequences() -> None:
    tok = ByteTokenizer(512)
    body = "    return a + b\n"
    ids = tok.encode(body + "\ndef other():\n    pass\n")
    assert A.completion_text(ids, tok) == body
    assert A.completion_text(tok.encode(body) + [ByteTokenizer.EOS_ID] + tok.encode("    junk\n"), tok) == body
    assert A.completion_text([ByteTokenizer.EOS_ID] + tok.encode(body), tok) == ""
    assert A.completion_text([], tok) == ""
    for stop in A.STOP_SEQUENCES:
        assert A.completion_text(tok.encode(body + stop + " tail"), tok) == body, stop
    # Stops only match at column 0: indented statements of the body stay.
    nested = "    if a:\n        print(a)\n    # note\n    return a\n"
    assert A.completion_text(tok.encode(nested + "\nif __name__ == '__main__':\n    f()\n"), tok) == nested
    # The earliest stop wins, whichever it is in the list.
    assert A.cut_at_stop("x\nprint(1)\ndef f(): pass") == "x"
    assert A.cut_at_stop("x\n```\nmore") == "x"
    assert A.cut_at_stop("no stop here") == "no stop here"


def test_end_token_ids() -> None:
    assert A.end_token_ids(ByteTokenizer(300)) == {ByteTokenizer.EOS_ID}

    class HF:  # the subset of a Hugging Face tokenizer end_token_ids reads
        eos_token_id = 7
        unk_token_id = 0
        vocab = {"<|endoftext|>": 5, "<|im_end|>": 7}

        def convert_tokens_to_ids(self, t):
            return self.vocab.get(t, self.unk_token_id)

    assert A.end_token_ids(HF()) == {5, 7}

    class QwenLike(HF):  # unk is <|endoftext|> itself (Qwen2.5): an end token, the others still map to it
        unk_token_id = 5
        names = {5: "<|endoftext|>", 7: "<|im_end|>"}

        def convert_ids_to_tokens(self, i):
            return self.names[i]

    assert A.end_token_ids(QwenLike()) == {5, 7}


def test_end_token_ids_of_the_qwen_tokenizer_include_its_endoftext() -> None:
    """Regression: Qwen2.5's unk token is <|endoftext|>, so it was dropped as "unknown", and a completion
    went on past the end of text the model wrote (HumanEval/0 failed with a SyntaxError on it)."""
    from agents.models import ModelError, load_tokenizer

    try:
        tok = load_tokenizer("qwen2.5-coder:slm")
    except (ModelError, OSError) as e:
        pytest.skip(f"Qwen tokenizer not prepared: {e}")
    ends = A.end_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|endoftext|>") in ends and tok.eos_token_id in ends
    ids = tok.encode("    return x") + [tok.convert_tokens_to_ids("<|endoftext|>")] + tok.encode("# more\ndef g")
    assert A.completion_text(ids, tok) == "    return x"


# ---------------------------------------------------------------------------- the executor


def test_infinite_loop_times_out_without_hanging() -> None:
    t0 = time.monotonic()
    assert A.run_program("while True:\n    pass\n", timeout_s=1.0) == A.TIMED_OUT
    assert A.run_program("import time\ntime.sleep(60)\n", timeout_s=1.0) == A.TIMED_OUT
    assert time.monotonic() - t0 < 10


def test_writing_outside_the_work_dir_fails_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    for code in (
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
    ):
        r = A.run_program(code, timeout_s=5.0)
        assert r.startswith("failed: PermissionError"), r
    assert not target.exists()
    # Inside its own working directory a program may write (and reading anything is allowed).
    assert A.run_program("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n") == A.PASSED
    r = A.run_program(f"import os\nos.remove({str(tmp_path)!r})\n")
    assert r.startswith("failed: TypeError"), r  # os.remove disabled


def test_huge_allocation_fails_cleanly() -> None:
    r = A.run_program("x = bytearray(10 * 1024**3)\n", timeout_s=5.0)
    assert r == "failed: MemoryError", r


def test_other_failures_are_named() -> None:
    assert A.run_program("assert 1 == 2, 'nope'\n") == "failed: AssertionError: nope"
    assert A.run_program("def f(:\n").startswith("failed: SyntaxError")
    assert A.run_program("import os\nos._exit(0)\n").startswith("failed: exited with code 0")
    assert A.run_program("import sys\nsys.exit(0)\n") == "failed: SystemExit: 0"
    assert A.run_program("input()\n") == "failed: EOFError: EOF when reading a line"  # stdin closed
    assert A.run_program("import subprocess\nsubprocess.run(['true'])\n").startswith("failed: TypeError")
    assert A.run_program("print('noise ' * 1000)\nimport sys\nprint('x', file=sys.stderr)\n") == A.PASSED


# ---------------------------------------------------------------------------- statistics


def test_relative_and_agreement_statistics() -> None:
    r, se = A.relative(0.4, 0.05, 0.5, 0.04)
    assert r == pytest.approx(0.8)
    assert se == pytest.approx(math.sqrt((0.05 / 0.5) ** 2 + (0.4 * 0.04 / 0.25) ** 2))
    assert A.relative(0.4, 0.05, 0.0, 0.0) == (None, None)
    run = pd.DataFrame({"task_id": ["a", "b", "c", "c"], "passed": [True, False, True, False]})
    ref = pd.DataFrame({"task_id": ["a", "b", "c"], "passed": [True, True, True]})
    ag = A.agreement(run, ref)
    assert ag["n_prompts"] == 3
    assert ag["agreement"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert ag["both_passed"] == 1.5 and ag["only_reference_passed"] == 1.5 and ag["neither_passed"] == 0


# ---------------------------------------------------------------------------- whole runs


def _run(out: Path, **changes) -> Path:
    from testbed.run import RunOptions, run_scenario
    from testbed.scenario import load_scenario, override

    s = load_scenario("smoke")
    if changes:
        s = override(s, changes)
    run_scenario(s, RunOptions(out_dir=out, engine="local", progress=False, report=False))
    return out


@pytest.fixture(scope="module")
def humaneval_run(tmp_path_factory) -> Path:
    """The smoke scenario (8 tiny-model devices) on HumanEval problems 10..13: 2 devices per prompt."""
    return _run(tmp_path_factory.mktemp("acc") / "he", prompts={"source": "humaneval", "offset": 10, "count": 4})


def _with_completions(src: Path, dst: Path, completions: dict[int, str]) -> Path:
    """A copy of run src whose devices committed the given texts (byte tokens) instead."""
    from testbed.results import read_tokens, write_tokens

    shutil.copytree(src, dst)
    (dst / A.ACCURACY_FILE).unlink(missing_ok=True)
    df = read_tokens(src / "tokens.parquet")
    rows = []
    for dev, g in df.groupby("device", sort=True):
        first = g.iloc[0].to_dict()
        text = completions.get(int(dev))
        ids = g["token_id"].tolist() if text is None else list(text.encode()) + [ByteTokenizer.EOS_ID]
        rows += [{**first, "token_index": i, "token_id": t} for i, t in enumerate(ids)]
    write_tokens(pd.DataFrame(rows), dst / "tokens.parquet")
    return dst


def test_score_smoke_run_end_to_end(humaneval_run: Path, problems) -> None:
    before = json.loads((humaneval_run / "summary.json").read_text())
    res = A.score_run(humaneval_run, progress=False)
    summary = json.loads((humaneval_run / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "accuracy"} == {k: v for k, v in before.items() if k != "accuracy"}
    acc = summary["accuracy"]
    assert acc == json.loads(json.dumps(res.block))
    assert acc["n"] == 8 and acc["n_prompts"] == 4 and acc["prompts"] == "humaneval[10:14]"
    assert {t: v["n"] for t, v in acc["tiers"].items()} == {"phone": 6, "laptop": 2}
    assert {p: v["n"] for p, v in acc["policies"].items()} == {"cu-hlm": 6, "u-hlm": 2}
    assert sum(acc["results"].values()) == 8
    p = acc["pass_at_1"]
    assert acc["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 8))
    rows = A.read_accuracy(humaneval_run)
    assert list(rows.columns) == list(A.ROW_COLUMNS) and len(rows) == 8
    assert rows["task_id"].tolist() == [problems[10 + i % 4]["task_id"] for i in range(8)]
    assert (rows["n_tokens"] <= 16).all() and (rows["completion_chars"] == rows["completion"].str.len()).all()
    # Random tiny models write no working code: relative to itself is undefined (0 / 0), not an error.
    self_rel = A.score_run(humaneval_run, reference=humaneval_run, progress=False)
    assert self_rel.block["pass_at_1_relative"] is None or self_rel.block["pass_at_1_relative"] == 1.0
    assert self_rel.block["agreement"]["agreement"] == 1.0


def test_known_completions_and_relative_accuracy(humaneval_run: Path, problems, tmp_path: Path) -> None:
    """Devices that 'generated' the canonical solution pass; relative to itself is 1.0; against a
    reference where every device passes, relative = the run's own pass@1."""
    canon = {d: problems[10 + d % 4]["canonical_solution"] for d in range(8)}
    half = {d: (canon[d] if d < 4 else "    return None\n") for d in range(8)}
    good = _with_completions(humaneval_run, tmp_path / "good", canon)
    mixed = _with_completions(humaneval_run, tmp_path / "mixed", half)
    res = A.score_run(good, reference=good, progress=False, workers=2)
    assert res.pass_at_1 == 1.0 and res.stderr == 0.0
    assert res.relative == 1.0 and res.block["pass_at_1_relative_stderr"] == 0.0
    assert res.block["agreement"]["agreement"] == 1.0
    assert (A.read_accuracy(good)["completion"] == [canon[d] for d in range(8)]).all()
    res = A.score_run(mixed, reference=good, progress=False)  # good's score is reused (cached)
    b = json.loads((mixed / "summary.json").read_text())["accuracy"]
    assert b["pass_at_1"] == 0.5 and b["stderr"] == pytest.approx(math.sqrt(0.25 / 8))
    assert b["tiers"]["phone"]["passed"] == 4 and b["tiers"]["laptop"]["passed"] == 0
    assert b["pass_at_1_relative"] == 0.5 and b["pass_at_1_relative_stderr"] == pytest.approx(math.sqrt(0.25 / 8))
    assert b["reference"]["pass_at_1"] == 1.0 and b["reference"]["warnings"] == [
        "reference policies are cu-hlm, u-hlm, not llm-only"
    ]
    assert b["agreement"] == {
        "n_prompts": 4,
        "agreement": 0.5,
        "both_passed": 2,
        "only_run_passed": 0,
        "only_reference_passed": 2,
        "neither_passed": 0,
    }


def test_cli_accuracy(humaneval_run: Path) -> None:
    from typer.testing import CliRunner

    from testbed.cli import app

    r = CliRunner().invoke(app, ["accuracy", str(humaneval_run), "--json", "--workers", "2", "--timeout", "5"])
    assert r.exit_code == 0, r.output
    block = json.loads(r.stdout)
    assert block["n"] == 8 and block["timeout_s"] == 5.0
    r = CliRunner().invoke(app, ["accuracy", str(humaneval_run), "--reference", str(humaneval_run)])
    assert r.exit_code == 0, r.output
    assert "pass@1" in r.stdout and "per-prompt agreement" in r.stdout


def test_non_humaneval_run_and_mismatched_reference_error_clearly(humaneval_run: Path, tmp_path: Path) -> None:
    texts = _run(tmp_path / "texts")  # the plain smoke scenario: inline texts
    with pytest.raises(A.AccuracyError, match=r"texts.*HumanEval prompts.*'texts'"):
        A.score_run(texts, progress=False)
    assert "accuracy" not in json.loads((texts / "summary.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(humaneval_run, other)
    scen = (other / "scenario.yaml").read_text()
    assert "offset: 10" in scen
    (other / "scenario.yaml").write_text(scen.replace("offset: 10", "offset: 20"))
    mismatch = r"reference .*other.* has other prompts.*humaneval\[20:24\] vs humaneval\[10:14\]"
    with pytest.raises(A.AccuracyError, match=mismatch):
        A.score_run(humaneval_run, reference=other, progress=False)
    with pytest.raises(A.AccuracyError, match="tokens.parquet missing"):
        A.score_run(tmp_path, progress=False)


# ---------------------------------------------------------------------------- unbiased and paired statistics


def _table(passed: dict[str, list[bool]]) -> pd.DataFrame:
    return pd.DataFrame([{"task_id": t, "passed": p} for t, ps in passed.items() for p in ps])


def test_unbiased_pass_at_1_is_c_over_n_averaged_over_problems() -> None:
    rows = _table(
        {
            "a": [True, True, False, False, True],
            "b": [False] * 5,
            "c": [True] * 5,
            "d": [True, False, False, False, False],
        }
    )
    u = A.unbiased_pass(rows)
    per = [3 / 5, 0.0, 1.0, 1 / 5]
    assert u["pass_at_1"] == pytest.approx(sum(per) / 4)
    m = sum(per) / 4
    assert u["stderr"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in per) / 3 / 4))
    assert u["n_problems"] == 4 and u["samples_per_problem"] == [5, 5]
    assert set(u["pass_at_k"]) == {"1", "2", "5"}  # k = 10 needs 10 samples per problem
    # pass@k against its definition: the chance that k of the n samples, drawn without replacement,
    # hold at least one pass (brute force over every k-subset)
    from itertools import combinations

    for n, c in ((5, 3), (5, 0), (5, 5), (7, 2), (10, 1)):
        for k in range(1, n + 1):
            s = [True] * c + [False] * (n - c)
            subsets = list(combinations(range(n), k))
            brute = sum(any(s[i] for i in sub) for sub in subsets) / len(subsets)
            assert A.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert u["pass_at_k"]["5"] == pytest.approx(3 / 4)  # a problem passes at 5 of 5 iff any sample did
    with pytest.raises(ValueError, match="n=3, c=4"):
        A.pass_at_k(3, 4)
    # unequal samples: the average is over problems, not devices
    assert A.unbiased_pass(_table({"a": [True], "b": [False, False, False]}))["pass_at_1"] == 0.5


def test_mcnemar_exact_p_against_enumeration() -> None:
    """The two-sided exact p = the probability, over all 2^n equally likely sign patterns of the n
    discordant pairs, of a count at most as likely as the one observed."""
    from itertools import product

    for n in range(0, 13):
        counts = [sum(bits) for bits in product((0, 1), repeat=n)]
        prob = {k: counts.count(k) / 2**n for k in range(n + 1)}
        for b in range(n + 1):
            brute = sum(prob[k] for k in range(n + 1) if prob[k] <= prob[b] * (1 + 1e-12))
            assert A.binomial_two_sided_p(b, n - b) == pytest.approx(min(1.0, brute), abs=1e-12), (b, n - b)
    assert A.binomial_two_sided_p(0, 0) == 1.0
    assert A.binomial_two_sided_p(0, 6) == pytest.approx(2 / 64)


def test_paired_difference_hand_computed() -> None:
    # one sample per problem: 8 problems, run passes a b c d e, reference passes a b f g h? no: a, b, f
    run = _table({t: [t in "abcde"] for t in "abcdefgh"})
    ref = _table({t: [t in "abf"] for t in "abcdefgh"})
    pr = A.paired(run, ref)
    d = [0, 0, 1, 1, 1, -1, 0, 0]  # c, d, e only the run; f only the reference
    m = sum(d) / 8
    se = math.sqrt(sum((x - m) ** 2 for x in d) / 7 / 8)
    assert pr["diff"] == pytest.approx(2 / 8) and pr["stderr"] == pytest.approx(se)
    assert pr["discordant"] == [3, 1] and pr["test"] == "mcnemar-exact" and pr["n_problems"] == 8
    assert pr["mcnemar_p"] == pytest.approx(2 * (1 + 4) / 16)  # P(X <= 1 | n = 4) = 5/16, two-sided
    t7 = 2.364624251592785  # t(0.975, 7)
    assert pr["ci95"] == pytest.approx([m - t7 * se, m + t7 * se], rel=1e-6)
    assert not pr["distinguishable_95"]
    # several samples: per-problem rates, the sign test on their differences
    run = _table({"a": [True, True, False], "b": [False] * 3, "c": [True] * 3})
    ref = _table({"a": [True, False, False], "b": [True, False, False], "c": [True] * 3})
    pr = A.paired(run, ref)
    assert pr["diff"] == pytest.approx((1 / 3 - 1 / 3 + 0) / 3) and pr["test"] == "sign-test"
    assert pr["discordant"] == [1, 1] and pr["mcnemar_p"] == 1.0
    # a clear difference is distinguishable
    pr = A.paired(_table({str(i): [True] for i in range(10)}), _table({str(i): [False] for i in range(10)}))
    assert pr["diff"] == 1.0 and pr["stderr"] == 0.0 and pr["mcnemar_p"] == pytest.approx(2 / 1024)
    assert pr["distinguishable_95"]
    assert A.t_quantile(0.975, 7) == pytest.approx(t7, rel=1e-7)
    assert A.t_quantile(0.975, 10**6) == pytest.approx(1.959964, rel=1e-5)


@pytest.mark.parametrize("samples", [1, 5])
def test_paired_ci_is_calibrated(samples: int) -> None:
    """Monte Carlo: problems drawn from a population with correlated run / reference outcomes (a shared
    per-problem difficulty); the 95% interval covers the population's true difference ~95% of the time."""
    import numpy as np

    rng = np.random.default_rng(15 + samples)
    problems, reps = 30, 2000
    # per problem: difficulty z ~ N(0, 1); reference passes w.p. sigmoid(z), the run w.p. sigmoid(z - 0.4)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    zz = rng.standard_normal(2_000_000)
    true = float((sig(zz - 0.4) - sig(zz)).mean())
    covered, rejected = 0, 0
    for _ in range(reps):
        z = rng.standard_normal(problems)
        # a sample's two outcomes share their uniform 70% of the time (positively correlated pairs, both
        # kinds of discordant pair possible)
        u = rng.random((problems, samples))
        v = np.where(rng.random((problems, samples)) < 0.7, u, rng.random((problems, samples)))
        ref = u < sig(z)[:, None]
        run = v < sig(z - 0.4)[:, None]
        tid = np.repeat(np.arange(problems), samples).astype(str)
        pr = A.paired(
            pd.DataFrame({"task_id": tid, "passed": run.ravel()}), pd.DataFrame({"task_id": tid, "passed": ref.ravel()})
        )
        lo, hi = pr["ci95"]
        covered += lo <= true <= hi
        rejected += pr["distinguishable_95"]
    coverage = covered / reps  # Monte-Carlo s.e. ~0.005
    print(f"samples {samples}: coverage {coverage:.4f}, power {rejected / reps:.3f}, true diff {true:.4f}")
    assert 0.93 <= coverage <= 0.97, coverage
    assert rejected > 0  # the test has some power at this difference
