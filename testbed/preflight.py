"""Checks a scenario must pass before a run starts anything or writes anything (issue 11).

The schema (testbed.scenario) checks each field on its own: links (loss < 1 included), policies,
the server host's form. `preflight` adds what needs the models, the prompts or this machine:

- the SLM and LLM vocabularies agree (the verifier compares their distributions token by token);
- every prompt file line reads, and every prompt a device gets tokenizes to ids < |V|;
- prompt + generation.max_new_tokens fits both models' positions (a longer one fails mid-run);
- the run fits in memory (estimate_memory; figures below);
- for a local Ray run, server.host is an address of this machine and server.port is free.

Model facts come from the model configs and tokenizers (agents.models.model_facts), never from
weights, so `testbed validate` stays quick. `testbed validate` and `testbed run` both call it;
`testbed.run.plan` calls it first, so nothing is expanded per device before it passes.
"""

from __future__ import annotations

import functools
import json
import math
import socket
from dataclasses import dataclass
from typing import Any

from testbed.scenario import Problem, Scenario, ScenarioError, override

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Memory of a run, measured with tiny models (2 layers, |V| 512) on the virtual clock, peak RSS
# summed over the driver and every actor (issue 11). Ray engine, 4 groups: 64 -> 512 devices at 16
# tokens added 240 KB per device; 16 -> 48 tokens at 512 devices added 5.3 KB per device and token
# (the token rows, held by the group, the driver's sinks, the replay and the table). The local
# engine: 182 KB per device at 16 tokens, 4.9 KB per device and token. Planning alone: 0.5 KB per
# device. Of the 240 KB, the two tiny KV caches are ~64 KB (computed below for any model), so:
DEVICE_BYTES = 128 * KiB  # per device, besides its KV caches and its rows (measured ~96 KB)
TOKEN_BYTES = 8 * KiB  # per device and generated token (measured 5.3 KB)
ACTOR_BYTES = 320 * MiB  # per actor process: Ray worker + torch + a tiny model (measured 280-310 MiB anonymous)
USABLE = 0.9  # share of MemAvailable a run may plan to use
# With these figures a 24 GiB machine (~21 GiB usable) holds ~28,000 tiny-model devices at 64
# tokens, plus 320 MiB per DeviceGroup actor: 10,000 devices in groups of 500 need ~13.6 GiB.


@dataclass(frozen=True)
class Checked:
    """What preflight learned, reused by plan: the tokenized prompts and both models' facts."""

    prompts: list  # testbed.prompts.Prompt, with token_ids
    vocab_size: int
    slm: dict[str, int]  # agents.models.model_facts
    llm: dict[str, int]


def preflight(s: Scenario, *, engine: str = "ray", address: str | None = None, source: str | None = None) -> Checked:
    """Check `s` for everything that would otherwise fail at run time; raise ScenarioError listing
    every problem (field path, the figures, what to change). `engine`/`address` as in RunOptions:
    with a cluster address the actors' memory and the bind address are the cluster's, not ours."""
    from agents.models import ModelError, model_facts
    from testbed.prompts import PromptError, load_prompts

    if s.replays_library:  # no model, no prompt, no socket: the libraries and their policies
        from testbed.content.plan import library_problems

        found = library_problems(s)
        if found:
            raise ScenarioError([Problem(*p) for p in found], source)
        return Checked([], 0, {}, {})
    problems: list[Problem] = []
    facts: dict[str, dict[str, int]] = {}
    for role in ("slm", "llm"):
        spec = getattr(s.models, role)
        try:
            facts[role] = model_facts(spec)
        except ModelError as e:
            problems.append(Problem(f"models.{role}", str(e)))
    prompts: list = []
    tokenizer = None
    if "slm" in facts:
        try:
            tokenizer = _tokenizer(_key(s.models.slm))
        except ModelError as e:
            problems.append(Problem("models.slm", str(e)))
    try:
        prompts = load_prompts(s.prompts, tokenizer)
    except PromptError as e:
        problems.append(Problem("prompts", str(e)))

    if "slm" in facts and "llm" in facts:
        vs, vl = facts["slm"]["vocab_size"], facts["llm"]["vocab_size"]
        if vs != vl:
            problems.append(
                Problem(
                    "models",
                    f"models.slm ({_name(s.models.slm)}) has a vocabulary of {vs} tokens "
                    f"and models.llm ({_name(s.models.llm)}) of {vl}; the verifier compares "
                    f"their distributions token by token, so both need the same tokenizer",
                )
            )
    used = prompts[: s.n_devices] if tokenizer is not None else []  # device i gets prompt i mod n
    if used and "slm" in facts and "llm" in facts:
        problems += _prompt_problems(s, used, facts)
    longest = max((len(p.token_ids) for p in used), default=0)
    if facts:
        problems += _memory_problems(s, facts, longest, engine, address)
    if engine == "ray" and not (address or s.address):
        bad = bind_problem(s.server.host, s.server.port)
        if bad:
            problems.append(Problem(*bad))
    if problems:
        raise ScenarioError(problems, source)
    return Checked(prompts, facts["llm"]["vocab_size"], facts["slm"], facts["llm"])


