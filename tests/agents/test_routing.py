"""Routing policies (agents.routing): the built-ins on small fleets, plug-ins, bad specs."""

from __future__ import annotations

import numpy as np
import pytest

from agents.routing import (
    JoinShortestQueue,
    RoundRobin,
    RoutedDevice,
    Router,
    RoutingError,
    Static,
    VerifierSlot,
    load_router,
    register_router,
    route,
    unregister_router,
)


def fleet(tiers: dict[str, int], regions: dict[str, str] | None = None) -> list[RoutedDevice]:
    out: list[RoutedDevice] = []
    for tier, n in tiers.items():
        out += [RoutedDevice(len(out) + i, tier, (regions or {}).get(tier)) for i in range(n)]
    return out


def pools(*spec: tuple[str, int, float, str | None]) -> list[VerifierSlot]:
    """(pool, count, capacity, region) -> slots named as the schema names them."""
    out: list[VerifierSlot] = []
    for pool, count, capacity, region in spec:
        for i in range(count):
            name = f"{pool}-{i}" if count > 1 else pool
            out.append(VerifierSlot(len(out), name, pool, capacity, region))
    return out


# ---------------------------------------------------------------------------- built-ins


def test_round_robin_in_device_id_order():
    vs = pools(("v", 3, 8, None))
    assert route("round-robin", fleet({"a": 7}), vs).tolist() == [0, 1, 2, 0, 1, 2, 0]
    # the order given does not matter: device i of the run (by id) goes to i mod n
    shuffled = [RoutedDevice(i, "a") for i in (5, 0, 3, 1)]
    assert route("round-robin", shuffled, vs).tolist() == [0, 0, 2, 1]


def test_round_robin_balance():
    out = route("round-robin", fleet({"a": 1000}), pools(("v", 7, 8, None)))
    counts = np.bincount(out, minlength=7)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 1000


def test_jsq_equal_capacities_is_round_robin():
    ds, vs = fleet({"a": 11}), pools(("v", 4, 8, None))
    assert route("jsq", ds, vs).tolist() == route("round-robin", ds, vs).tolist()


def test_jsq_unequal_capacities():
    vs = pools(("small", 1, 1, None), ("big", 1, 3, None))
    # sessions / capacity before joining, ties to the lowest index: 0/1 = 0/3 -> small; then big (0 < 1),
    # big (1/3 < 1), big (2/3 < 1), then 1 = 1 -> small.
    assert route("jsq", fleet({"a": 5}), vs).tolist() == [0, 1, 1, 1, 0]


def test_jsq_proportional_to_capacity():
    vs = pools(("a", 2, 4, None), ("b", 1, 8, None), ("c", 1, 16, None))
    counts = np.bincount(route("jsq", fleet({"x": 3000}), vs), minlength=4)
    share = np.array([4, 4, 8, 16]) / 32 * 3000
    assert counts.sum() == 3000 and np.abs(counts - share).max() <= 1


def test_jsq_refuses_zero_capacity():
    with pytest.raises(RoutingError, match="capacity > 0"):
        route("jsq", fleet({"a": 2}), pools(("v", 1, 0, None), ("w", 1, 2, None)))


def test_static_by_tier_spreads_over_the_pool():
    ds = fleet({"phone": 4, "laptop": 3})
    vs = pools(("gpu", 2, 8, None), ("cpu", 1, 8, None))
    out = route({"name": "static", "by": "tier", "map": {"phone": "gpu", "laptop": "cpu"}}, ds, vs)
    assert out.tolist() == [0, 1, 0, 1, 2, 2, 2]


def test_static_to_a_verifier_and_a_shared_pool():
    ds = fleet({"a": 3, "b": 3, "c": 2})
    vs = pools(("gpu", 3, 8, None), ("cpu", 1, 8, None))
    # a and b share the gpu pool: one turn per pool, so the pool stays balanced; c goes to one verifier
    out = route({"name": "static", "map": {"a": "gpu", "b": "gpu", "c": "gpu-2"}}, ds, vs)
    assert out.tolist() == [0, 1, 2, 0, 1, 2, 2, 2]


def test_static_by_region():
    ds = fleet({"p": 2, "q": 2, "r": 1}, regions={"p": "eu", "q": "us", "r": "eu"})
    vs = pools(("eu-gpu", 2, 8, "eu"), ("us-gpu", 1, 8, "us"))
    mapped = route({"name": "static", "by": "region", "map": {"eu": "eu-gpu", "us": "us-gpu"}}, ds, vs)
    assert mapped.tolist() == [0, 1, 2, 2, 0]
    # without a map: each region's devices go to the verifiers of that region
    assert route({"name": "static", "by": "region"}, ds, vs).tolist() == mapped.tolist()


