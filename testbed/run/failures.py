"""How a run that cannot go on says so: one paragraph naming what failed, where, and where the
partial results are (RunFailed), for a dead actor past the restart limit and for a stall."""

from __future__ import annotations

import math
from pathlib import Path


class RunFailed(RuntimeError):
    """The run cannot go on: an actor died after actors.max_restarts restarts, or nothing moved for
    actors.stall_timeout_s. One paragraph naming the actor or the devices waited for, the device ids
    and the cause; the partial results are kept."""


def id_ranges(ids) -> str:
    """Device ids as ranges: 0-3, 8, 10-11."""
    ids, out = sorted(ids), []
    for i in ids:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def stall_message(waiting: dict, timeout_s: float, running: dict[int, list[int]], tokens: int, out_dir: Path) -> str:
    """One paragraph: which groups still run and whom the verifier waits for (Verifier.waiting_on)."""
    group_of = {d: i for i, ds in running.items() for d in ds}

    def where(devices) -> str:
        groups = sorted({group_of[d] for d in devices if d in group_of})
        on = f" (group{'s' * (len(groups) > 1)} {', '.join(map(str, groups))})" if groups else ""
        return f"{id_ranges(devices)}{on}"

    parts = [
        f"The emulation stalled: nothing moved for {timeout_s:g} s (no new token, no verifier batch or forward; "
        f"actors.stall_timeout_s), after {tokens} committed tokens."
    ]
    if running:
        parts.append(
            f"Groups still running: {', '.join(f'{i} (devices {id_ranges(ds)})' for i, ds in sorted(running.items()))}."
        )
    if "error" in waiting:
        parts.append(f"The verifier could not say whom it waits for ({waiting['error']}).")
    else:
        idle = waiting.get("idle", {})
        # Sessions whose bound is inf have had their last verdict: they hold nothing back.
        hold = waiting.get("blocking") or sorted(d for d, t in idle.items() if math.isfinite(t))
        if hold:
            times = [f"{d} at t >= {idle[d]:.3f} s emulated" for d in hold[:8]] if waiting.get("timed") else []
            parts.append(
                f"The verifier is waiting for uploads from devices {where(hold)}, sessions open with nothing "
                f"queued" + (f" ({'; '.join(times)}{'; ...' if len(hold) > 8 else ''})" if times else "") + "."
            )
        if waiting.get("unopened"):
            parts.append(f"Devices that never opened a session: {where(waiting['unopened'])}.")
        if waiting.get("queued"):
            parts.append(f"Devices {id_ranges(waiting['queued'])} have uploads queued behind them.")
    parts.append(f"The partial results are in {out_dir}.")
    return " ".join(parts)


def cause(exc: BaseException) -> str:
    """A Ray actor death in one line (Ray's message spans many, with advice around the exit detail)."""
    text = " ".join(str(exc).split())
    if "exit detail:" in text:
        text = text.split("exit detail:", 1)[1]
        for advice in (" Some common causes", " There are some potential"):
            text = text.split(advice, 1)[0]
    return f"{type(exc).__name__}: {text.strip()[:300]}"
