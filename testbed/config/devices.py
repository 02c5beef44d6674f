"""Device expansion: a scenario's tiers as numbered devices (TierDevice), chunked into the
DeviceGroup actors that run them, and the objects a device's specs stand for (resolve_link,
policy_name).

A TierDevice is a device as the scenario file declares it (link and policy as written); the run's
plan resolves it into an agents.device.DeviceSpec (link profile object, policy label, prompt ids),
what a device group hosts.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.config.schema import Scenario


@dataclass(frozen=True, slots=True)
class TierDevice:
    """One emulated device as its tier declares it. Ids run 0..N-1 over tiers in file order (stable across layouts)."""

    device_id: int
    tier: str
    slm_ms_per_token: float
    link: str | dict  # netem spec; resolve_link(spec) gives the profile object
    policy_spec: str | dict  # policies.load_policy(spec)

    @property
    def policy(self) -> str:
        return policy_name(self.policy_spec)


def devices(s: Scenario) -> list[TierDevice]:
    """Expand tiers into devices: tier 0's devices get ids 0..count-1, then tier 1's, ..."""
    out: list[TierDevice] = []
    for t in s.tiers:
        out += [TierDevice(len(out) + i, t.name, t.slm_ms_per_token, t.link, t.policy) for i in range(t.count)]
    return out


def device_groups(s: Scenario) -> list[list[TierDevice]]:
    """Devices chunked in id order into DeviceGroup actors of actors.devices_per_group each."""
    ds, n = devices(s), s.actors.devices_per_group
    return [ds[i : i + n] for i in range(0, len(ds), n)]


def resolve_link(spec: str | dict):
    """The netem profile object for a tier's link spec (a named profile or {uplink, downlink})."""
    import netem

    return netem.get_profile(spec) if isinstance(spec, str) else netem.DuplexProfile.from_dict(spec)


def policy_name(spec: str | dict) -> str:
    """The label of a policy spec (tokens table `policy` column, metrics label)."""
    return spec if isinstance(spec, str) else str(spec["name"])
