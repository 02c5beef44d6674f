"""Field checks that ask something outside the schema: agents.models (model specs), netem (link
profiles, refused when they lose every packet), policies.load_policy (policy specs, resolved to
their pinned parameters), agents.routing (routing specs, checked against the tiers and verifiers),
the resolver (server.host) and agents.models.hardware (devices).

Each takes the raw field value and returns the value to store, or raises errors.fail(...) with
the sub-path at fault. The packages are imported lazily and skipped when absent, so the schema
loads (and `testbed validate` stays quick) without torch. What needs the models, the prompts or
this machine's resources is testbed.preflight's, not this module's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import socket
from pathlib import Path
from typing import Any

from testbed.config.errors import fail, fail_many


def _split_error(message: str, d: dict) -> tuple[tuple, str]:
    """(sub-path, message) of an error about a key of `d`: netem writes "key: what was expected";
    otherwise the key of `d` named first in the message (agents.models style)."""
    m = re.match(r"^([\w.-]+): (.*)$", message, re.S)
    if m and m.group(1).split(".")[0] in d:
        return tuple(m.group(1).split(".")), m.group(2)
    hits = [
        (mm.start(), -len(k), k)
        for k in d
        for mm in [re.search(rf"(?<![\w]){re.escape(str(k))}(?![\w])", message)]
        if mm
    ]
    return ((min(hits)[2],) if hits else ()), message


# ---------------------------------------------------------------------------- models


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s in (".", "..")


def _agents_models():
    try:
        import agents.models as m  # imports torch: only reached when validating a scenario
    except ImportError:
        return None
    return m if hasattr(m, "parse_spec") else None


def check_model_spec(v: Any, base_dir: str | None) -> Any:
    expected = (
        "expected a model: a bundled pair member like qwen2.5-coder:slm, a Hugging Face id, "
        "a local folder, tiny (tiny:slm, tiny:llm), or {kind: tiny, <params>}"
    )
    if isinstance(v, str):
        if not v or v != v.strip() or any(c.isspace() for c in v):
            raise fail(f"{expected}, got {v!r}")
        if _looks_like_path(v):  # a local folder: absolute, so a dumped scenario still finds it
            v = str((Path(base_dir or ".") / Path(v).expanduser()).resolve())
    elif isinstance(v, dict):
        if v.get("kind") != "tiny":
            raise fail(f"expected kind: tiny, got {v.get('kind')!r}", "kind")
        v = dict(v)
    else:
        raise fail(f"{expected}, got {type(v).__name__}")
    models = _agents_models()
    if models is not None and isinstance(v, dict) and hasattr(models, "TinyConfig"):
        known = [f.name for f in dataclasses.fields(models.TinyConfig)]
        unknown = [k for k in v if k != "kind" and k not in known]
        if unknown:
            raise fail_many(
                [((k,), f"unknown tiny model parameter; expected one of: {', '.join(known)}") for k in unknown]
            )
    if models is not None:
        try:
            models.parse_spec(v)
        except models.ModelError as e:
            sub, msg = _split_error(str(e), v if isinstance(v, dict) else {})
            raise fail(msg, *sub) from e
    return v


# ---------------------------------------------------------------------------- hosts


# A DNS host name: labels of letters, digits and inner hyphens. Checked before any lookup, so
# text like "not a host" is refused without asking a resolver.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


@functools.lru_cache(maxsize=64)  # overrides and sweeps re-validate the same host many times
def host_problem(host: str) -> str | None:
    """Why the verifier's ZeroMQ socket could not bind `host` (None if it can): an IPv4 literal or a
    name that resolves to IPv4 (the socket is IPv4 only). Only inet_pton and getaddrinfo, no traffic;
    whether this machine owns the address is checked when a local run is planned (testbed.preflight)."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return None
    except OSError:
        pass
    expected = "expected an IPv4 address or a host name that resolves to one (e.g. 127.0.0.1, 0.0.0.0, localhost)"
    try:
        socket.inet_pton(socket.AF_INET6, host.strip("[]"))
        return f"{expected}, got the IPv6 address {host!r}: the verifier's ZeroMQ socket is IPv4 only"
    except OSError:
        pass
    if not _HOSTNAME.match(host):
        return f"{expected}, got {host!r}, which is not a valid host name"
    try:
        socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return f"{expected}, got {host!r}, which does not resolve here ({getattr(e, 'strerror', None) or e})"
    return None


