"""Scenario files: which models, prompts, fleet, links, policies and server a run uses.

A scenario is a YAML file validated on load into the pydantic models below (issue 3):

    name: smoke
    seed: 7
    clock: virtual                 # virtual | wall
    time_scale: 1.0                # wall clock only: emulated seconds per real second
    models: {slm: tiny, llm: tiny}
    prompts: {source: humaneval, count: 8}     # or {texts: [...]} or {file: prompts.jsonl}
    generation: {max_new_tokens: 32, temperature: 1.0}
    server: {verify_ms: {base: 20.0, per_token: 0.5, per_sequence: 2.0}, max_batch: 8, max_wait_ms: 2.0}
    tiers:
      - {name: phone, count: 6, slm_ms_per_token: 30.0, policy: {name: cu-hlm},
         link: {uplink: {rate_mbps: 2, delay_ms: 20}, downlink: {rate_mbps: 20, delay_ms: 20}}}
      - {name: laptop, count: 2, slm_ms_per_token: 12.0, link: wifi-weak, policy: u-hlm}
    actors: {devices_per_group: 4}
    sweep: {policy: [hlm, u-hlm, cu-hlm]}      # optional: one run per value (expand_sweep)

Every error names the field path (`tiers[1].link.uplink.rate_mbps`), what was expected and,
when the scenario came from a file, the file and line. Links are checked by `netem` (and
refused when they lose every packet) and policies by `policies.load_policy`; what needs the
models, the prompts or this machine (vocabularies, positions, memory, the bind address) is
checked by testbed.preflight, which `testbed validate` and `testbed run` call before anything
starts, so a scenario that validates will not fail mid-run for these reasons.

Public API: load_scenario, parse_scenario, dump_scenario, override, expand_sweep,
sweep_points, devices, device_groups, verify_seconds, bundled_scenarios, ScenarioError.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import functools
import math
import re
import socket
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from testbed.prompts import HUMANEVAL_SIZE

# Names end up as directory names, table columns and Prometheus label values.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Port = Annotated[int, Field(ge=0, le=65535)]

# Sweep/override keys that apply to every tier at once (e.g. `sweep: {policy: [hlm, cu-hlm]}`).
TIER_WIDE_KEYS = ("policy", "link", "slm_ms_per_token", "count")
# CLI-friendly short names for nested fields, used by override().
SHORTCUTS = {
    "devices_per_group": "actors.devices_per_group",
    "max_new_tokens": "generation.max_new_tokens",
    "temperature": "generation.temperature",
    "max_batch": "server.max_batch",
    "max_wait_ms": "server.max_wait_ms",
    "verifier_host": "server.host",
    "verifier_port": "server.port",
    "metrics_port": "metrics.port",
    "metrics_host": "metrics.host",
}


def _fail(message: str, *subpath: str | int) -> PydanticCustomError:
    """A validation error; `subpath` extends the field path below the validated field."""
    return _fail_many([(subpath, message)])


def _fail_many(problems: list[tuple[tuple, str]]) -> PydanticCustomError:
    # pydantic fixes an error's location at the validated field; the formatter reads the
    # deeper sub-paths back out of ctx so errors still name e.g. `link.uplink.rate_mbps`.
    text = "; ".join(m for _, m in problems)
    return PydanticCustomError("scenario", "{message}", {"message": text, "problems": problems})


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- models


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s in (".", "..")


def _agents_models():
    try:
        import agents.models as m  # imports torch: only reached when validating a scenario
    except ImportError:
        return None
    return m if hasattr(m, "parse_spec") else None


def _check_model_spec(v: Any, base_dir: str | None) -> Any:
    expected = ("expected a model: a bundled pair member like qwen2.5-coder:slm, a Hugging Face id, "
                "a local folder, tiny (tiny:slm, tiny:llm), or {kind: tiny, <params>}")
    if isinstance(v, str):
        if not v or v != v.strip() or any(c.isspace() for c in v):
            raise _fail(f"{expected}, got {v!r}")
        if _looks_like_path(v):  # a local folder: absolute, so a dumped scenario still finds it
            v = str((Path(base_dir or ".") / Path(v).expanduser()).resolve())
    elif isinstance(v, dict):
        if v.get("kind") != "tiny":
            raise _fail(f"expected kind: tiny, got {v.get('kind')!r}", "kind")
        v = dict(v)
    else:
        raise _fail(f"{expected}, got {type(v).__name__}")
    models = _agents_models()
    if models is not None and isinstance(v, dict) and hasattr(models, "TinyConfig"):
        known = [f.name for f in dataclasses.fields(models.TinyConfig)]
        unknown = [k for k in v if k != "kind" and k not in known]
        if unknown:
            raise _fail_many([((k,), f"unknown tiny model parameter; expected one of: {', '.join(known)}")
                              for k in unknown])
    if models is not None:
        try:
            models.parse_spec(v)
        except models.ModelError as e:
            sub, msg = _split_error(str(e), v if isinstance(v, dict) else {})
            raise _fail(msg, *sub) from e
    return v


class Models(_Config):
    """The SLM drafts on every device; the LLM verifies on the server (same tokenizer).
    Each: a pair member (qwen2.5-coder:slm), a Hugging Face id, a local folder, tiny, or
    {kind: tiny, vocab_size: .., layers: .., ...} (agents.models.TinyConfig)."""

    slm: str | dict[str, Any]
    llm: str | dict[str, Any]
    # auto: what the hardware runs fastest (agents.hardware.auto_dtype; a measured probe on CPU).
    # A run writes the dtype it resolved into its scenario.yaml, so a rerun elsewhere can pin it.
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"

    @field_validator("slm", "llm", mode="before")
    @classmethod
    def _check(cls, v: Any, info: ValidationInfo) -> Any:
        # A tiny model without a role takes the role of its slot, so {slm: tiny, llm: tiny}
        # is the correlated pair (the SLM a perturbed copy of the LLM), not one model twice.
        if v == "tiny":
            v = f"tiny:{info.field_name}"
        elif isinstance(v, dict) and v.get("kind") == "tiny" and "role" not in v:
            v = {**v, "role": info.field_name}
        return _check_model_spec(v, (info.context or {}).get("base_dir"))


# ---------------------------------------------------------------------------- prompts


class Prompts(_Config):
    """Where prompts come from. `count`/`offset` take a slice of any source (count None = all).
    Device i gets prompt i mod n (testbed.prompts.prompt_index)."""

    source: Literal["humaneval", "texts", "file"] = "humaneval"
    count: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    texts: list[str] | None = None
    file: str | None = None  # JSONL, one {"prompt": ...} per line; relative to the scenario file

    @model_validator(mode="before")
    @classmethod
    def _infer_source(cls, d: Any) -> Any:
        # `{texts: [...]}` and `{file: x}` are shorthands; the resolved form names the source.
        if isinstance(d, dict) and "source" not in d:
            given = [k for k in ("texts", "file") if k in d]
            if len(given) == 1:
                d = {"source": given[0], **d}
        return d

    @field_validator("texts")
    @classmethod
    def _check_texts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise _fail("expected at least one prompt text")
            empty = [((i,), "expected a non-empty prompt text") for i, t in enumerate(v) if not t.strip()]
            if empty:
                raise _fail_many(empty)
        return v

    @field_validator("file")
    @classmethod
    def _resolve_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        base = Path((info.context or {}).get("base_dir") or ".")
        path = (base / Path(v).expanduser()).resolve()  # absolute, so a dumped scenario still finds it
        if not path.is_file():
            raise _fail(f"prompt file not found: {path}")
        return str(path)

    @model_validator(mode="after")
    def _check_source(self) -> "Prompts":
        wrong = [k for k in ("texts", "file") if getattr(self, k) is not None and k != self.source]
        if wrong:
            raise _fail(f"source is {self.source}: remove {', '.join(wrong)} "
                        f"(give exactly one of source: humaneval, texts or file)", wrong[0])
        if self.source in ("texts", "file") and getattr(self, self.source) is None:
            raise _fail(f"source is {self.source}: `{self.source}` is required", self.source)
        size = HUMANEVAL_SIZE if self.source == "humaneval" else len(self.texts or []) if self.source == "texts" else None
        if size is not None:
            if self.offset >= size:
                raise _fail(f"expected offset < {size} ({self.source} has {size} prompts), got {self.offset}", "offset")
            if self.count is not None and self.offset + self.count > size:
                raise _fail(f"expected offset + count <= {size} ({self.source} has {size} prompts), "
                            f"got {self.offset} + {self.count}", "count")
        return self


# ---------------------------------------------------------------------------- server


class Generation(_Config):
    max_new_tokens: int = Field(32, ge=1)
    temperature: PositiveFloat = 1.0  # T in x = softmax(z / T); > 0 (speculative sampling needs a distribution)


class VerifyTime(_Config):
    """Emulated time of one verifier batch in milliseconds; see verify_seconds()."""

    base: NonNegativeFloat = 20.0
    per_token: NonNegativeFloat = 0.5
    per_sequence: NonNegativeFloat = 2.0


class Server(_Config):
    verify_ms: VerifyTime = VerifyTime()
    max_batch: int = Field(8, ge=1)  # sequences per verifier batch
    max_wait_ms: NonNegativeFloat = 2.0  # how long the first request of a batch may wait for more
    host: str = Field("127.0.0.1", min_length=1)  # ZeroMQ ROUTER bind address; on a cluster the node address
    port: Port = 0  # 0 = any free port
    # ZeroMQ CURVE on the verifier socket (agents.security): auto = on whenever it binds off
    # loopback (so with --address); off is refused off loopback.
    curve: Literal["auto", "on", "off"] = "auto"

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        why = host_problem(v)
        if why:
            raise _fail(why)
        return v

    @model_validator(mode="after")
    def _check_curve(self) -> "Server":
        from agents.security import curve_on

        try:
            curve_on(self.curve, self.host)
        except ValueError as e:
            raise _fail(str(e), "curve")
        return self

    def profile(self):
        """The verifier's agents.verifier.ServerProfile (it owns the time model)."""
        from agents.verifier import ServerProfile

        v = self.verify_ms
        return ServerProfile(v.base, v.per_token, v.per_sequence, self.max_batch, self.max_wait_ms)


