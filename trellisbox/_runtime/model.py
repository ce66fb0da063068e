"""The model-service skeleton: the one way a service is built around one model.

A model service (the refiner, the TRELLIS service) is one process per GPU: an asyncio gRPC front over a
single :class:`~trellisbox._runtime.worker.ModelWorker` thread that owns the model, because upstream
pipelines are not thread-safe. What the two share lives here:

- :class:`ModelBackend`, the base class of every backend of every model service: load, unload, warm up,
  and the moves a shared GPU needs. Backends see domain objects, never protobuf.
- :class:`ModelHost`: the worker, the GPU turns in shared placement, and the backend once warm-up has chosen
  and loaded it. Servicers run their jobs through it and ask it for the backend (``UNAVAILABLE`` until ready).
- :class:`ModelService` and :func:`serve_model`: what a service declares (its proto service, settings,
  backend choice, servicer) and the function that serves it: settings, logging, worker and lease, the
  server bootstrap, warm-up (readiness turns SERVING after it), shutdown.

Placement:

- ``dedicated``: the worker runs jobs back to back on the service's own device; no lease.
- ``shared``: every job, and the warm-up, runs inside a GPU *turn* that holds the lease; the backend is made
  resident per the residency policy when a turn starts and parked when it ends, with GPU memory reported
  before and after each move on CUDA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import grpc
from prometheus_client import REGISTRY, Gauge, Info
from pydantic import Field

from trellisbox._domain.errors import ModelUnavailable, Unavailable
from trellisbox._runtime.allocator import MODEL
from trellisbox._runtime.config import ServiceSettings, settings_or_exit
from trellisbox._runtime.devices import GpuMemoryCollector, gpu_memory_bytes
from trellisbox._runtime.lease import LeaseSettings, make_gpu_turns, residency_hooks
from trellisbox._runtime.observability import configure_logging
from trellisbox._runtime.server import ServiceSpec, run
from trellisbox._runtime.worker import ModelWorker

_log = logging.getLogger(__name__)
T = TypeVar("T")
#: How often a model service in shared placement checks that its GPU lease can be reached.
LEASE_CHECK_S = 10.0

PLACEMENT = Info("trellisbox_placement", "Where a model service runs: device, placement, lease and residency.",
                 ["service"])
GPU_MEMORY = Gauge("trellisbox_gpu_memory_bytes", "CUDA memory allocated by the model service at a turn edge.",
                   ["service", "moment"])


class ModelBackend(ABC):
    """One model (or a weight-free stand-in for it) that a model service runs.

    Every method is called on the service's one model thread, so implementations need no locking. A backend
    is built cheaply from its configuration; :meth:`load` does the heavy work.
    """

    #: Short name reported to callers and in logs ("sdxl", "classic", "trellis", "preview").
    name: ClassVar[str]

    @property
    @abstractmethod
    def device(self) -> str:
        """Where it runs: ``cpu`` or ``cuda:N`` once loaded (the configured device before)."""

    @property
    @abstractmethod
    def loaded(self) -> bool:
        """True while the model is in memory."""

    @abstractmethod
    def load(self) -> None:
        """Load the model (idempotent). Raises ``ModelUnavailable`` when it cannot run here."""

    @abstractmethod
    def unload(self) -> None:
        """Free the model and its device memory (idempotent); a later call loads it again."""

    @abstractmethod
    def warm_up(self) -> None:
        """Run the model once on a small input, so the first request meets loaded weights and warm kernels."""

    def to_gpu(self) -> None:  # noqa: B027 - CPU backends have nothing to move
        """Move a loaded model onto its GPU (idempotent); a shared GPU's turn starts with this."""

    def to_host(self) -> None:  # noqa: B027
        """Park a loaded model in host RAM and free its VRAM; a shared GPU's turn ends with this."""

    def describe(self) -> str:
        """One line for the log: backend, device and what it runs."""
        return f"backend={self.name} device={self.device}"


class WeightFreeBackend(ModelBackend):
    """The lifecycle of a backend with no weights (the CPU stand-ins): loading only flips a flag, so the service's
    warm-up and lease hooks stay uniform."""

    _loaded: bool = False

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False


B = TypeVar("B", bound=ModelBackend)