def _key(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True) if isinstance(spec, dict) else str(spec)


def _name(spec: Any) -> str:
    return spec if isinstance(spec, str) else f"tiny {json.dumps({k: v for k, v in spec.items() if k != 'kind'})}"


@functools.lru_cache(maxsize=4)  # a sweep checks every point with the same tokenizer
def _tokenizer(key: str):
    from agents.models import load_tokenizer

    return load_tokenizer(json.loads(key) if key.startswith("{") else key)


def _prompt_problems(s: Scenario, used: list, facts: dict) -> list[Problem]:
    """Prompt ids inside the vocabulary, and prompt + max_new_tokens inside both models' positions.
    A device's context reaches len(prompt) + max_new_tokens positions (slm-only piggybacks every
    token, measured: one more fails), so that sum must fit. Names the worst prompt and the count."""
    out = []
    vocab = min(facts["slm"]["vocab_size"], facts["llm"]["vocab_size"])
    for p in used:
        top = max(p.token_ids)
        if top >= vocab:
            out.append(
                Problem(
                    "prompts",
                    f"prompt {p.index} ({p.id}) has token id {top}, outside the models' vocabulary of {vocab}",
                )
            )
            break
    n_new = s.generation.max_new_tokens
    limit_role = min(("slm", "llm"), key=lambda r: facts[r]["max_positions"])
    limit = facts[limit_role]["max_positions"]
    over = [p for p in used if len(p.token_ids) + n_new > limit]
    if over:
        worst = max(over, key=lambda p: len(p.token_ids))
        n = len(worst.token_ids)
        k = len(over) - 1
        others = (
            f"; {k} more of the {len(used)} prompts in use {'is' if k == 1 else 'are'} too long as well" if k else ""
        )
        fits = limit - n
        hint = f"generation.max_new_tokens <= {fits} fits it" if fits >= 1 else "the prompt alone is over the limit"
        out.append(
            Problem(
                "generation.max_new_tokens",
                f"prompt {worst.index} ({worst.id}) is {n} tokens; with generation.max_new_tokens {n_new} "
                f"a device needs {n + n_new} positions, over the {limit} max positions of models.{limit_role} "
                f"({_name(getattr(s.models, limit_role))}; models.{'llm' if limit_role == 'slm' else 'slm'}: "
                f"{facts['llm' if limit_role == 'slm' else 'slm']['max_positions']}); {hint}{others}",
            )
        )
    return out


# ---------------------------------------------------------------------------- memory