# A DNS host name: labels of letters, digits and inner hyphens. Checked before any lookup, so
# text like "not a host" is refused without asking a resolver.
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


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


def verify_seconds(server: Server | VerifyTime, batch_size: int, n_tokens: int) -> float:
    """Emulated seconds the LLM takes to verify one batch (DESIGN.md section 2: time from profiles):
    (base + per_token * n_tokens + per_sequence * batch_size) / 1000, as ServerProfile.verify_seconds
    defines it. batch_size: sequences in the batch; n_tokens: token positions the LLM forward
    processes, summed over the batch (each draft plus the skipped tokens piggybacked on it)."""
    if isinstance(server, VerifyTime):
        server = Server(verify_ms=server)
    return server.profile().verify_seconds(batch_size, n_tokens)


# ---------------------------------------------------------------------------- links


def _netem():
    try:
        import netem
    except ImportError:
        return None
    return netem if hasattr(netem, "LinkProfile") else None  # until the netem issue lands


def _policies():
    try:
        import policies
    except ImportError:
        return None
    return policies if hasattr(policies, "load_policy") else None


def _split_error(message: str, d: dict) -> tuple[tuple, str]:
    """(sub-path, message) of an error about a key of `d`: netem writes "key: what was expected";
    otherwise the key of `d` named first in the message (agents.models style)."""
    m = re.match(r"^([\w.-]+): (.*)$", message, re.S)
    if m and m.group(1).split(".")[0] in d:
        return tuple(m.group(1).split(".")), m.group(2)
    hits = [(mm.start(), -len(k), k) for k in d for mm in [re.search(rf"(?<![\w]){re.escape(str(k))}(?![\w])", message)] if mm]
    return ((min(hits)[2],) if hits else ()), message


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
            return field, (f"the Gilbert-Elliott loss (ge_p {p.ge_p:g}, ge_r {p.ge_r:g}, ge_loss_bad "
                           f"{p.ge_loss_bad:g}, ge_loss_good {p.ge_loss_good:g}) loses every packet in the long run")
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
            out.append(((direction, field), f"{why}; every message on this link would be lost and the run would "
                                             f"fail after {_TRIES} tries{f' (tier {tier})' if tier else ''}"))
    return out


