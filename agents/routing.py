"""Routing: which verifier serves each device (docs/design.md section 8, several verifiers).

A scenario declares verifiers (`servers:`, each a VerifierSlot) and a routing policy, a Router, that
assigns every device to one of them. Assignment happens once, at session open, before any token is
drafted, and never changes: a device's uploads all go to its verifier, so the devices of one
verifier form a partition that no other verifier's batches touch, and each partition can be
replayed on its own (the partitioned replay of section 2's timing pass). A Router is therefore a
pure, deterministic function of the devices and verifiers (numpy only: no Ray, no sockets, no time).

Built-ins: `round-robin`, `static` (by tier or region), `jsq` (join the shortest queue at session
open). Loading mirrors policies.registry.load_policy (docs/design.md section 4): a spec is a name
(a built-in, a name given to register_router, an entry point in the group `hlm_testbed.routers`),
a dotted path `package.module:ClassName`, a mapping {name: <one of those>, <param>: <value>, ...},
or a Router instance. Any bad spec raises RoutingError at load, never in the middle of a run.
"""

from __future__ import annotations

import heapq
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

ENTRY_POINT_GROUP = "hlm_testbed.routers"


class RoutingError(ValueError):
    """A routing spec that cannot be loaded or applied; the message names the spec and the reason."""

    def __init__(self, spec: Any, reason: str):
        self.spec = spec
        self.reason = reason
        super().__init__(f"routing {spec!r}: {reason}")

    def __reduce__(self) -> tuple[type[RoutingError], tuple[Any, str]]:  # picklable across Ray actors
        return (RoutingError, (self.spec, self.reason))


@dataclass(frozen=True)
class VerifierSlot:
    """One verifier: `name` is unique in the run (e.g. gpu-a100-3), `pool` the servers: entry it comes from."""

    index: int
    name: str
    pool: str
    capacity: float  # relative weight for capacity-aware routing (the verifier's max_batch by default)
    region: str | None = None


@dataclass(frozen=True)
class RoutedDevice:
    """What a router may look at: a device's id, tier, region and policy label (not its content)."""

    device_id: int
    tier: str
    region: str | None = None
    policy: str = ""


class Router:
    """Assigns devices to verifiers once, at session open (module docstring: why that keeps partitions
    independent). Subclasses implement `assign`; `check` lets validation refuse a fleet early."""

    name = "router"

    def assign(self, devices: Sequence[RoutedDevice], verifiers: Sequence[VerifierSlot]) -> np.ndarray:
        """The verifier index of each device, in the order given (int64). Deterministic."""
        raise NotImplementedError

    def check(self, devices: Sequence[RoutedDevice], verifiers: Sequence[VerifierSlot]) -> None:
        """Raise RoutingError if this router cannot serve such a fleet. `devices` may be one
        representative per tier (validation does not expand the fleet); the default accepts all."""

    def params(self) -> dict[str, Any]:
        return {}


def _id_rank(devices: Sequence[RoutedDevice]) -> np.ndarray:
    """Each device's position in device-id order (0 for the lowest id)."""
    ids = np.fromiter((d.device_id for d in devices), dtype=np.int64, count=len(devices))
    rank = np.empty(len(devices), dtype=np.int64)
    rank[np.argsort(ids, kind="stable")] = np.arange(len(devices))
    return rank


def _need_verifiers(router: Router, verifiers: Sequence[VerifierSlot]) -> None:
    if not verifiers:
        raise RoutingError(router.name, "no verifiers to route to")


class RoundRobin(Router):
    """Device i of the run, in device-id order, goes to verifier i mod n (capacities ignored)."""

    name = "round-robin"

    def assign(self, devices: Sequence[RoutedDevice], verifiers: Sequence[VerifierSlot]) -> np.ndarray:
        _need_verifiers(self, verifiers)
        return _id_rank(devices) % len(verifiers)


class JoinShortestQueue(Router):
    """Join the shortest queue at session open: each device, in device-id order, joins the verifier
    with the fewest sessions relative to its capacity weight (sessions / capacity before it joins),
    ties to the lowest index. In the emulation every session opens at t=0, before any verdict, so a
    queue is its session count and this is a capacity-weighted balance: each verifier ends with
    sessions in proportion to its capacity (to within one). With equal capacities it is round-robin."""

    name = "jsq"

    def assign(self, devices: Sequence[RoutedDevice], verifiers: Sequence[VerifierSlot]) -> np.ndarray:
        _need_verifiers(self, verifiers)
        capacity = [float(v.capacity) for v in verifiers]
        if any(not c > 0 for c in capacity):
            raise RoutingError(self.name, "jsq needs every verifier's capacity > 0")
        rank = _id_rank(devices)
        if len(set(capacity)) == 1:
            return rank % len(verifiers)
        # A heap of (sessions / capacity, index): pops the least loaded, lowest index on ties. Equal
        # ratios of small integers are equal doubles (division rounds correctly), so ties are exact.
        heap = [(0.0, i, 0) for i in range(len(verifiers))]
        by_rank = np.empty(len(devices), dtype=np.int64)
        for r in range(len(devices)):
            _, i, sessions = heapq.heappop(heap)
            by_rank[r] = i
            heapq.heappush(heap, ((sessions + 1) / capacity[i], i, sessions + 1))
        return by_rank[rank]


