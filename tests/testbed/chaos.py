"""Fault injection for tests: a Ray driver and actors that kill -9 themselves, hang or dawdle on
purpose, at the points the production classes leave for it (testbed.run.ray_driver.RayDriver's
in_recovery / after_poll / before_results; DeviceGroup._opened / _received / _drained;
Verifier._received). Production types know nothing of it:

    run_scenario(s, RunOptions(out_dir=..., driver=chaos_driver(Chaos(kill=(("group:1", 40),)))))

Ray ships these classes to its workers by value (the tests folder is not importable there).
"""

from __future__ import annotations

import functools
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass

import ray

from agents.actors import DeviceGroup, Verifier
from agents.events import TokenCommitted
from testbed.run.ray_driver import RayDriver

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Chaos:
    """What goes wrong, and when.

    kill: (actor, tokens) pairs: kill -9 the actor once that many tokens are committed: "verifier" by
      the driver, once it has drained that many of the run's; "group:<id>" by the group itself, at
      that many of its own devices' (so always mid-run, however busy the driver). Each fires once, on
      the first incarnation. A "verifier" kill at or past the run's token count fires after every
      group has finished, before the verifier's content log is read.
    in_recovery: kill -9 during a recovery, once each: "verifier" right before the next handover (a
      group's restart) or restore (the verifier's), "group:<id>" the group's new incarnation as soon
      as it is made.
    delay_s: a random real delay up to this before each message an actor handles (the trace must
      not change).
    stall_group: this group opens its sessions, then hangs (the driver's stall check).
    """

    kill: tuple[tuple[str, int], ...] = ()
    in_recovery: tuple[str, ...] = ()
    delay_s: float = 0.0
    stall_group: int = -1


def chaos_driver(chaos: Chaos):
    """RunOptions.driver for a run with these faults."""
    return functools.partial(ChaosDriver, chaos=chaos)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class ChaosDeviceGroup(DeviceGroup):
    def __init__(self, *args, delay_s: float = 0.0, die_at_tokens: int | None = None, stall: bool = False, **kw):
        super().__init__(*args, **kw)
        self.delay_s, self.die_at_tokens, self.stall = delay_s, die_at_tokens, stall
        self.rng, self.tokens_committed = random.Random(self.group_id), 0

    def chaos_kill(self) -> None:
        _die()

    def _opened(self) -> None:
        if self.stall:
            threading.Event().wait()  # for ever: ray.kill ends it

    def _received(self) -> None:
        if self.delay_s > 0:
            time.sleep(self.rng.random() * self.delay_s)

    def _drained(self, events: list) -> None:
        # Counted here, not by the driver, so the kill always lands mid-run: a driver busy with
        # another restart may otherwise see the group only once it is done.
        if self.die_at_tokens is not None:
            self.tokens_committed += sum(isinstance(e, TokenCommitted) for e in events)
            if self.tokens_committed >= self.die_at_tokens:
                _die()


class ChaosVerifier(Verifier):
    def __init__(self, *args, delay_s: float = 0.0, **kw):
        super().__init__(*args, **kw)
        self.delay_s, self.rng = delay_s, random.Random(-1)

    def chaos_kill(self) -> None:
        _die()

    def _received(self) -> None:
        if self.delay_s > 0:
            time.sleep(self.rng.random() * self.delay_s)


class ChaosDriver(RayDriver):
    group_class = ChaosDeviceGroup
    verifier_class = ChaosVerifier

    def __init__(self, *args, chaos: Chaos, **kw):
        super().__init__(*args, **kw)
        self.chaos = chaos
        self.die_at = {int(k[0].split(":")[1]): k[1] for k in chaos.kill if k[0] != "verifier"}
        self.kills = [k for k in chaos.kill if k[0] == "verifier"]
        self.in_recovery_left = list(chaos.in_recovery)
        if self.kills:
            self.poll_s = 0.05  # kills fire at a token count: look often

    def group_options(self, i: int, incarnation: int) -> dict:
        return {
            "delay_s": self.chaos.delay_s,
            "stall": i == self.chaos.stall_group,
            "die_at_tokens": self.die_at.get(i) if incarnation == 0 else None,
        }

    def verifier_options(self) -> dict:
        return {"delay_s": self.chaos.delay_s}

    def _kill_now(self, actor) -> None:
        ray.wait([actor.chaos_kill.remote()], timeout=30)  # resolves (with its error) once the process is gone

    def in_recovery(self, target: str, actor) -> None:
        if target in self.in_recovery_left:
            self.in_recovery_left.remove(target)
            self._kill_now(actor)

    def after_poll(self) -> None:
        final = len(self.p.specs) * self.p.run.max_new_tokens
        for kill in [k for k in self.kills if k[1] <= self.sinks.tokens and k[1] < final]:
            self.kills.remove(kill)
            self.verifier.chaos_kill.remote()
        if not self.kills:
            self.poll_s = RayDriver.poll_s

    def before_results(self) -> None:
        for kill in list(self.kills):  # verifier kills left fire after every group has finished
            self.kills.remove(kill)
            self._kill_now(self.verifier)
