"""Finding a policy by spec (docs/design.md section 4): a bad spec fails here, at load time, with
a PolicyError naming the spec and the reason, never in the middle of a run.

A spec is
- a name: a preset (policies.policy.PRESETS, policies.adaptive.ADAPTIVE_PRESETS), a name given
  to register_policy, or an entry point in the group `hlm_testbed.policies` (looked up in that order);
- a dotted path `package.module:ClassName` (a Policy subclass, or a factory returning a
  Policy);
- a dict {name: <one of the above>, <param>: <value>, ...};
- a Policy instance (returned as is).

Parameters go to the preset, or as keyword arguments to the class/factory. `context` (what
the runner knows, e.g. `calibration`) is passed only to factories that name it in their
signature; presets use `calibration` for the offline k*.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from policies.adaptive import ADAPTIVE_PRESETS, AdaptivePreset
from policies.base import Policy
from policies.policy import PRESETS, Preset

# Built-in names: the HybridPolicy presets and the presets of other built-in policies
# (cu-hlm-adaptive, policies.adaptive); each has description, param_defaults() and build().
BUILTIN: dict[str, Preset | AdaptivePreset] = {**PRESETS, **ADAPTIVE_PRESETS}

ENTRY_POINT_GROUP = "hlm_testbed.policies"


class PolicyError(ValueError):
    """A policy spec that cannot be loaded; the message names the spec and the reason."""

    def __init__(self, spec: Any, reason: str):
        self.spec = spec
        self.reason = reason
        super().__init__(f"policy {spec!r}: {reason}")

    def __reduce__(self) -> tuple[type[PolicyError], tuple[Any, str]]:  # picklable across Ray actors
        return (PolicyError, (self.spec, self.reason))


@dataclass(frozen=True)
class _Registered:
    factory: Callable[..., Policy]
    description: str


_REGISTRY: dict[str, _Registered] = {}


def register_policy(
    name: str, factory: Callable[..., Policy], *, description: str | None = None, replace: bool = False
) -> None:
    """Make `factory(**params)` (a Policy subclass or a function returning a Policy)
    loadable as `name`. Preset names cannot be taken; re-registering needs replace=True."""
    if not isinstance(name, str) or not name or ":" in name:
        raise PolicyError(name, "a registered name must be a non-empty string without ':'")
    if name in BUILTIN:
        raise PolicyError(name, "is a built-in preset and cannot be re-registered")
    if name in _REGISTRY and not replace:
        raise PolicyError(name, "is already registered (pass replace=True to replace it)")
    if not callable(factory):
        raise PolicyError(name, f"factory {factory!r} is not callable")
    doc = description if description is not None else (inspect.getdoc(factory) or "").split("\n")[0]
    _REGISTRY[name] = _Registered(factory, doc)


def unregister_policy(name: str) -> None:
    _REGISTRY.pop(name, None)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_names() -> list[str]:
    return [*BUILTIN, *sorted(_REGISTRY), *sorted(set(_entry_points()) - set(BUILTIN) - set(_REGISTRY))]


def _factory_params(factory: Callable[..., Policy]) -> dict[str, Any]:
    """Documented defaults of a factory's keyword parameters (for listings)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}
    return {
        n: (None if p.default is inspect.Parameter.empty else p.default)
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def policy_catalog() -> dict[str, Any]:
    """{"presets": {name: {"description", "params"}}} for presets and registered policies;
    entry points are listed by target without importing them."""
    presets: dict[str, dict[str, Any]] = {
        n: {"description": p.description, "params": p.param_defaults()} for n, p in BUILTIN.items()
    }
    for n, r in sorted(_REGISTRY.items()):
        presets[n] = {"description": r.description, "params": _factory_params(r.factory)}
    eps = {n: ep.value for n, ep in sorted(_entry_points().items()) if n not in presets}
    return {"presets": presets, "entry_points": eps}


def _import_target(spec: Any, path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PolicyError(spec, f"a dotted path must look like package.module:ClassName, got {path!r}")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of the plugin is the spec's fault
        raise PolicyError(spec, f"cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise PolicyError(spec, f"module {module_name!r} has no attribute {attr!r}") from e
    return obj


def _instantiate(spec: Any, target: Any, params: dict[str, Any], context: dict[str, Any]) -> Policy:
    """A Policy from a loaded target: a Policy subclass or a factory, called with params (+
    the context entries its signature names); a Policy instance as is (no params)."""
    if isinstance(target, Policy):
        if params:
            raise PolicyError(
                spec, f"{target!r} is a Policy instance and takes no parameters (got {', '.join(params)})"
            )
        return target
    if inspect.isclass(target) and not issubclass(target, Policy):
        raise PolicyError(spec, f"{target.__module__}.{target.__qualname__} is not a policies.base.Policy subclass")
    if not callable(target):
        raise PolicyError(spec, f"{target!r} is neither a Policy subclass nor a factory")
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        ps = sig.parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in ps.values())
        named = {n for n, p in ps.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = sorted(set(params) - named) if not takes_any else []
        if unknown:
            raise PolicyError(
                spec, f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(sorted(named)) or 'none'}"
            )
        extra = {n: v for n, v in context.items() if n in named and n not in params}
    else:
        extra = {}
    try:
        obj = target(**params, **extra)
    except PolicyError:
        raise
    except Exception as e:
        raise PolicyError(spec, f"construction failed: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Policy):
        raise PolicyError(spec, f"factory returned {type(obj).__name__}, not a policies.base.Policy")
    return obj


def load_policy(spec: Any, **context: Any) -> Policy:
    """The Policy a spec names (see the module docstring); PolicyError for any bad spec."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, dict):
        if "name" not in spec:
            raise PolicyError(spec, "a policy mapping needs a 'name' key")
        name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    elif isinstance(spec, str):
        name, params = spec, {}
    elif inspect.isclass(spec):
        return _instantiate(spec, spec, {}, context)
    else:
        raise PolicyError(spec, f"a spec must be a name, a dotted path or a mapping, not {type(spec).__name__}")
    if not isinstance(name, str) or not name:
        raise PolicyError(spec, f"the name must be a non-empty string, got {name!r}")

    if name in BUILTIN:
        try:
            return BUILTIN[name].build(params, calibration=context.get("calibration"))
        except Exception as e:
            raise PolicyError(spec, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}") from e
    if name in _REGISTRY:
        return _instantiate(spec, _REGISTRY[name].factory, params, context)
    eps = _entry_points()
    if name in eps:
        try:
            target = eps[name].load()
        except Exception as e:
            raise PolicyError(
                spec, f"entry point {name} = {eps[name].value} failed to load: {type(e).__name__}: {e}"
            ) from e
        return _instantiate(spec, target, params, context)
    if ":" in name:
        return _instantiate(spec, _import_target(spec, name), params, context)
    raise PolicyError(
        spec, f"unknown policy {name!r}; known: {', '.join(known_names())} (or a dotted path package.module:ClassName)"
    )
