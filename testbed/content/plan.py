"""A scenario whose tiers replay content libraries, resolved for the replay engine (testbed.run.replay).

Per device it keeps three integers (its tier, its recorded sequence, its verifier: arrays, not objects);
a device's agents.device.DeviceSpec and its content record are made when its partition replays. Checks
(`library_problems`) run in preflight, before anything starts: every library reads, holds content of
each tier's policy, and agrees with the scenario on the generation settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agents.device import DeviceSpec, RunParams
from agents.record import Content, PackedVerdicts
from testbed.content.draw import draw
from testbed.content.library import Library, LibraryError, Pool, canonical_policy


@dataclass
class LibraryContent:
    """Each device's content: pools[tier_pool[tier_of[d]]] sequence sequence_of[d]."""

    pools: list[Pool]
    tier_pool: list[int]  # tier index -> its pool
    tier_of: np.ndarray  # device -> tier index (ids are 0..N-1, tiers in file order)
    sequence_of: np.ndarray  # device -> sequence in its tier's pool

    def pool_of(self, device: int) -> Pool:
        return self.pools[self.tier_pool[int(self.tier_of[device])]]

    def select(self, devices: Sequence[int]) -> Content:
        """The content record of `devices` (increasing ids) as a replay consumes it: each device's
        recorded tokens (views of the pool) and its verdicts addressed to it (as Content.select)."""
        drafted, parts = {}, []
        for d in devices:
            pool, s = self.pool_of(d), int(self.sequence_of[d])
            drafted[d] = pool.drafted(s)
            parts.append(pool.verdict_part(s, d))
        return Content(drafted, PackedVerdicts.concat(parts))


class LibrarySpecs(Sequence):
    """The run's DeviceSpecs, made on access from the tiers and the drawn sequences (a million devices
    are three arrays, not a million objects)."""

    def __init__(self, tiers: list[tuple], content: LibraryContent):
        self.tiers = tiers  # (name, policy label, slm_ms_per_token, link profile) per tier
        self.c = content

    def __len__(self) -> int:
        return len(self.c.tier_of)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(i)
        name, label, slm_ms, link = self.tiers[int(self.c.tier_of[i])]
        pool, s = self.c.pool_of(i), int(self.c.sequence_of[i])
        return DeviceSpec(i, name, label, slm_ms, link, int(pool.prompt_index[s]), pool.prompt_ids[s])


def _libraries(s) -> dict[str, Library]:
    return {t.content.library: Library.open(t.content.library) for t in s.tiers}


def library_problems(s) -> list[tuple[str, str]]:
    """(field path, message) for everything a library replay of `s` would fail on."""
    problems: list[tuple[str, str]] = []
    libraries: dict[str, Library] = {}
    for i, t in enumerate(s.tiers):
        try:
            lib = libraries.get(t.content.library) or Library.open(t.content.library)
            libraries[t.content.library] = lib
            lib.pool(t.policy)
        except LibraryError as e:
            problems.append((f"tiers[{i}].content.library", str(e)))
    settings = {}
    for ref, lib in libraries.items():
        try:
            got = lib.run_settings()
        except LibraryError as e:
            problems.append(("tiers", str(e)))
            continue
        for key, value in got.items():
            if settings.setdefault(key, (value, ref))[0] != value:
                problems.append(("tiers", f"libraries {settings[key][1]} and {ref} differ in {key}"))
    n_new = settings.get("max_new_tokens", (None,))[0]
    g = s.generation
    if n_new is not None and "max_new_tokens" in g.model_fields_set and g.max_new_tokens != n_new:
        problems.append(
            (
                "generation.max_new_tokens",
                f"the content library was recorded with max_new_tokens {n_new}; a replay replays its sequences "
                f"as recorded: set {n_new} or leave it out",
            )
        )
    if not problems:
        try:
            plan_content(s, libraries)
        except LibraryError as e:
            problems.append(("tiers", str(e)))
    return problems


def plan_content(s, libraries: dict[str, Library] | None = None) -> LibraryContent:
    """Draw every device's sequence (TierContent.draw) from its tier's pool."""
    libraries = libraries or _libraries(s)
    pools: list[Pool] = []
    keys: dict[tuple[str, str], int] = {}
    tier_pool, tier_of, sequence_of, start = [], [], [], 0
    for i, t in enumerate(s.tiers):
        key = (t.content.library, canonical_policy(t.policy))
        if key not in keys:
            keys[key] = len(pools)
            pools.append(libraries[t.content.library].pool(t.policy))
        tier_pool.append(keys[key])
        ids = np.arange(start, start + t.count)
        tier_of.append(np.full(t.count, i, dtype=np.int32))
        sequence_of.append(draw(pools[keys[key]], ids, s.seed, t.content.draw, t.name).astype(np.int32))
        start += t.count
    return LibraryContent(pools, tier_pool, np.concatenate(tier_of), np.concatenate(sequence_of))


def plan_library(s):
    """The testbed.run.Plan of a library replay: no models; the run's settings from the library."""
    from testbed.config.devices import resolve_link
    from testbed.run.plan import Plan, policy_labels

    libraries = _libraries(s)
    content = plan_content(s, libraries)
    settings = next(iter(libraries.values())).run_settings()
    policy_specs, tier_label = policy_labels(s)
    tiers = [(t.name, tier_label[t.name], t.slm_ms_per_token, resolve_link(t.link)) for t in s.tiers]
    run = RunParams(
        seed=s.seed,
        max_new_tokens=settings["max_new_tokens"],
        temperature=settings["temperature"],
        vocab_size=settings["vocab_size"],
    )
    recordings = [r for lib in libraries.values() for r in lib.recordings]
    recorded = {r.provenance.get("dtype", {}).get("llm", "float32") for r in recordings}
    dtype = recorded.pop() if len(recorded) == 1 else "mixed"
    verifiers, verifier_of = route(s, tier_label, content)
    return Plan(
        s,
        LibrarySpecs(tiers, content),
        run,
        verifiers[0][1],
        policy_specs,
        None,
        None,
        dtype,
        dtype,
        1,
        content,
        verifiers=verifiers,
        verifier_of=verifier_of,
    )


def route(s, tier_label: dict[str, str], content: LibraryContent) -> tuple[list, np.ndarray]:
    """The scenario's verifiers, and each device's by its router (agents.routing), from the tiers (no
    DeviceSpec is made for it)."""
    from agents.routing import RoutedDevice
    from agents.routing import route as by_router

    devices, start = [], 0
    for t in s.tiers:
        devices += [RoutedDevice(d, t.name, t.region, tier_label[t.name]) for d in range(start, start + t.count)]
        start += t.count
    verifiers = s.verifiers()
    return verifiers, by_router(s.routing, devices, [slot for slot, _ in verifiers])