def _check_link(v: Any, tier: str | None = None) -> Any:
    netem = _netem()
    if isinstance(v, str):
        if not v.strip():
            raise _fail("expected a named link profile (see `testbed links`), got ''")
        if netem is not None:
            try:
                profile = netem.get_profile(v)
            except (KeyError, ValueError) as e:
                known = ", ".join(netem.list_profiles())
                raise _fail(f"unknown link profile {v!r} (known: {known})") from e
            lost = _loss_problems(profile, tier)
            if lost:  # a named profile: the problem is the name, the message says which field
                raise _fail_many([((), f"profile {v!r}: {'.'.join(sub)}: {msg}") for sub, msg in lost])
        return v
    if not isinstance(v, dict):
        raise _fail(f"expected a named link profile or {{uplink: {{rate_mbps: .., delay_ms: ..}}, "
                    f"downlink: {{..}}}}, got {type(v).__name__}")
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
                problems.append(((direction, key), f"expected a loss probability < 1, got {x!r}; every message on "
                                 f"this link would be lost and the run would fail after {_TRIES} tries"
                                 f"{f' (tier {tier})' if tier else ''}"))
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
            problems.append((_split_error(e.args[0] if e.args else str(e), v)))
    if problems:
        raise _fail_many(problems)
    return v