def available_memory() -> int | None:
    """Bytes this machine can still give a run: MemAvailable (/proc/meminfo), else psutil; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil, or no figure: the check is skipped
        return None


def _kv_bytes(f: dict[str, int], positions: int) -> int:
    """One session's KV cache: keys and values, fp32 (the packed CPU forward keeps fp32 KV), grown
    by 1.5x from 64 slots (agents.lm), so up to 1.5 x the positions it needs."""
    return int(2 * f["layers"] * f["kv_heads"] * f["head_dim"] * 4 * max(64, 1.5 * positions))


def estimate_memory(
    s: Scenario, facts: dict[str, dict[str, int]], longest_prompt: int, engine: str = "ray", cluster: bool = False
) -> dict[str, float]:
    """Bytes a run of `s` needs on this machine, by part, from the figures measured above: per
    device (bookkeeping, its token rows, both KV caches) and per actor process. On a cluster the
    actors and their caches live elsewhere: the driver keeps the per-device part. Model weights
    are not counted: they are memory-mapped files, one shared copy per machine (agents.models)."""
    positions = longest_prompt + s.generation.max_new_tokens
    # Host memory only: a cache on a GPU (actors.*_device: cuda) is not counted.
    on_cpu = {"slm": s.actors.group_device == "cpu", "llm": s.actors.verifier_device == "cpu"}
    kv = 0 if cluster else sum(_kv_bytes(f, positions) for role, f in facts.items() if on_cpu[role])
    per_device = DEVICE_BYTES + s.generation.max_new_tokens * TOKEN_BYTES + kv
    actors = 0 if (cluster or engine == "local") else n_groups(s) + 1  # the groups and the verifier
    return {
        "per_device": per_device,
        "kv_per_device": kv,
        "devices": per_device * s.n_devices,
        "actors": actors,
        "actor_bytes": actors * ACTOR_BYTES,
    }


def n_groups(s: Scenario) -> int:
    """DeviceGroup actors of a run, without building the device list."""
    return math.ceil(s.n_devices / s.actors.devices_per_group)


def max_devices(
    s: Scenario,
    facts: dict[str, dict[str, int]],
    longest_prompt: int,
    available: int,
    engine: str = "ray",
    cluster: bool = False,
) -> int:
    """The most devices a run shaped like `s` fits in USABLE x `available` bytes (groups of
    actors.devices_per_group, each group an actor process)."""
    e = estimate_memory(s, facts, longest_prompt, engine, cluster)
    per_device = e["per_device"] + (0 if e["actors"] == 0 else ACTOR_BYTES / s.actors.devices_per_group)
    fixed = ACTOR_BYTES if e["actors"] else 0  # the verifier
    return max(0, int((USABLE * available - fixed) // per_device))


def _memory_problems(s: Scenario, facts: dict, longest: int, engine: str, address: str | None) -> list[Problem]:
    available = available_memory()
    if available is None:
        return []
    cluster = bool(address or s.address)
    e = estimate_memory(s, facts, longest, engine, cluster)
    need = e["devices"] + e["actor_bytes"]
    budget = USABLE * available
    if need <= budget:
        return []
    bound = max_devices(s, facts, longest, available, engine, cluster)
    parts = (
        f"{s.n_devices} devices x {e['per_device'] / KiB:.0f} KiB ({DEVICE_BYTES // KiB} KiB + "
        f"{s.generation.max_new_tokens} tokens x {TOKEN_BYTES // KiB} KiB"
        + (f" + KV caches {e['kv_per_device'] / KiB:.0f} KiB" if e["kv_per_device"] else "")
        + ")"
        + (f" + {e['actors']} actor processes x {ACTOR_BYTES // MiB} MiB" if e["actors"] else "")
    )
    where = f"{USABLE:.0%} of the {available / GiB:.1f} GiB available on this machine"
    layout = f"in groups of {s.actors.devices_per_group}" if e["actors"] else "here"
    msg = (
        f"{s.n_devices} devices need about {need / GiB:.1f} GiB ({parts}), over {where} ({budget / GiB:.1f} GiB); "
        f"at most {bound} devices fit {layout}"
    )
    if e["actors"]:
        big = max_devices(
            override(s, {"actors.devices_per_group": max(1, s.n_devices)}), facts, longest, available, engine
        )
        msg += f" ({big} in one group)"
    groups = int((budget - e["devices"]) // ACTOR_BYTES) - 1  # room for this many groups beside the verifier
    if e["actors"] and groups >= 1:  # the devices fit; their actor processes do not
        return [
            Problem(
                "actors.devices_per_group",
                f"{msg}; devices_per_group >= {math.ceil(s.n_devices / groups)} would fit (fewer actor processes)",
            )
        ]
    return [Problem("tiers", f"{msg}; lower the tiers' counts")]


# ---------------------------------------------------------------------------- server address


def bind_problem(host: str, port: int) -> tuple[str, str] | None:
    """(field, why) when a local verifier could not bind host:port (None if it can): the address
    must belong to this machine and a fixed port be free. A bind and close here, no traffic."""
    try:
        addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    except (socket.gaierror, UnicodeError) as e:
        return "server.host", f"{host!r} does not resolve here ({getattr(e, 'strerror', None) or e})"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: TIME_WAIT is no conflict
        try:
            sock.bind(addr)
        except OSError as e:
            if port and e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
                return (
                    "server.port",
                    f"port {port} on {host} is in use ({e.strerror}); use another port or 0 (any free port)",
                )
            return "server.host", (
                f"{host!r} ({addr[0]}) cannot be bound on this machine ({e.strerror}); the "
                f"verifier of a local run binds here: use an address of this machine, e.g. "
                f"127.0.0.1 or 0.0.0.0"
            )
    return None