def test_static_unmapped_and_unknown_keys():
    ds = fleet({"phone": 2, "laptop": 1})
    vs = pools(("gpu", 2, 8, None))
    router = load_router({"name": "static", "map": {"phone": "gpu"}})
    with pytest.raises(RoutingError, match=r"tier\(s\) laptop have no entry in map"):
        router.check(ds, vs)
    with pytest.raises(RoutingError, match="tier 'laptop' of device 2 is not mapped"):
        router.assign(ds, vs)
    extra = load_router({"name": "static", "map": {"phone": "gpu", "laptop": "gpu", "tablet": "gpu"}})
    with pytest.raises(RoutingError, match=r"map key\(s\) tablet are not tiers here \(laptop, phone\)"):
        extra.check(ds, vs)
    target = load_router({"name": "static", "map": {"phone": "tpu", "laptop": "gpu-5"}})
    with pytest.raises(RoutingError, match=r"map target\(s\) gpu-5, tpu name no pool or verifier"):
        target.check(ds, vs)
    region = load_router({"name": "static", "by": "region"})
    with pytest.raises(RoutingError, match=r"region\(s\) ap have no entry in verifiers of that region"):
        region.check(fleet({"a": 1}, {"a": "ap"}), pools(("v", 1, 8, "eu")))
    with pytest.raises(RoutingError, match=r"tier\(s\) a have no region"):
        region.check(fleet({"a": 1}), pools(("v", 1, 8, None)))


def test_assignment_is_deterministic():
    ds, vs = fleet({"a": 50, "b": 30}), pools(("x", 3, 2, None), ("y", 2, 5, None))
    for spec in ("round-robin", "jsq", {"name": "static", "map": {"a": "x", "b": "y"}}):
        assert route(spec, ds, vs).tolist() == route(spec, ds, vs).tolist()


def test_no_verifiers():
    with pytest.raises(RoutingError, match="no verifiers"):
        route("round-robin", fleet({"a": 1}), [])


# ---------------------------------------------------------------------------- plug-ins


class AllToLast(Router):
    """Every device to the last verifier (a plug-in for the tests)."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    def assign(self, devices, verifiers):
        return np.full(len(devices), len(verifiers) - 1 - self.offset, dtype=np.int64)


class NotARouter:
    pass


def test_plugin_by_dotted_path():
    vs = pools(("v", 3, 8, None))
    assert route(f"{__name__}:AllToLast", fleet({"a": 2}), vs).tolist() == [2, 2]
    assert route({"name": f"{__name__}:AllToLast", "offset": 1}, fleet({"a": 2}), vs).tolist() == [1, 1]


def test_plugin_by_register():
    register_router("to-last")(AllToLast)
    try:
        assert isinstance(load_router("to-last"), AllToLast)
        assert route({"name": "to-last", "offset": 2}, fleet({"a": 1}), pools(("v", 3, 8, None))).tolist() == [0]
        with pytest.raises(RoutingError, match="already registered"):
            register_router("to-last")(AllToLast)
        with pytest.raises(RoutingError, match="built-in"):
            register_router("jsq")
    finally:
        unregister_router("to-last")
    with pytest.raises(RoutingError, match="unknown router 'to-last'"):
        load_router("to-last")


def test_instances_and_builtins_load():
    r = RoundRobin()
    assert load_router(r) is r
    assert isinstance(load_router("jsq"), JoinShortestQueue)
    assert load_router({"name": "static", "by": "region"}).params() == {"by": "region", "map": None}
    assert isinstance(load_router({"name": "static", "map": {"a": "b"}}), Static)


def test_out_of_range_assignment_is_refused():
    with pytest.raises(RoutingError, match=r"one verifier index in \[0, 1\)"):
        route({"name": f"{__name__}:AllToLast", "offset": -1}, fleet({"a": 1}), pools(("v", 1, 8, None)))


# ---------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "routing 'nope': unknown router 'nope'; known: round-robin, static, jsq"),
        ("no_such_module_xyz:R", "cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
        (f"{__name__}:Missing", f"module '{__name__}' has no attribute 'Missing'"),
        ("bad:", "a dotted path must look like package.module:ClassName"),
        (f"{__name__}:NotARouter", "NotARouter is not an agents.routing.Router subclass"),
        ({"name": "jsq", "k": 2}, "unknown parameter(s) k; accepted: none"),
        ({"name": "static", "by": "city", "map": {}}, "construction failed: ValueError: by must be tier or region"),
        ({"name": "static"}, "static by tier needs `map: {tier: pool or verifier name}`"),
        ({"name": "static", "map": {"a": 1}}, "map must be a mapping of tier names to pool or verifier names"),
        ({"by": "tier"}, "a routing mapping needs a 'name' key"),
        ({"name": 3}, "the name must be a non-empty string, got 3"),
        (7, "a spec must be a name, a dotted path or a mapping, not int"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(RoutingError) as ei:
        load_router(spec)
    assert message in str(ei.value)
    assert isinstance(ei.value, ValueError) and ei.value.spec == spec