def resolve_link(spec: str | dict):
    """The netem profile object for a tier's link spec (a named profile or {uplink, downlink})."""
    import netem

    return netem.get_profile(spec) if isinstance(spec, str) else netem.DuplexProfile.from_dict(spec)


# ---------------------------------------------------------------------------- policies


def _plain(x: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain YAML-safe Python."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "tolist"):  # numpy scalar or array
        return _plain(x.tolist())
    return x


def _check_policy(v: Any) -> Any:
    expected = "expected a preset name (e.g. cu-hlm), {name: <preset>, <params>} or package.module:Class"
    if isinstance(v, str):
        if not v.strip():
            raise _fail(f"{expected}, got ''")
        name = v
    elif isinstance(v, dict):
        name = v.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(f"{expected}: `name` is required", "name")
    else:
        raise _fail(f"{expected}, got {type(v).__name__}")
    pol = _policies()
    if pol is None:
        return v
    try:
        policy = pol.load_policy(v)
    except pol.PolicyError as e:
        raise _fail(str(e)) from e
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


def policy_name(spec: str | dict) -> str:
    """The label of a policy spec (tokens table `policy` column, metrics label)."""
    return spec if isinstance(spec, str) else str(spec["name"])


# ---------------------------------------------------------------------------- fleet


class Tier(_Config):
    """`count` identical devices: same SLM speed, link profile and policy."""

    name: Name
    count: int = Field(ge=1)
    slm_ms_per_token: PositiveFloat  # emulated SLM step per token on this device class
    link: str | dict[str, Any]  # named netem profile or {uplink: {...}, downlink: {...}}
    policy: str | dict[str, Any] = "cu-hlm"

    @field_validator("link", mode="before")
    @classmethod
    def _link(cls, v: Any, info: ValidationInfo) -> Any:
        return _check_link(v, info.data.get("name"))  # name is validated first: messages name the tier

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> Any:
        return _check_policy(v)


class Actors(_Config):
    devices_per_group: int = Field(4, ge=1)  # virtual devices per DeviceGroup actor (one SLM copy each)
    # torch threads per actor. 1 by default: actors share the machine's cores, and spinning
    # OpenMP threads of several processes on too few cores slow every forward down many times.
    group_threads: int = Field(1, ge=1)
    # One batched SLM forward per group step (prompts included) instead of one per device. Exact
    # with the packed forward (agents.lm: a session's logits do not depend on its batch); set
    # false for a model on the hf forward, whose rounding depends on the batch.
    batch_slm: bool = True
    verifier_threads: int = Field(1, ge=1)
    # Actor restarts a run may make, over all actors (a dead group or verifier is rebuilt by
    # deterministic replay, testbed.runner._run_ray); past it the run stops with its partial results.
    max_restarts: int = Field(3, ge=0)
    # No new rows and no verifier batch for this long: the run ends, naming the sessions that hold
    # it up (testbed.runner._run_ray). 0 = never.
    stall_timeout_s: NonNegativeFloat = 120.0
    # Placement: where the verifier's LLM and the groups' SLMs compute (cpu, cuda, cuda:N), and the
    # Ray GPU resources each actor asks for (fractional for groups: several share one GPU).
    verifier_device: str = "cpu"
    group_device: str = "cpu"
    verifier_gpus: float = Field(0.0, ge=0.0)
    group_gpus: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check_placement(self) -> "Actors":
        problems = []
        for role in ("verifier", "group"):
            device, gpus = getattr(self, f"{role}_device"), getattr(self, f"{role}_gpus")
            if device != "cpu" and (why := _device_problem(device)):
                problems.append(((f"{role}_device",), why))
            if device.startswith("cuda") and gpus == 0:
                problems.append(((f"{role}_gpus",), f"{role}_device is {device}: ask Ray for a GPU share "
                                 f"(e.g. {role}_gpus: {1 if role == 'verifier' else 0.25})"))
            if device == "cpu" and gpus > 0:
                problems.append(((f"{role}_gpus",), f"{role}_gpus > 0 but {role}_device is cpu"))
        if self.verifier_gpus > 1 and self.verifier_gpus != int(self.verifier_gpus):
            problems.append((("verifier_gpus",), "more than one GPU must be a whole number"))
        if problems:
            raise _fail_many(problems)
        return self


def _device_problem(device: str) -> str | None:
    """Why `device` cannot be used on this machine (None if it can). Imports torch lazily."""
    try:
        from agents.hardware import check_device
    except ImportError:
        return None
    return check_device(device)


class Metrics(_Config):
    port: Port | None = None  # Prometheus exporter port; None = no exporter, 0 = any free port
    host: str = Field("127.0.0.1", min_length=1)


class Scenario(_Config):
    name: Name
    seed: int = Field(0, ge=0, le=2**32 - 1)
    clock: Literal["virtual", "wall"] = "virtual"
    time_scale: PositiveFloat = 1.0  # wall clock only: emulated seconds per real second
    address: str | None = Field(None, min_length=1)  # Ray cluster to join (e.g. auto, host:6379); None = local Ray
    models: Models
    prompts: Prompts = Prompts()
    generation: Generation = Generation()
    server: Server = Server()
    tiers: list[Tier] = Field(min_length=1)
    actors: Actors = Actors()
    metrics: Metrics = Metrics()
    sweep: dict[str, list[Any]] | None = None  # key -> values; one run per combination

    @model_validator(mode="after")
    def _check_tier_names(self) -> "Scenario":
        seen: dict[str, int] = {}
        for i, t in enumerate(self.tiers):
            if t.name in seen:
                raise _fail(f"duplicate tier name {t.name!r} (also tiers[{seen[t.name]}]); names must be unique",
                            "tiers", i, "name")
            seen[t.name] = i
        return self

    @model_validator(mode="after")
    def _check_sweep(self) -> "Scenario":
        if not self.sweep:
            return self
        problems = []
        for key, values in self.sweep.items():
            if not values:
                problems.append((("sweep", key), "expected a non-empty list of values"))
                continue
            for i, value in enumerate(values):
                try:
                    parse_scenario(_apply({**self.resolved_dict(), "sweep": None}, key, value, self))
                except ScenarioError as e:
                    problems += [(("sweep", key, i), f"{p.path}: {p.message}") for p in e.problems]
                except KeyError as e:
                    problems.append((("sweep", key), e.args[0]))
                    break
        if problems:
            raise _fail_many(problems)
        return self

    def resolved_dict(self) -> dict:
        """The scenario with every default filled in, as plain YAML-safe data."""
        return self.model_dump(mode="json")

    @property
    def n_devices(self) -> int:
        return sum(t.count for t in self.tiers)


# ---------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    path: str  # e.g. tiers[1].link.uplink.rate_mbps ("" = the whole document)
    message: str
    line: int | None = None  # 1-based line in `source`, when known


class ScenarioError(ValueError):
    """Everything wrong with a scenario, each problem with its field path (and file:line)."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__(self._text())

    def _text(self) -> str:
        n = len(self.problems)
        head = f"invalid scenario{' ' + self.source if self.source else ''}: {n} problem{'s' * (n != 1)}"
        lines = []
        for p in self.problems:
            where = f"{self.source}:{p.line}: " if self.source and p.line else ""
            lines.append(f"  {where}{p.path + ': ' if p.path else ''}{p.message}")
        return "\n".join([head, *lines])


def format_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _unwrap(t: Any) -> Any:
    """X from X | None, Annotated[X, ...]."""
    while True:
        if typing.get_origin(t) is Annotated:
            t = typing.get_args(t)[0]
        elif typing.get_origin(t) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(t) if a is not type(None)]
            if len(args) != 1:
                return t
            t = args[0]
        else:
            return t


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the model at `loc` (for 'unknown field' messages)."""
    t: Any = Scenario
    for part in loc:
        t = _unwrap(t)
        if isinstance(part, int) and typing.get_origin(t) is list:
            t = typing.get_args(t)[0]
        elif isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            t = t.model_fields[part].annotation
        else:
            return []
    t = _unwrap(t)
    return list(t.model_fields) if isinstance(t, type) and issubclass(t, BaseModel) else []


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


_MESSAGES = {
    "missing": lambda c: "required field missing",
    "greater_than": lambda c: f"expected a value > {_n(c['gt'])}",
    "greater_than_equal": lambda c: f"expected a value >= {_n(c['ge'])}",
    "less_than": lambda c: f"expected a value < {_n(c['lt'])}",
    "less_than_equal": lambda c: f"expected a value <= {_n(c['le'])}",
    "int_parsing": lambda c: "expected an integer",
    "int_type": lambda c: "expected an integer",
    "int_from_float": lambda c: "expected an integer",
    "float_parsing": lambda c: "expected a number",
    "float_type": lambda c: "expected a number",
    "finite_number": lambda c: "expected a finite number",
    "string_type": lambda c: "expected a string",
    "list_type": lambda c: "expected a list",
    "dict_type": lambda c: "expected a mapping",
    "model_type": lambda c: "expected a mapping",
    "model_attributes_type": lambda c: "expected a mapping",
    "too_short": lambda c: f"expected at least {c['min_length']} item(s)",
    "string_too_short": lambda c: "expected a non-empty string",
    "literal_error": lambda c: f"expected one of {c['expected']}",
    "string_pattern_mismatch": lambda c: "expected a name of letters, digits and . _ - = + (starting with a letter or digit)",
}


def _problems(err: ValidationError, lines: dict[str, int] | None = None, prefix: tuple = ()) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        ctx = e.get("ctx") or {}
        if e["type"] == "scenario":
            items = [(loc + tuple(sub), msg) for sub, msg in ctx["problems"]]
        elif e["type"] == "extra_forbidden":
            fields = _fields_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            items = [(loc, f"unknown field{hint}; expected one of: {', '.join(fields)}" if fields else "unknown field")]
        else:
            msg = _MESSAGES[e["type"]](ctx) if e["type"] in _MESSAGES else e["msg"]
            x = e.get("input")
            if e["type"] != "missing" and (x is None or isinstance(x, (str, int, float, bool))):
                msg += f", got {x!r}"
            items = [(loc, msg)]
        for parts, msg in items:
            path = format_path(parts)
            out.append(Problem(path, msg, _line_of(path, lines)))
    return out


def _line_of(path: str, lines: dict[str, int] | None) -> int | None:
    """Line of `path` in the YAML, or of its nearest ancestor that is written there."""
    if not lines:
        return None
    while path:
        if path in lines:
            return lines[path]
        path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path) if re.search(r"(\.|\[)", path) else ""
    return lines.get("")


