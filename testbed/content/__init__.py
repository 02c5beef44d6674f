"""Content libraries: record a run's content once, with its provenance, and replay it in fleets of any
size without models (docs/design.md section 8).

    library   the format: recordings of parquet tables derived from agents.record, read and checked
    draw      which recorded sequence each device of a tier replays (seed, device id)
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

from testbed.content.library import FORMAT_VERSION, Library, LibraryError, Pool, canonical_policy, save_recording

__all__ = ["FORMAT_VERSION", "Library", "LibraryError", "Pool", "canonical_policy", "record_run", "save_recording"]


def record_run(p, opts, content, status: dict) -> Path:
    """Save a finished virtual-clock run's content record (`content`, agents.record.Content) as a new
    recording of the library opts.save_content, with the run's provenance. Returns its folder."""
    s = p.scenario
    provenance = {
        "scenario": s.name,
        "seed": s.seed,
        "models": {"slm": s.models.slm, "llm": s.models.llm},
        "dtype": {"slm": p.slm_dtype, "llm": p.llm_dtype},
        "threads": p.threads,
        "policies": p.policy_specs,
        "prompts": s.prompts.model_dump(mode="json"),
        "generation": s.generation.model_dump(mode="json"),
        "vocab_size": p.run.vocab_size,
        "max_new_tokens": p.run.max_new_tokens,
        "temperature": p.run.temperature,
        "engine": opts.engine,
        "testbed_version": _version(),
        "machine": (status.get("compute") or {}).get("machine") or _machine(),
        "command": opts.command or f"testbed content record {s.name} --out {opts.save_content}",
    }
    return save_recording(opts.save_content, content, p.specs, provenance, opts.recording)


def _version() -> str:
    """The testbed's version, and its git commit where it runs from a checkout."""
    version = importlib.metadata.version("hlm-testbed")
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+g{commit}" if commit else version


def _machine() -> dict:
    from agents.models.hardware import machine_info

    return machine_info()
