"""A model service's runtime: the one model worker and, in shared placement, its GPU turns.

Both model services build theirs here, so placement, residency and the lease are wired one way:

- ``dedicated``: the worker runs jobs back to back on the service's own GPU; no lease.
- ``shared``: every job (and the warm-up) runs inside a GPU turn: the lease is held, the model is
  made resident per the residency policy, and parked again when the turn ends. GPU memory is
  reported before and after each move on CUDA.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from prometheus_client import Gauge, Info

from trellisbox._runtime.devices import gpu_memory_bytes
from trellisbox._runtime.lease import GpuTurns, LeaseSettings, make_gpu_turns, residency_hooks
from trellisbox._runtime.worker import ModelWorker

_log = logging.getLogger(__name__)
T = TypeVar("T")

PLACEMENT = Info("trellisbox_placement", "Where a model service runs: device, placement, lease and residency.",
                 ["service"])
GPU_MEMORY = Gauge("trellisbox_gpu_memory_bytes", "CUDA memory allocated by the model service at a turn edge.",
                   ["service", "moment"])


class GpuModel(Protocol):
    """What residency policies move. Backends implement it; CPU backends make the moves no-ops."""

    @property
    def device(self) -> str: ...

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def to_gpu(self) -> None: ...

    def to_host(self) -> None: ...


class _NoModel:
    """Stands in until a late-chosen backend exists: nothing to move yet."""

    device = "cpu"

    def load(self) -> None:
        return None

    unload = to_gpu = to_host = load


NO_MODEL: GpuModel = _NoModel()


@dataclass
class ModelRuntime:
    """Args:
        service: Service label ("refiner", "trellis").
        worker: The single model worker every job runs on.
        turns: The GPU turn guard in shared placement, else None.
        lease: The lease part of the service's settings.
    """

    service: str
    worker: ModelWorker
    turns: GpuTurns | None
    lease: LeaseSettings

    def run_in_turn(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread, inside a GPU turn when shared (startup load and warm-up)."""

        def body() -> T:
            with self.turns(None) if self.turns is not None else contextlib.nullcontext():
                return fn()

        return self.worker.call_blocking(body)

    def publish_placement(self, device: str) -> None:
        """Say where the model runs: in the log and as the ``trellisbox_placement_info`` metric."""
        PLACEMENT.labels(self.service).info({
            "device": device, "placement": self.lease.placement,
            "lease": self.lease.lease_backend if self.lease.shared else "none",
            "lease_name": self.lease.lease_name if self.lease.shared else "",
            "residency": self.lease.residency if self.lease.shared else "resident",
        })
        _log.info("%s on %s; %s", self.service, device, self.lease.lease_summary())

    def close(self, unload: Callable[[], None] | None = None) -> None:
        """At shutdown, on the model thread: free the model, release the lease, stop the worker."""
        try:
            if unload is not None:
                self.worker.call_blocking(unload)
            if self.turns is not None:
                self.worker.call_blocking(self.turns.close)
        finally:
            self.worker.shutdown()


def _reported(service: str, what: str, model: Callable[[], GpuModel], move: Callable[[], None]) -> Callable[[], None]:
    """``move`` with the GPU memory logged before and after it (CUDA only)."""

    def run() -> None:
        device = model().device
        before = gpu_memory_bytes(device)
        move()
        after = gpu_memory_bytes(device)
        if before is not None and after is not None:
            GPU_MEMORY.labels(service, f"after_{what}").set(after[0])
            _log.info("%s %s on %s: allocated %.0f → %.0f MiB, reserved %.0f → %.0f MiB", service, what, device,
                      before[0] / 2**20, after[0] / 2**20, before[1] / 2**20, after[1] / 2**20)

    return run


def build_model_runtime(service: str, max_queue: int, lease: LeaseSettings,
                        model: Callable[[], GpuModel]) -> ModelRuntime:
    """The worker, and in shared placement the lease and the turns that move ``model()`` per residency.

    Args:
        service: Service label for metrics, records and logs.
        max_queue: Jobs that may wait for the worker.
        lease: The placement and lease settings (the service's settings inherit them).
        model: Returns the backend to move (called at each turn edge, so it may be chosen late).
    """
    worker: ModelWorker | None = None
    hooks = residency_hooks(
        lease.residency,
        to_gpu=_reported(service, "to_gpu", model, lambda: model().to_gpu()),
        to_host=_reported(service, "to_host", model, lambda: model().to_host()),
        load=_reported(service, "load", model, lambda: model().load()),
        unload=_reported(service, "unload", model, lambda: model().unload()),
    )
    turns = make_gpu_turns(lease, service, queue_depth=lambda: worker.queue_depth if worker else 0, hooks=hooks)
    worker = ModelWorker(service, max_queue, gpu_turn=turns)
    return ModelRuntime(service, worker, turns, lease)