# ---------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _line_index(node, path: str = "", out: dict | None = None) -> dict[str, int]:
    """Field path -> 1-based line, from the YAML node tree."""
    out = {} if out is None else out
    if node is None:
        return out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            sub = f"{path}.{k.value}" if path else str(k.value)
            out[sub] = k.start_mark.line + 1
            _line_index(v, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_index(v, f"{path}[{i}]", out)
    return out


def read_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML text -> (data, field path -> line). Syntax errors name file and line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        col = f", column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e)
        ctx = getattr(e, "context", None)
        raise ScenarioError([Problem("", f"YAML syntax error{' at line ' + str(line) + col if line else ''}: "
                                         f"{what}{' (' + ctx + ')' if ctx else ''}", line)], source) from None
    finally:
        loader.dispose()
    return data, _line_index(node)


def bundled_dir() -> Path:
    return Path(str(resources.files("testbed") / "scenarios"))


def bundled_scenarios() -> list[str]:
    """Names of the scenarios shipped with the package (testbed/scenarios/<name>.yaml)."""
    return sorted(p.stem for p in bundled_dir().glob("*.yaml"))


def scenario_path(path_or_name: str | Path) -> Path:
    """A file path, or a bundled name resolved to testbed/scenarios/<name>.yaml."""
    p = Path(path_or_name).expanduser()
    looks_like_file = isinstance(path_or_name, Path) or p.suffix in (".yaml", ".yml") or len(p.parts) > 1
    if looks_like_file or p.is_file():
        if not p.is_file():
            raise ScenarioError([Problem("", f"file not found: {p}")], str(path_or_name))
        return p
    bundled = bundled_dir() / f"{path_or_name}.yaml"
    if bundled.is_file():
        return bundled
    raise ScenarioError([Problem("", f"no scenario file or bundled scenario named {str(path_or_name)!r} "
                                     f"(bundled: {', '.join(bundled_scenarios())})")])


def parse_scenario(data: Any, *, source: str | None = None, base_dir: str | Path | None = None,
                   lines: dict[str, int] | None = None) -> Scenario:
    """Validate already-parsed data. Relative prompt files resolve against base_dir (default: cwd)."""
    if not isinstance(data, dict):
        got = "an empty document" if data is None else type(data).__name__
        raise ScenarioError([Problem("", f"expected a mapping of scenario fields, got {got}", 1 if lines else None)],
                            source)
    try:
        return Scenario.model_validate(data, context={"base_dir": str(base_dir) if base_dir else None})
    except ValidationError as e:
        raise ScenarioError(_problems(e, lines), source) from None


def load_scenario(path_or_name: str | Path) -> Scenario:
    """Load and validate a scenario file or a bundled scenario by name (see bundled_scenarios())."""
    path = scenario_path(path_or_name)
    source = str(path_or_name) if path.parent == bundled_dir() else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError([Problem("", f"cannot read: {e}")], source) from None
    data, lines = read_yaml(text, source)
    return parse_scenario(data, source=source, base_dir=path.parent, lines=lines)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, text: str):
    # Prompts are code: write multi-line strings as literal blocks, readable and exact.
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def scenario_yaml(s: Scenario) -> str:
    """The fully resolved scenario as YAML text."""
    return yaml.dump(s.resolved_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def dump_scenario(s: Scenario, path: str | Path) -> Path:
    """Write the fully resolved scenario (defaults filled); load_scenario(path) == s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved hlm-testbed scenario: every default filled in; `testbed run` this file to repeat the run.\n"
    path.write_text(header + scenario_yaml(s), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- overrides and sweeps


def _apply(d: dict, key: str, value: Any, s: Scenario) -> dict:
    """Set `key` in a resolved dict: a tier-wide key (policy, link, ...), tiers.<tier>.<field>,
    a shortcut (devices_per_group, ...) or a dotted path (generation.temperature)."""
    key = SHORTCUTS.get(key, key)
    if key in TIER_WIDE_KEYS:
        for t in d["tiers"]:
            t[key] = value
        return d
    parts = key.split(".")
    if parts[0] == "tiers":
        names = [t.name for t in s.tiers]
        if len(parts) != 3 or parts[1] not in names:
            raise KeyError(f"unknown key {key!r}: expected tiers.<tier name>.<field>, tier names: {', '.join(names)}")
        parts = ["tiers", names.index(parts[1]), parts[2]]
    if parts[0] in ("name", "sweep"):
        raise KeyError(f"{key!r} cannot be overridden or swept")
    allowed = _fields_at(tuple(parts[:-1]))
    if parts[-1] not in allowed:
        raise KeyError(f"unknown key {key!r}: expected {', '.join(TIER_WIDE_KEYS)}, tiers.<tier>.<field>, "
                       f"{', '.join(SHORTCUTS)} or a dotted field path (e.g. generation.temperature)")
    node = d
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return d


def override(s: Scenario, changes: dict[str, Any] | None = None, /, **kw: Any) -> Scenario:
    """A copy of `s` with fields replaced and re-validated: override(s, clock="wall", address=None).
    Keys as in _apply: clock, seed, address, devices_per_group, metrics_port, policy (all tiers),
    "tiers.phone.count", "server.max_batch", ... A None value means "leave unchanged" (CLI options)."""
    d = s.resolved_dict()
    for key, value in {**(changes or {}), **kw}.items():
        if value is None:
            continue
        try:
            _apply(d, key, value, s)
        except KeyError as e:
            raise ScenarioError([Problem(key, e.args[0])], "override") from None
    return parse_scenario(d, source="override")


def _label(key: str, value: Any, index: int) -> str:
    leaf = key.split(".")[-1]
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict) and isinstance(value.get("name"), str):
        params = [f"{k}={v}" for k, v in value.items() if k != "name" and isinstance(v, (str, int, float, bool))]
        text = "-".join([value["name"], *params])
    elif isinstance(value, (int, float, bool)):
        text = f"{leaf}={value}"
    else:
        text = f"{leaf}{index}"
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def sweep_points(s: Scenario) -> list[dict[str, Any]]:
    """The {key: value} combination of each run of expand_sweep(s), in the same order."""
    if not s.sweep:
        return [{}]
    keys = list(s.sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(s.sweep[k] for k in keys))]


def expand_sweep(s: Scenario) -> list[Scenario]:
    """One scenario per combination of `sweep` values (cartesian product, keys in file order),
    each named <name>-<labels> (e.g. paper-hlm, paper-u-hlm) and without `sweep`."""
    if not s.sweep:
        return [s]
    runs, names = [], set()
    for point in sweep_points(s):
        d = {**s.resolved_dict(), "sweep": None}
        labels = []
        for key, value in point.items():
            _apply(d, key, value, s)
            labels.append(_label(key, value, s.sweep[key].index(value)))
        name = f"{s.name}-{'-'.join(labels)}"[:200]
        if name in names:
            name = f"{name[:190]}-{len(runs)}"
        names.add(name)
        d["name"] = name
        runs.append(parse_scenario(d, source=f"{s.name} sweep"))
    return runs


# ---------------------------------------------------------------------------- devices


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One emulated device. Ids run 0..N-1 over tiers in file order (stable across layouts)."""

    device_id: int
    tier: str
    slm_ms_per_token: float
    link: str | dict  # netem spec; resolve_link(spec) gives the profile object
    policy_spec: str | dict  # policies.load_policy(spec)

    @property
    def policy(self) -> str:
        return policy_name(self.policy_spec)


def devices(s: Scenario) -> list[DeviceSpec]:
    """Expand tiers into devices: tier 0's devices get ids 0..count-1, then tier 1's, ..."""
    out: list[DeviceSpec] = []
    for t in s.tiers:
        out += [DeviceSpec(len(out) + i, t.name, t.slm_ms_per_token, t.link, t.policy) for i in range(t.count)]
    return out


def device_groups(s: Scenario) -> list[list[DeviceSpec]]:
    """Devices chunked in id order into DeviceGroup actors of actors.devices_per_group each."""
    ds, n = devices(s), s.actors.devices_per_group
    return [ds[i:i + n] for i in range(0, len(ds), n)]
