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
    for code in (f"open({str(target)!r}, 'w').write('x')\n",
                 f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
                 f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n"):
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
    from testbed.runner import RunOptions, run_scenario
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
        "reference policies are cu-hlm, u-hlm, not llm-only"]
    assert b["agreement"] == {"n_prompts": 4, "agreement": 0.5, "both_passed": 2, "only_run_passed": 0,
                              "only_reference_passed": 2, "neither_passed": 0}


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