class Static(Router):
    """A fixed map by tier or region: `map` takes each tier (or region) to a pool or a verifier name;
    the devices sent to a pool spread round-robin over its verifiers, in device-id order. `by: region`
    without a map sends each region's devices to the verifiers of that region. A device whose key is
    not mapped is an error (check names the keys), never a silent default."""

    name = "static"

    def __init__(self, by: Literal["tier", "region"] = "tier", map: Mapping[str, str] | None = None):
        if by not in ("tier", "region"):
            raise ValueError(f"by must be tier or region, got {by!r}")
        if map is None and by == "tier":
            raise ValueError("static by tier needs `map: {tier: pool or verifier name}`")
        if map is not None and (
            not isinstance(map, Mapping) or not all(isinstance(k, str) and isinstance(t, str) for k, t in map.items())
        ):
            raise ValueError(f"map must be a mapping of {by} names to pool or verifier names, got {map!r}")
        self.by = by
        self.map = dict(map) if map is not None else None

    def params(self) -> dict[str, Any]:
        return {"by": self.by, "map": self.map}

    def _key(self, d: RoutedDevice) -> str | None:
        return d.tier if self.by == "tier" else d.region

    def _targets(self, verifiers: Sequence[VerifierSlot]) -> dict[str | None, list[int]]:
        """key -> the indices of the verifiers its devices spread over."""
        if self.map is None:  # by region, no map: the verifiers of the same region
            out: dict[str | None, list[int]] = {}
            for v in verifiers:
                if v.region is not None:
                    out.setdefault(v.region, []).append(v.index)
            return out
        by_name = {v.name: [v.index] for v in verifiers}
        by_pool: dict[str, list[int]] = {}
        for v in verifiers:
            by_pool.setdefault(v.pool, []).append(v.index)
        unknown = sorted(t for t in set(self.map.values()) if t not in by_pool and t not in by_name)
        if unknown:
            raise RoutingError(
                self.name,
                f"map target(s) {', '.join(unknown)} name no pool or verifier "
                f"(pools: {', '.join(by_pool)}; verifiers: {', '.join(by_name) if len(by_name) <= 20 else '...'})",
            )
        return {k: by_pool.get(t) or by_name[t] for k, t in self.map.items()}

    def check(self, devices: Sequence[RoutedDevice], verifiers: Sequence[VerifierSlot]) -> None:
        _need_verifiers(self, verifiers)
        if self.by == "region":
            bare = sorted({d.tier for d in devices if d.region is None})
            if bare:
                raise RoutingError(self.name, f"tier(s) {', '.join(bare)} have no region (tiers: region)")
        targets = self._targets(verifiers)
        keys = {self._key(d) for d in devices}
        missing = sorted(str(k) for k in keys if k not in targets)
        if missing:
            where = "map" if self.map is not None else "verifiers of that region (servers: region)"
            raise RoutingError(
                self.name, f"{self.by}(s) {', '.join(missing)} have no entry in {where}; every {self.by} needs one"
            )
        if self.map is not None:
            extra = sorted(k for k in self.map if k not in keys)
            if extra:
                known = ", ".join(sorted(str(k) for k in keys))
                raise RoutingError(self.name, f"map key(s) {', '.join(extra)} are not {self.by}s here ({known})")

    def assign(self, devices: Sequence[RoutedDevice], verifiers: Sequence[VerifierSlot]) -> np.ndarray:
        targets = self._targets(verifiers)
        out = np.empty(len(devices), dtype=np.int64)
        turn: dict[tuple[int, ...], int] = {}  # per target set: a pool shared by several keys stays balanced
        for pos in np.argsort(_id_rank(devices), kind="stable"):
            key = self._key(devices[pos])
            if key not in targets:
                raise RoutingError(self.name, f"{self.by} {key!r} of device {devices[pos].device_id} is not mapped")
            pool = tuple(targets[key])
            k = turn.get(pool, 0)
            out[pos] = pool[k % len(pool)]
            turn[pool] = k + 1
        return out


