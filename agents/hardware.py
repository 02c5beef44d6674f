"""The machine the models compute on. Moved to agents.models.hardware (read its docstring); this name
stays so the run's modules import it unchanged. A test that monkeypatches one of these functions
patches the module its caller imports it from."""

from agents.models.hardware import (
    DTYPES,
    auto_dtype,
    auto_threads,
    check_device,
    cpu_capability,
    cpu_flags,
    cpu_model,
    machine_info,
    native_bf16,
    probe_cpu_dtype,
    resolve_dtype,
    resolve_threads,
    usable_cores,
)

__all__ = [
    "DTYPES",
    "auto_dtype",
    "auto_threads",
    "check_device",
    "cpu_capability",
    "cpu_flags",
    "cpu_model",
    "machine_info",
    "native_bf16",
    "probe_cpu_dtype",
    "resolve_dtype",
    "resolve_threads",
    "usable_cores",
]