class ModelSettings(ServiceSettings, LeaseSettings):
    """Settings every model service shares: the server's and the GPU placement's."""

    max_connection_age_s: float = Field(
        10.0, ge=0, description="Close client connections after this long so the gateway re-resolves DNS and a "
        "new replica gets traffic within seconds (make bench measures it); calls in flight on a closing connection "
        "go on, up to longest_call_s."
    )
    progress_interval_s: float = Field(
        0.1, ge=0, le=60, description="How often, at most, a request's progress goes out: the newest step, at most "
        "once per interval; a new stage (or the refiner's next image) at once, after the last step of the one "
        "before; the final step just before the result. Steps that a newer one replaced within an interval are "
        "left out. Each event wakes this service, the gateway and the client: CPU spent per step on a fast "
        "model (docs/benchmarks.md). 0: every step as it happens."
    )


S = TypeVar("S", bound=ModelSettings)


#: A model service returns its free heap pages to the system once it has had no job for this long: jobs that follow
#: each other reuse the memory (see :data:`~trellisbox._runtime.allocator.MODEL`), an idle service still shrinks.
RELEASE_WHEN_IDLE_S = 2.0


class ModelHost(Generic[B]):
    """The model thread of a service, its GPU turns in shared placement, and its backend once chosen.

    Args:
        service: Service label ("refiner", "trellis") for metrics, lease records and logs.
        max_queue: Jobs that may wait for the model thread; one more is refused with ``QueueFull``.
        lease: The placement and lease settings.
        progress_interval_s: How often, at most, a job's progress goes to the event loop, except for an event
            that opens a part of the job (:class:`~trellisbox._runtime.worker.ProgressGate`); 0: every event.
    """

    def __init__(self, service: str, max_queue: int, lease: LeaseSettings, *,
                 progress_interval_s: float = 0.0) -> None:
        self.service = service
        self.lease = lease
        self._backend: B | None = None
        self._cannot_run: ModelUnavailable | None = None  # why the model cannot run here, once start found out
        self._memory_collected = False
        hooks = residency_hooks(lease.residency, to_gpu=self._mover("to_gpu"), to_host=self._mover("to_host"),
                                load=self._mover("load"), unload=self._mover("unload"))
        self.turns = make_gpu_turns(lease, service, queue_depth=lambda: self.worker.queue_depth, hooks=hooks)
        self.worker = ModelWorker(service, max_queue, gpu_turn=self.turns, release_when_idle_s=RELEASE_WHEN_IDLE_S,
                                  progress_interval_s=progress_interval_s)

    @property
    def backend(self) -> B | None:
        """The backend once :meth:`start` has loaded and warmed it up, else None."""
        return self._backend

    def require(self) -> B:
        """The backend; ``ModelUnavailable`` (FAILED_PRECONDITION: retrying cannot help) when it cannot run here,
        ``Unavailable`` while it is still loading (or failed to load for a reason not explained)."""
        if self._backend is None:
            if self._cannot_run is not None:
                raise ModelUnavailable(f"the {self.service} service cannot run its model: {self._cannot_run}")
            raise Unavailable(f"the {self.service} service is not ready: its model is still loading or failed to "
                              "load (see its readiness and log)")
        return self._backend

    def start(self, choose: Callable[[], B]) -> B:
        """Choose the backend, load it and run it once; on the model thread, inside a GPU turn when shared.

        Until it returns, turn edges have nothing to move; the first turn's end parks the new backend.

        Raises:
            ModelUnavailable: the configured model cannot run here (readiness stays NOT_SERVING).
        """

        def prepare() -> B:
            backend = choose()
            backend.load()
            started = time.perf_counter()
            backend.warm_up()
            _log.info("warm-up of %s took %.2f s", backend.name, time.perf_counter() - started)
            self._backend = backend
            return backend

        try:
            backend = self.run_in_turn(prepare)
        except ModelUnavailable as exc:
            self._cannot_run = exc
            raise
        self._publish_placement(backend.device)
        return backend

    def run_in_turn(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread, inside a GPU turn when shared, and wait for it."""

        def body() -> T:
            with self.turns(None) if self.turns is not None else contextlib.nullcontext():
                return fn()

        return self.worker.call_blocking(body)

    def describe(self) -> str:
        backend = self._backend.describe() if self._backend is not None else "no model loaded"
        return f"{backend} {self.lease.lease_summary()}"

    async def lease_readiness(self) -> AsyncIterator[bool]:
        """After warm-up, in shared placement: ready while the GPU lease can be reached (missing RBAC, a deleted
        namespace or an unreachable API server would otherwise fail every job UNAVAILABLE after a long wait)."""
        assert self.turns is not None  # nosec B101  # for mypy: only called in shared placement
        lease = self.turns.lease
        problem: str | None = None
        while True:
            now = await asyncio.to_thread(lease.access_problem)
            if now != problem and now is not None:
                _log.warning("%s cannot take GPU turns: %s", self.service, now)
            problem = now
            yield now is None
            await asyncio.sleep(LEASE_CHECK_S)

    def close(self) -> None:
        """At shutdown, on the model thread: park the model and release the lease (the peer may go on at once),
        then free the model (unless a job still runs: the process exit frees it), then stop the worker."""
        idle = self.worker.in_flight == 0 and self.worker.queue_depth == 0
        try:
            if self.turns is not None:
                self.worker.call_blocking(self.turns.close)
            if self._backend is not None and idle:
                self.worker.call_blocking(self._backend.unload)
        except Exception:
            _log.exception("shutting down the %s model failed", self.service)
        finally:
            self.worker.shutdown()

    def _publish_placement(self, device: str) -> None:
        """Say where the model runs: in the log and as the ``trellisbox_placement_info`` metric."""
        lease = self.lease
        PLACEMENT.labels(self.service).info({
            "device": device, "placement": lease.placement,
            "lease": lease.lease_backend if lease.shared else "none",
            "lease_name": lease.lease_name if lease.shared else "",
            "residency": lease.residency if lease.shared else "resident",
        })
        _log.info("%s on %s; %s", self.service, device, lease.lease_summary())
        if device.startswith("cuda") and not self._memory_collected:
            REGISTRY.register(GpuMemoryCollector(self.service, device))
            self._memory_collected = True

    def _mover(self, what: str) -> Callable[[], None]:
        """A residency hook: ``what`` (to_gpu, to_host, load, unload) on the backend, GPU memory logged around it
        on CUDA; nothing before a backend exists."""

        def move() -> None:
            backend = self._backend
            if backend is None:
                return
            before = gpu_memory_bytes(backend.device)
            getattr(backend, what)()
            after = gpu_memory_bytes(backend.device)
            if before is not None and after is not None:
                GPU_MEMORY.labels(self.service, f"after_{what}").set(after[0])
                _log.info("%s %s on %s: allocated %.0f → %.0f MiB, reserved %.0f → %.0f MiB", self.service, what,
                          backend.device, before[0] / 2**20, after[0] / 2**20, before[1] / 2**20, after[1] / 2**20)

        return move


@dataclass(frozen=True)
class ModelService(Generic[S, B]):
    """What a model service declares; :func:`serve_model` does the rest.

    Args:
        name: Its full proto service name (:mod:`trellisbox._domain.contract`); also its readiness key.
        label: Short name for logs, metrics and lease records ("refiner", "trellis").
        settings: Its settings class (flags, environment, defaults).
        choose_backend: Builds the configured backend (``auto`` resolved and logged); runs on the model thread
            during warm-up, inside the first GPU turn when shared.
        servicer: Builds the gRPC servicer over the host.
        register: Adds the servicer to the server (the generated ``add_..._to_server``).
    """

    name: str
    label: str
    settings: type[S]
    choose_backend: Callable[[S], B]
    servicer: Callable[[ModelHost[B], S], Any]
    register: Callable[[Any, grpc.aio.Server], None]


def serve_model(service: ModelService[S, B], argv: list[str]) -> None:
    """Serve ``service`` until SIGTERM/SIGINT: settings from ``argv`` and the environment, then the bootstrap."""
    settings = settings_or_exit(service.settings, argv)
    # Before the backend is chosen, so the WARNING that says which backend runs is formatted and kept.
    configure_logging(service.label, settings.log_level, settings.log_format)
    host: ModelHost[B] = ModelHost(service.label, settings.max_queue, settings,
                                   progress_interval_s=settings.progress_interval_s)
    servicer = service.servicer(host, settings)
    spec = ServiceSpec(
        name=service.name,
        register=lambda server: service.register(servicer, server),
        warm_up=lambda: host.start(lambda: service.choose_backend(settings)),
        describe=host.describe,
        on_shutdown=host.close,
        readiness=host.lease_readiness if host.turns is not None else None,
    )
    run(settings, spec, service.label, malloc=MODEL)