# ---------------------------------------------------------------------------- links


def _netem():
    try:
        import netem
    except ImportError:
        return None
    return netem if hasattr(netem, "LinkProfile") else None  # until the netem issue lands


# Our own checks of the common link fields: exact paths and messages even before netem speaks.
_LINK_RULES = {
    "rate_mbps": ("> 0", lambda x: x > 0),
    "delay_ms": (">= 0", lambda x: x >= 0),
    "jitter_ms": (">= 0", lambda x: x >= 0),
    "loss": ("in [0, 1)", lambda x: 0 <= x < 1),
}

# A device gives up a message after this many tries (agents.device.MAX_RETRANSMISSIONS + 1).
_TRIES = 33


def _all_lost(p) -> tuple[str, str] | None:
    """(field, why) when a netem.LinkProfile loses every packet in the long run: the run would fail
    with `upload 0 lost 33 times`. Random loss 1, a Gilbert-Elliott chain whose long-run loss is
    1 (e.g. ge_r 0 with ge_loss_bad 1), or a trace whose loss is 1 everywhere."""
    if p.ge_p > 0:
        bad = p.ge_p / (p.ge_p + p.ge_r)  # stationary share of the bad state (1 when ge_r = 0)
        rate = bad * p.ge_loss_bad + (1 - bad) * p.ge_loss_good
        if rate >= 1:
            field = "ge_loss_good" if p.ge_loss_good >= 1 else "ge_r" if p.ge_r == 0 else "ge_loss_bad"
            return field, (
                f"the Gilbert-Elliott loss (ge_p {p.ge_p:g}, ge_r {p.ge_r:g}, ge_loss_bad "
                f"{p.ge_loss_bad:g}, ge_loss_good {p.ge_loss_good:g}) loses every packet in the long run"
            )
    elif p.loss >= 1:
        return "loss", f"expected a loss probability < 1, got {p.loss!r}"
    trace_loss = getattr(p.trace, "loss", None) if p.trace is not None else None
    if trace_loss and min(trace_loss) >= 1:
        return "trace", f"trace {p.trace.source!r} has loss 1 at every point"
    return None


def _loss_problems(profile, tier: str | None) -> list[tuple[tuple, str]]:
    """One problem per direction of a netem.DuplexProfile that loses every packet."""
    out = []
    for direction in ("uplink", "downlink"):
        hit = _all_lost(getattr(profile, direction))
        if hit:
            field, why = hit
            out.append(
                (
                    (direction, field),
                    f"{why}; every message on this link would be lost and the run would "
                    f"fail after {_TRIES} tries{f' (tier {tier})' if tier else ''}",
                )
            )
    return out


def check_link(v: Any, tier: str | None = None) -> Any:
    netem = _netem()
    if isinstance(v, str):
        if not v.strip():
            raise fail("expected a named link profile (see `testbed links`), got ''")
        if netem is not None:
            try:
                profile = netem.get_profile(v)
            except (KeyError, ValueError) as e:
                known = ", ".join(netem.list_profiles())
                raise fail(f"unknown link profile {v!r} (known: {known})") from e
            lost = _loss_problems(profile, tier)
            if lost:  # a named profile: the problem is the name, the message says which field
                raise fail_many([((), f"profile {v!r}: {'.'.join(sub)}: {msg}") for sub, msg in lost])
        return v
    if not isinstance(v, dict):
        raise fail(
            f"expected a named link profile or {{uplink: {{rate_mbps: .., delay_ms: ..}}, "
            f"downlink: {{..}}}}, got {type(v).__name__}"
        )
    problems: list[tuple[tuple, str]] = []
    for k in v:
        if k not in ("uplink", "downlink"):
            problems.append(((k,), "unknown key; expected uplink and downlink"))
    for direction in ("uplink", "downlink"):
        d = v.get(direction)
        if d is None:
            problems.append(((direction,), "required (a mapping like {rate_mbps: 10, delay_ms: 20})"))
            continue
        if not isinstance(d, dict):
            problems.append(((direction,), f"expected a mapping like {{rate_mbps: 10, delay_ms: 20}}, got {d!r}"))
            continue
        bad = False
        for key, (expected, ok) in _LINK_RULES.items():
            if key not in d:
                continue
            x = d[key]
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                problems.append(((direction, key), f"expected a finite number {expected}, got {x!r}"))
                bad = True
            elif key == "loss" and x == 1:
                problems.append(
                    (
                        (direction, key),
                        f"expected a loss probability < 1, got {x!r}; every message on "
                        f"this link would be lost and the run would fail after {_TRIES} tries"
                        f"{f' (tier {tier})' if tier else ''}",
                    )
                )
                bad = True
            elif not ok(x):
                problems.append(((direction, key), f"expected a number {expected}, got {x!r}"))
                bad = True
        if netem is not None and not bad:
            try:
                netem.LinkProfile.from_dict(d)
            except (ValueError, TypeError, KeyError) as e:
                sub, msg = _split_error(e.args[0] if e.args else str(e), d)
                problems.append(((direction, *sub), msg))
    if not problems and netem is not None:
        try:
            problems += _loss_problems(netem.DuplexProfile.from_dict(v), tier)
        except (ValueError, TypeError, KeyError) as e:
            problems.append(_split_error(e.args[0] if e.args else str(e), v))
    if problems:
        raise fail_many(problems)
    return v


