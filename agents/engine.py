"""The single-process engine: device groups and the verifier in one loop, no Ray, no sockets.

It drives the very same `DeviceGroupCore` and `VerifierCore` as the distributed runtime, so
its trace (tokens, decisions, emulated timestamps) is the reference the Ray engine must
reproduce. With one device it is the reference hybrid decoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from agents.device import DeviceGroupCore, DeviceSpec, RunParams
from agents.verifier import BatchRecord, ServerProfile, VerifierCore
from policies.base import Policy


@dataclass
class EngineResult:
    rows: list[dict]
    batches: list[BatchRecord]


def run_local(
    specs: list[DeviceSpec],
    run: RunParams,
    server: ServerProfile,
    slm,
    llm,
    policies: dict[str, Policy],
    on_step: Callable[[DeviceGroupCore, VerifierCore], None] | None = None,
) -> EngineResult:
    """Emulate every device to the end in the virtual clock; `on_step` sees progress."""
    group = DeviceGroupCore(specs, run, slm, policies)
    verifier = VerifierCore(llm, server, run.seed, run.vocab_size)
    verifier.open(group.open_items())
    while not group.done:
        for upload in group.step():
            if (verdict := verifier.submit(upload)) is not None:
                group.on_verdict(verdict)
        # Release every batch that no device can still precede, then let devices move on.
        while (ready := verifier.next_batch()) is not None:
            for verdict in verifier.verify(*ready):
                group.on_verdict(verdict)
        if on_step is not None:
            on_step(group, verifier)
        if not group.has_work() and not verifier.queue and not group.done:
            raise RuntimeError("engine stalled: no device can move and nothing is queued")
    return EngineResult(group.rows(), verifier.batches)
