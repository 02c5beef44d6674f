"""Recovery of dead actors by deterministic replay (docs/design.md section 9), for the Ray driver.

- A dead group: a new incarnation for the same devices re-executes them from their prompts, after
  the verifier has forgotten their sessions and reserved them for it (Verifier.handover); events of
  the steps the driver already drained are not emitted again (DeviceGroup.run skip_steps).
- A dead verifier: every group detaches and hands over its devices' committed sessions, a new
  verifier re-opens them and re-feeds its LLM caches in the original calls (Verifier.restore), the
  groups reattach and resend what is unanswered.

An actor that dies during a recovery (a new incarnation at once, the verifier during a handover or
a restore) is restarted in turn, all within actors.max_restarts over the run (Restarts). In the
virtual clock the trace is then the fault-free run's: what a device emits depends only on its own
verdicts, and each verdict only on the device's context.
"""

from __future__ import annotations

import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.run.failures import RunFailed, cause, id_ranges

if TYPE_CHECKING:
    from testbed.run.ray_driver import RayDriver


@dataclass
class Restarts:
    """Actor restarts of one run, bounded by actors.max_restarts over all actors (summary.json
    "restarts", Prometheus hlm_actor_restarts_total)."""

    limit: int
    out_dir: Path
    verifier: int = 0
    groups: dict = field(default_factory=dict)  # group id -> restarts
    events: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.verifier + sum(self.groups.values())

    def allow(self, actor: str, devices, why: str, tokens: int, t0: float) -> None:
        """Count one restart of `actor`, or raise RunFailed past the bound."""
        if self.total >= self.limit:
            raise RunFailed(
                f"The {actor} (hosting devices {id_ranges(devices)}) died: {why}. The run has already restarted "
                f"actors {self.total} time{'s' * (self.total != 1)}, the limit set by actors.max_restarts is "
                f"{self.limit}, so it stops here after {tokens} committed tokens; the partial results are in "
                f"{self.out_dir}."
            )
        self.events.append(
            {
                "actor": actor,
                "devices": sorted(devices),
                "cause": why,
                "tokens_committed": tokens,
                "wall_s": round(time.time() - t0, 3),
            }
        )
        print(
            f"[{time.time() - t0:6.0f}s] {actor} died ({why}); restarting it (restart {self.total + 1} of at most "
            f"{self.limit})",
            file=sys.stderr,
            flush=True,
        )

    def summary(self) -> dict:
        return {
            "total": self.total,
            "limit": self.limit,
            "verifier": self.verifier,
            "groups": {str(g): n for g, n in sorted(self.groups.items())},
            "events": self.events,
        }


class Lost(Exception):
    """An actor died during a recovery call: `who` is "verifier" or a group id."""

    def __init__(self, who, exc: BaseException):
        super().__init__(who)
        self.who, self.exc = who, exc


def recover(d: RayDriver, verifier_exc: BaseException | None, dead: dict[int, BaseException]) -> None:
    """Restart the dead verifier (first) and the dead groups, until every actor is running again.
    An actor that dies during a recovery call (a handover, a restore) is restarted in turn, all
    within actors.max_restarts (Restarts.allow raises RunFailed past it)."""
    t = time.perf_counter()
    first = len(d.restarts.events)
    spawn = dict(dead)  # group -> why: needs a new incarnation
    waiting: set[int] = set()  # new incarnations waiting for their handover
    while verifier_exc is not None or spawn or waiting:
        try:
            if verifier_exc is not None:
                exc, verifier_exc = verifier_exc, None
                for i, died in restart_verifier(d, exc, set(spawn) | waiting).items():
                    spawn.setdefault(i, died)
            elif spawn:
                i = min(spawn)
                respawn_group(d, i, spawn.pop(i))
                waiting.add(i)
            else:
                i = min(waiting)
                start_group(d, i)
                waiting.discard(i)
        except Lost as lost:
            if lost.who == "verifier":
                verifier_exc = lost.exc
            else:
                waiting.discard(lost.who)
                spawn[lost.who] = lost.exc
    for e in d.restarts.events[first:]:
        e["recovery_s"] = round(time.perf_counter() - t, 3)  # to every actor running again


def _count(d: RayDriver, actor: str, devices, exc: BaseException) -> None:
    d.restarts.allow(actor, devices, cause(exc), d.sinks.tokens, d.sinks.t0)


def respawn_group(d: RayDriver, i: int, exc: BaseException) -> None:
    """Count a restart of group i and make its new incarnation (not running yet). Lost(i) if the new
    incarnation dies at once."""
    from ray.exceptions import RayActorError

    _count(d, f"device group {i}", d.members[i], exc)
    d.restarts.groups[i] = d.restarts.groups.get(i, 0) + 1
    d.sinks.restart("group")
    d.sinks.partial["restarts"] = d.restarts.summary()
    for ref in [r for r, j in d.refs.items() if j == i]:  # the dead incarnation's run() (seen via drain)
        del d.refs[ref]
    d.finished.pop(i, None)  # wall clock: a group that died before its last drain runs again
    d.groups[i] = d.make_group(i, d.restarts.groups[i])
    d.in_recovery(f"group:{i}", d.groups[i])
    try:
        d.identities[i] = d.ray.get(d.groups[i].identity.remote())
    except RayActorError as died:
        raise Lost(i, died) from None


def start_group(d: RayDriver, i: int) -> None:
    """Hand group i's devices over to its new incarnation on the verifier and run it. Lost("verifier")
    if the verifier dies meanwhile (the group then waits for the next verifier's handover)."""
    from ray.exceptions import RayActorError

    d.in_recovery("verifier", d.verifier)
    try:
        d.ray.get(d.verifier.handover.remote(d.members[i], d.identities[i]))
    except RayActorError as died:
        raise Lost("verifier", died) from None
    d.launch(i, skip_steps={dev: d.steps[dev] for dev in d.members[i]})


def restart_verifier(d: RayDriver, exc: BaseException, skip) -> dict[int, BaseException]:
    """A new verifier rebuilt from the committed sessions of every group but those in `skip` (dead,
    or a new incarnation waiting for its handover); the groups found dead meanwhile are returned
    (restarted next, against the new verifier). Lost("verifier") if the new one dies too: the groups
    stay detached, and the next try detaches them again (idempotent)."""
    from ray.exceptions import RayActorError

    _count(d, "verifier", [s.device for s in d.p.specs], exc)
    d.restarts.verifier += 1
    d.sinks.restart("verifier")
    d.sinks.partial["restarts"] = d.restarts.summary()
    d.errors.verifier_died()
    states, owners, dead = [], {}, {}
    detached = {i: d.groups[i].detach.remote() for i in d.groups if i not in d.finished and i not in skip}
    for i in d.groups:
        if i in skip:
            continue
        try:
            got = pickle.loads(d.finished[i]["sessions"]) if i in d.finished else d.ray.get(detached[i])
        except RayActorError as died:
            dead[i] = died
            continue
        states.extend(got)
        owners.update({st.open.frame.device: d.identities[i] for st in got})
    v = d.make_verifier()
    d.in_recovery("verifier", v)
    try:
        d.ray.get(v.restore.remote(states, owners))
        endpoint = d.start_verifier(v)
        d.ray.get(v.set_t0.remote(d.t0))
    except RayActorError as died:
        raise Lost("verifier", died) from None
    d.verifier, d.endpoint = v, endpoint
    for i in detached:
        if i not in dead:
            d.groups[i].reattach.remote(endpoint)
    return dead
