"""dtype chosen for the hardware (measured, cached, recorded), derived dtype folders, placement."""
from __future__ import annotations

import json

import pytest
import torch

from agents import hardware
from agents.models import READY_FORMAT, READY_MARKER, build_tiny, dtype_folder, load_model, parse_spec
from agents.models import TinyConfig


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_probe_is_measured_once_then_cached(cache, monkeypatch):
    calls = []
    real = hardware._time_gemms

    def counting(dtypes, reps=7, threads=1):
        calls.append((tuple(dtypes), threads))
        return real(dtypes, reps=2, threads=threads)

    monkeypatch.setattr(hardware, "_time_gemms", counting)
    first = hardware.probe_cpu_dtype()
    again = hardware.probe_cpu_dtype()
    assert first == again and len(calls) == 1
    assert first["dtype"] in ("bfloat16", "float32") and first["fp32_s"] > 0
    assert json.loads(next((cache / "dtype-probe").glob("*.json")).read_text()) == first
    hardware.probe_cpu_dtype(refresh=True)
    assert len(calls) == 2
    # Probed at the thread count the forwards use, cached per count.
    two = hardware.probe_cpu_dtype(threads=2)
    assert two["threads"] == 2 and calls[-1][1] == 2 and len(calls) == 3
    assert hardware.probe_cpu_dtype(threads=2) == two and len(calls) == 3
    assert len(list((cache / "dtype-probe").glob("*.json"))) == 2


def test_threads_resolve_to_the_usable_cores(monkeypatch):
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert hardware.resolve_threads("auto") == len(os.sched_getaffinity(0)) == hardware.usable_cores()
    assert hardware.resolve_threads(None) == hardware.usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a shared machine's cap
    assert hardware.resolve_threads("auto") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "999")
    assert hardware.resolve_threads("auto") == hardware.usable_cores()
    assert hardware.resolve_threads(3) == 3
    for bad in (0, -1, "many", 2.0, True):
        with pytest.raises(ValueError, match="auto or a whole number"):
            hardware.resolve_threads(bad)
    assert hardware.machine_info()["usable_cores"] == hardware.usable_cores()


@pytest.mark.parametrize("native, bf16_s, fp32_s, want", [
    (False, None, 1.0, "float32"),  # no bf16 instructions: not even measured
    (True, 0.5, 1.0, "bfloat16"),
    (True, 1.2, 1.0, "bfloat16"),  # within the margin: bf16 also halves memory
    (True, 4.0, 1.0, "float32"),  # emulated bf16 (the AVX2 case): fp32
])
def test_probe_decision(cache, monkeypatch, native, bf16_s, fp32_s, want):
    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    monkeypatch.setattr(hardware, "_time_gemms", lambda dtypes, reps=7, threads=1: [fp32_s, bf16_s][: len(dtypes)])
    assert hardware.probe_cpu_dtype(refresh=True)["dtype"] == want
    assert hardware.resolve_dtype("auto") == want
    assert hardware.resolve_dtype("float16") == "float16"


def test_bad_dtype_and_device_are_named():
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        hardware.resolve_dtype("int8")
    assert "cpu, cuda or cuda:N" in hardware.check_device("tpu")
    if not torch.cuda.is_available():
        assert "torch sees no GPU" in hardware.check_device("cuda:0")
    assert hardware.check_device("cpu") is None


def test_machine_info_names_the_cpu():
    info = hardware.machine_info()
    assert info["cpu_capability"].startswith(torch.backends.cpu.get_cpu_capability())
    assert info["native_bf16"] == info["cpu_capability"].endswith("+BF16")


def _fake_prepared(cache):
    """A tiny Qwen2 saved where the bundled SLM would be, marked ready (as `models prepare` does)."""
    spec = parse_spec("qwen2.5-coder:slm")
    model = build_tiny(TinyConfig(vocab_size=300)).to(torch.bfloat16)
    model.save_pretrained(spec.path, safe_serialization=True)
    from pathlib import Path

    (Path(spec.path) / READY_MARKER).write_text(json.dumps({"format": READY_FORMAT, "dtype": "bfloat16"}))
    return spec


def test_a_derived_fp32_folder_is_saved_once_and_loads_exactly(cache):
    spec = _fake_prepared(cache)
    bf16 = load_model(spec, dtype="bfloat16")
    folder = dtype_folder(spec, "float32")
    assert folder.name == "slm-float32" and (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    fp32 = load_model(spec, dtype="float32")
    assert dtype_folder(spec, "float32") == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    for (name, a), (_, b) in zip(bf16.state_dict().items(), fp32.state_dict().items()):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b), name  # an exact upcast
    assert dtype_folder(spec, "bfloat16") == folder.with_name("slm")


def test_scenario_refuses_cuda_without_a_gpu_and_records_the_placement():
    from testbed.scenario import ScenarioError, load_scenario, override

    s = load_scenario("smoke")
    if not torch.cuda.is_available():
        with pytest.raises(ScenarioError, match="torch sees no GPU"):
            override(s, {"actors.verifier_device": "cuda", "actors.verifier_gpus": 1})
    with pytest.raises(ScenarioError, match="group_gpus > 0 but group_device is cpu"):
        override(s, {"actors.group_gpus": 0.5})
    with pytest.raises(ScenarioError, match="models.dtype"):
        override(s, {"models.dtype": "int8"})
    assert override(s, {"models.dtype": "bfloat16"}).models.dtype == "bfloat16"


def test_ray_resources_follow_the_placement(monkeypatch):
    """The actors ask Ray for the GPU shares the scenario names (checked without a GPU by letting
    validation believe in one: what is tested is the request, not CUDA)."""
    from testbed.run import plan
    from testbed.run.ray_setup import actor_resources
    from testbed.scenario import load_scenario, override

    s = load_scenario("smoke")
    assert actor_resources(s) == {"verifier": {"num_cpus": 0, "num_gpus": 0.0, "max_concurrency": 4},
                                         "group": {"num_cpus": 0, "num_gpus": 0.0, "max_concurrency": 2}}
    monkeypatch.setattr(hardware, "check_device", lambda device: None)
    gpu = override(s, {"actors.verifier_device": "cuda:0", "actors.verifier_gpus": 1,
                       "actors.group_device": "cuda", "actors.group_gpus": 0.25})
    res = actor_resources(gpu)
    assert res["verifier"]["num_gpus"] == 1 and res["group"]["num_gpus"] == 0.25
    with pytest.raises(Exception, match="ask Ray for a GPU share"):
        override(s, {"actors.group_device": "cuda"})
    assert plan(s).slm_dtype == "float32"  # tiny models under auto