# ---------------------------------------------------------------------------- policies


def _policies():
    try:
        import policies
    except ImportError:
        return None
    return policies if hasattr(policies, "load_policy") else None


def _plain(x: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain YAML-safe Python."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "tolist"):  # numpy scalar or array
        return _plain(x.tolist())
    return x


def _spec_name(v: Any, expected: str) -> str:
    """The name of a plug-in spec (a name, a dotted path, or {name: ..., <params>}), as policies and
    routers are given; fail(expected ...) for any other shape."""
    if isinstance(v, str):
        if not v.strip():
            raise fail(f"{expected}, got ''")
        return v
    if isinstance(v, dict):
        name = v.get("name")
        if not isinstance(name, str) or not name.strip():
            raise fail(f"{expected}: `name` is required", "name")
        return name
    raise fail(f"{expected}, got {type(v).__name__}")


def check_policy(v: Any) -> Any:
    name = _spec_name(v, "expected a preset name (e.g. cu-hlm), {name: <preset>, <params>} or package.module:Class")
    pol = _policies()
    if pol is None:
        return v
    try:
        policy = pol.load_policy(v)
    except pol.PolicyError as e:
        raise fail(str(e)) from e
    # Resolve to {name, every parameter it accepts} so the written scenario pins them (a later
    # change of preset defaults cannot change a repeated run). A policy rejects parameters
    # that have no effect in its configuration, so pin one at a time and keep those accepted;
    # keep the spec as written when the pinned form does not load back to the same policy.
    try:
        params = _plain(policy.params())
        resolved = {"name": name}
        for k, x in params.items():
            if k != "name":
                try:
                    pol.load_policy({**resolved, k: x})
                    resolved[k] = x
                except pol.PolicyError:
                    pass
        if _plain(pol.load_policy(resolved).params()) == params:
            return resolved
    except Exception:  # noqa: BLE001 - any failure means: keep the spec as written
        pass
    return v


# ---------------------------------------------------------------------------- routing


def check_routing(v: Any) -> Any:
    """A routing spec (agents.routing.load_router) that loads; stored as written."""
    _spec_name(
        v, "expected a router name (round-robin, static, jsq), {name: <router>, <params>} or package.module:Class"
    )
    from agents.routing import RoutingError, load_router

    try:
        load_router(v)
    except RoutingError as e:
        raise fail(str(e)) from e
    return v


def check_routes(spec: Any, verifiers: list, tiers: list) -> None:
    """The router of `spec` against this fleet: one representative device per tier (its first id),
    so a static map's keys and targets are checked without expanding the devices."""
    from agents.routing import RoutedDevice, RoutingError, load_router

    devices, first = [], 0
    for t in tiers:
        devices.append(RoutedDevice(first, t.name, t.region))
        first += t.count
    try:
        load_router(spec).check(devices, [slot for slot, _ in verifiers])
    except RoutingError as e:
        raise fail(str(e), "routing") from e


# ---------------------------------------------------------------------------- placement


def device_problem(device: str) -> str | None:
    """Why `device` cannot be used on this machine (None if it can). Imports torch lazily."""
    try:
        from agents.models.hardware import check_device
    except ImportError:
        return None
    return check_device(device)