# ---------------------------------------------------------------------------- loading

BUILTIN: dict[str, type[Router]] = {r.name: r for r in (RoundRobin, Static, JoinShortestQueue)}
_REGISTRY: dict[str, Callable[..., Router]] = {}


def register_router(name: str, *, replace: bool = False) -> Callable[[Callable[..., Router]], Callable[..., Router]]:
    """Decorator: make a Router subclass (or a factory returning a Router) loadable as `name`."""
    if not isinstance(name, str) or not name or ":" in name:
        raise RoutingError(name, "a registered name must be a non-empty string without ':'")
    if name in BUILTIN:
        raise RoutingError(name, "is a built-in router and cannot be re-registered")
    if name in _REGISTRY and not replace:
        raise RoutingError(name, "is already registered (pass replace=True to replace it)")

    def deco(factory: Callable[..., Router]) -> Callable[..., Router]:
        if not callable(factory):
            raise RoutingError(name, f"factory {factory!r} is not callable")
        _REGISTRY[name] = factory
        return factory

    return deco


def unregister_router(name: str) -> None:
    _REGISTRY.pop(name, None)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_routers() -> list[str]:
    eps = sorted(set(_entry_points()) - set(BUILTIN) - set(_REGISTRY))
    return [*BUILTIN, *sorted(_REGISTRY), *eps]


def _import_target(spec: Any, path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RoutingError(spec, f"a dotted path must look like package.module:ClassName, got {path!r}")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of the plug-in is the spec's fault
        raise RoutingError(spec, f"cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RoutingError(spec, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _instantiate(spec: Any, target: Any, params: dict[str, Any]) -> Router:
    """A Router from a Router subclass or factory called with `params`; unknown parameters are refused."""
    if inspect.isclass(target) and not issubclass(target, Router):
        raise RoutingError(spec, f"{target.__module__}.{target.__qualname__} is not an agents.routing.Router subclass")
    if not callable(target):
        raise RoutingError(spec, f"{target!r} is neither a Router subclass nor a factory")
    try:
        ps = inspect.signature(target).parameters
    except (TypeError, ValueError):
        ps = None
    if ps is not None and not any(p.kind is p.VAR_KEYWORD for p in ps.values()):
        named = {n for n, p in ps.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = sorted(set(params) - named)
        if unknown:
            raise RoutingError(
                spec, f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(sorted(named)) or 'none'}"
            )
    try:
        router = target(**params)
    except RoutingError:
        raise
    except Exception as e:
        raise RoutingError(spec, f"construction failed: {type(e).__name__}: {e}") from e
    if not isinstance(router, Router):
        raise RoutingError(spec, f"factory returned {type(router).__name__}, not an agents.routing.Router")
    return router


def load_router(spec: Any) -> Router:
    """The Router a spec names (module docstring); RoutingError for any bad spec."""
    if isinstance(spec, Router):
        return spec
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise RoutingError(spec, "a routing mapping needs a 'name' key")
        name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    elif isinstance(spec, str):
        name, params = spec, {}
    else:
        raise RoutingError(spec, f"a spec must be a name, a dotted path or a mapping, not {type(spec).__name__}")
    if not isinstance(name, str) or not name:
        raise RoutingError(spec, f"the name must be a non-empty string, got {name!r}")
    if name in BUILTIN:
        return _instantiate(spec, BUILTIN[name], params)
    if name in _REGISTRY:
        return _instantiate(spec, _REGISTRY[name], params)
    eps = _entry_points()
    if name in eps:
        try:
            target = eps[name].load()
        except Exception as e:
            raise RoutingError(
                spec, f"entry point {name} = {eps[name].value} failed to load: {type(e).__name__}: {e}"
            ) from e
        return _instantiate(spec, target, params)
    if ":" in name:
        return _instantiate(spec, _import_target(spec, name), params)
    known = ", ".join(known_routers())
    raise RoutingError(spec, f"unknown router {name!r}; known: {known} (or a dotted path package.module:ClassName)")


def route(spec: Any, devices: Sequence[RoutedDevice], verifiers: Sequence[VerifierSlot]) -> np.ndarray:
    """Load `spec` and assign: each device's verifier index, checked to be in range."""
    router = load_router(spec)
    out = np.asarray(router.assign(devices, verifiers), dtype=np.int64)
    if out.shape != (len(devices),) or (len(out) and (out.min() < 0 or out.max() >= len(verifiers))):
        raise RoutingError(spec, f"assign must return one verifier index in [0, {len(verifiers)}) per device")
    return out
