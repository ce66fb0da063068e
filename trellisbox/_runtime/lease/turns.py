"""GPU turns: the guard a model service's :class:`~trellisbox._runtime.worker.ModelWorker` enters around every
job (``ModelWorker(gpu_turn=turns)``).

A *turn* is one hold of the GPU lease. On entering a job without the lease the guard waits politely
for it, then calls ``on_acquire`` (make the model resident on the GPU: one *swap*). After the job it
decides whether to keep the lease (**hand-off batching**) or to park the model (``on_release``) and
give the lease up:

- own queue empty → release (never sit on an idle GPU);
- own queue non-empty and held for less than ``max_hold_s`` → keep (one swap serves many jobs);
- own queue non-empty, held for ``max_hold_s`` or more → keep only if no peer waits, else yield.

**Fair waiting**: a waiting contender announces itself through the lease (``peer_waiting``), so a
holder past its hold time yields to it; and before acquiring, a contender first lets a waiting peer
take its turn (``wait_for_peer``), so a service that just yielded does not re-grab the lock. A peer
therefore waits at most about ``max_hold_s`` plus one job.

A lost lease (Kubernetes backend) cancels the job in flight (it stops at its next step, and fails
with :class:`~trellisbox._runtime.lease.LeaseLost`, gRPC ``UNAVAILABLE``; a job that finishes without reaching
another step returns its result), parks the model and refuses new GPU work until the lease is
re-acquired by a later job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from trellisbox._domain.errors import Cancelled, DeadlineExceeded, Unavailable
from trellisbox._runtime.lease.base import AcquireCancelled, GpuLease, LeaseLost, LeaseTimeout
from trellisbox._runtime.lease.config import Residency

_log = logging.getLogger(__name__)

LEASE_HELD = Gauge("trellisbox_gpu_lease_held", "1 while this service holds its GPU lease.", ["service", "gpu"])
GPU_SWAPS = Counter("trellisbox_gpu_swaps_total", "Model swaps onto the shared GPU (on_acquire calls).",
                    ["service"])
LEASE_WAIT = Histogram("trellisbox_gpu_lease_wait_seconds", "Time a job waited for its GPU turn.", ["service"],
                       buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320))
LEASE_HOLD = Histogram("trellisbox_gpu_lease_hold_seconds", "Time a service held its GPU lease per turn (acquired to "
                       "given up; one turn may serve several jobs).", ["service"],
                       buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640))
LEASE_LOST = Counter("trellisbox_gpu_lease_lost_total", "GPU leases lost while held.", ["service"])


class TurnJob(Protocol):
    """What the guard needs from a job (``trellisbox._runtime.worker.JobContext`` satisfies it)."""

    @property
    def deadline(self) -> float | None: ...  # time.monotonic() seconds

    @property
    def should_stop(self) -> bool: ...

    def cancel(self) -> None: ...

    def raise_if_stopped(self) -> None: ...


@dataclass
class TurnStats:
    """Counters for tests, benchmarks and logs."""

    jobs: int = 0
    swaps: int = 0  # on_acquire calls: the model was brought onto the GPU
    releases: int = 0  # on_release calls: the model was parked
    yields: int = 0  # released with own work still queued because a peer waited past max_hold_s
    lost: int = 0
    wait_s: float = 0.0  # total time spent waiting for the lease
    longest_hold_s: float = 0.0


@dataclass(frozen=True)
class ResidencyHooks:
    on_acquire: Callable[[], None]
    on_release: Callable[[], None]


def _noop() -> None:
    return None


def residency_hooks(policy: Residency, *, to_gpu: Callable[[], None],
                    to_host: Callable[[], None] | None = None,
                    load: Callable[[], None] | None = None,
                    unload: Callable[[], None] | None = None) -> ResidencyHooks:
    """The (on_acquire, on_release) pair for a residency policy, from the service's model moves.

    - ``resident``: on_acquire = ``to_gpu`` (must be idempotent: only the first turn moves
      anything); on_release does nothing. Swap cost ≈ 0, but both models occupy VRAM at once
      (SDXL refiner fp16 ≈ 6-7 GB, TRELLIS ≈ 16 GB): for large cards. The lease only serializes
      compute (and peak activation memory).
    - ``offload``: on_acquire = ``to_gpu``, on_release = ``to_host`` (which should also empty the
      CUDA cache). Swap cost = a host↔device copy of the weights each way, roughly weights /
      PCIe bandwidth (≈ 0.3-1 s per direction for several GB), and host RAM for the parked model.
    - ``unload``: on_acquire = ``load`` then ``to_gpu``; on_release = ``unload`` (free it and empty the
      CUDA cache). Swap cost = reading and building the model from disk every turn (seconds to tens
      of seconds); holds neither VRAM nor RAM between turns. The original TRELLIS-BOX behaviour.

    Hand-off batching (``max_hold_s``) matters most for ``offload`` and ``unload``.
    """
    if policy == "resident":
        return ResidencyHooks(on_acquire=to_gpu, on_release=_noop)
    if policy == "offload":
        if to_host is None:
            raise ValueError("residency 'offload' needs a to_host callback")
        return ResidencyHooks(on_acquire=to_gpu, on_release=to_host)
    if policy == "unload":
        if load is None or unload is None:
            raise ValueError("residency 'unload' needs load and unload callbacks")
        load_, unload_ = load, unload

        def bring_up() -> None:
            load_()
            to_gpu()

        return ResidencyHooks(on_acquire=bring_up, on_release=unload_)
    raise ValueError(f"unknown residency policy {policy!r}; expected resident, offload or unload")


class GpuTurns:
    """Per-job GPU turn guard with hand-off batching and fair waiting.

    Args:
        lease: The GPU's lease (this service's contender).
        service: Service name for messages and metrics.
        queue_depth: How many jobs of this service wait behind the current one
            (``lambda: worker.queue_depth``).
        on_acquire: Make the model resident on the GPU; called on the model thread right after the
            lease is acquired. Its cost is the swap cost of the residency policy.
        on_release: Park the model per the residency policy; called before the lease is given up.
        max_hold_s: Hand-off batching bound: keep the lease between jobs while own work is queued, up
            to this long since acquisition when a peer waits. 0 turns batching off whenever a peer
            waits.
        wait_s: Longest a job waits for the lease (the job's deadline may cut it shorter).
        handoff_grace_s: Bound for letting a waiting peer go first (default: the backend's).
        idle_release_s: If the lease was kept for queued work but no job starts within this long
            (the queued job was cancelled before it ran), park and release from a timer thread.
            The model thread is idle then, and a job cannot start until that is done.

    Use one instance per ModelWorker; pass it as ``gpu_turn``. Entered only on the model thread.
    """

    def __init__(self, lease: GpuLease, service: str, queue_depth: Callable[[], int],
                 on_acquire: Callable[[], None], on_release: Callable[[], None], max_hold_s: float,
                 wait_s: float = 300.0, handoff_grace_s: float | None = None,
                 idle_release_s: float = 1.0) -> None:
        if max_hold_s < 0 or wait_s <= 0 or idle_release_s <= 0:
            raise ValueError("max_hold_s must be ≥ 0, wait_s and idle_release_s > 0")
        self.lease = lease
        self.service = service
        self._queue_depth = queue_depth
        self._on_acquire = on_acquire
        self._on_release = on_release
        self.max_hold_s = max_hold_s
        self.wait_s = wait_s
        self.handoff_grace_s = handoff_grace_s
        self.idle_release_s = idle_release_s
        self.stats = TurnStats()
        # Reentrant: a lost-lease callback may fire on this thread while it inspects the lease.
        self._mutex = threading.RLock()
        self._holding = False
        self._acquired_at = 0.0
        # The running job, under its own short-lived lock: the lost-lease callback (renew thread)
        # must never wait behind the mutex, which a slow on_release may hold for seconds.
        self._job_lock = threading.Lock()
        self._active: TurnJob | None = None
        self._active_lost = False
        self._in_job = False
        self._closed = False
        self._idle_timer: threading.Timer | None = None
        self._turn_gen = 0
        lease.add_lost_callback(self._lease_lost)

    # -- the hook ----------------------------------------------------------------------------

    def __call__(self, job: TurnJob | None = None) -> AbstractContextManager[None]:
        """The ``gpu_turn`` factory: a context manager around one job."""
        return self._turn(job)

    @contextlib.contextmanager
    def _turn(self, job: TurnJob | None) -> Iterator[None]:
        self._begin(job)
        try:
            yield
        except (Cancelled, DeadlineExceeded) as exc:
            with self._job_lock:
                lost = self._active_lost
            if lost:  # we cancelled it because the lease went: say so, not "cancelled by the caller"
                raise LeaseLost(self._lost_message()) from exc
            raise
        finally:
            self._end()

    @property
    def holding(self) -> bool:
        """True while this service holds the GPU (between jobs too, when batching)."""
        with self._mutex:
            return self._holding

    # -- begin -------------------------------------------------------------------------------

    def _begin(self, job: TurnJob | None) -> None:
        with self._mutex:
            if self._closed:
                raise Unavailable(f"{self.service} is shutting down: no new GPU work")
            self._turn_gen += 1
            self._cancel_idle_timer()
            if self._holding:
                if self.lease.lost:
                    message = self._lost_message()
                    self._drop(lost=True)
                    raise LeaseLost(message)
                self._set_active(job)
                return
        started = time.monotonic()
        self.lease.wait_for_peer(self.handoff_grace_s)  # let a waiting peer have its turn first
        timeout, by_deadline = self.wait_s, False
        if job is not None and job.deadline is not None:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"the deadline passed before {self.service} got a turn on the GPU")
            if remaining < timeout:
                timeout, by_deadline = remaining, True
        try:
            self.lease.acquire(timeout, cancelled=(lambda: job.should_stop) if job is not None else None)
        except (LeaseTimeout, AcquireCancelled) as exc:
            waited = time.monotonic() - started
            timed_out = isinstance(exc, LeaseTimeout)
            if (timed_out and by_deadline) or (
                    job is not None and job.deadline is not None and time.monotonic() >= job.deadline):
                raise DeadlineExceeded(f"the deadline passed after waiting {waited:.1f} s for a turn on GPU "
                                       f"{self.lease.name}") from None
            if timed_out:
                raise Unavailable(f"{self.service}: no turn on GPU {self.lease.name} within {self.wait_s:g} s "
                                  f"({exc}); retry later") from None
            if job is not None:
                job.raise_if_stopped()
            raise Cancelled(f"stopped waiting for GPU {self.lease.name}") from None
        waited = time.monotonic() - started
        self.stats.wait_s += waited
        LEASE_WAIT.labels(self.service).observe(waited)
        try:
            self._on_acquire()
        except BaseException:
            _log.exception("%s: making the model resident on GPU %s failed; giving the GPU back",
                           self.service, self.lease.name)
            try:
                self._on_release()
            except Exception:
                _log.exception("%s: parking the model after a failed on_acquire failed too", self.service)
            self.lease.release()
            raise
        GPU_SWAPS.labels(self.service).inc()
        LEASE_HELD.labels(self.service, self.lease.name).set(1)
        with self._mutex:
            self._holding, self._acquired_at = True, time.monotonic()
            self.stats.swaps += 1
            if self.lease.lost:  # lost while the model was being moved in (a slow load): no compute
                message = self._lost_message()
                self._drop(lost=True)
                raise LeaseLost(message)
            self._set_active(job)
        _log.debug("%s: GPU %s acquired after %.3f s (token %s)", self.service, self.lease.name, waited,
                   self.lease.token)

    # -- end ---------------------------------------------------------------------------------

    def _end(self) -> None:
        with self._mutex:
            with self._job_lock:
                self._active, self._in_job = None, False
            self.stats.jobs += 1
            if not self._holding:
                return
            if self.lease.lost:
                self._drop(lost=True)
                return
            held_for = time.monotonic() - self._acquired_at
            if self._queue_depth() > 0:
                if held_for < self.max_hold_s or not self.lease.peer_waiting():
                    self._arm_idle_timer()
                    return  # hand-off batching: the next job of ours runs without a swap
                self.stats.yields += 1
                _log.debug("%s: yielding GPU %s to a waiting peer after %.2f s", self.service,
                           self.lease.name, held_for)
            self._drop()

    def _drop(self, *, lost: bool = False) -> None:
        """Park the model and give the lease up (call with the mutex held)."""
        if not self._holding:
            return
        held_for = time.monotonic() - self._acquired_at
        self.stats.longest_hold_s = max(self.stats.longest_hold_s, held_for)
        LEASE_HOLD.labels(self.service).observe(held_for)
        self._holding = False
        self._cancel_idle_timer()
        if lost:
            self.stats.lost += 1
            LEASE_LOST.labels(self.service).inc()
        try:
            self._on_release()  # park first: the next holder needs the VRAM
            self.stats.releases += 1
        except Exception:
            _log.exception("%s: parking the model failed; releasing GPU %s anyway", self.service,
                           self.lease.name)
        finally:
            self.lease.release()
            LEASE_HELD.labels(self.service, self.lease.name).set(0)

    # -- idle safety net ---------------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        timer = threading.Timer(self.idle_release_s, self._idle_check, args=(self._turn_gen,))
        timer.daemon = True
        self._idle_timer = timer
        timer.start()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_check(self, gen: int) -> None:
        with self._mutex:
            if gen != self._turn_gen or not self._holding or self._in_job:
                return
            _log.debug("%s: no job started within %.2f s of keeping GPU %s; releasing", self.service,
                       self.idle_release_s, self.lease.name)
            self._drop(lost=self.lease.lost)

    # -- lost lease --------------------------------------------------------------------------

    def _set_active(self, job: TurnJob | None) -> None:
        with self._job_lock:
            self._active, self._active_lost, self._in_job = job, False, True

    def _lease_lost(self) -> None:
        with self._job_lock:
            job = self._active
            if job is not None:
                self._active_lost = True
        if job is not None:
            job.cancel()  # the job stops at its next step boundary

    def _lost_message(self) -> str:
        reason = self.lease.lost_reason or "lost"
        return (f"{self.service}: the GPU lease {self.lease.name} was lost ({reason}); no new GPU work "
                "starts until it is re-acquired — retry the request")

    # -- shutdown ----------------------------------------------------------------------------

    def close(self, *, close_lease: bool = True) -> None:
        """Park the model and release the lease; refuse new turns. Call it on the model thread
        (``worker.call_blocking(turns.close)``) so ``on_release`` runs where the model lives."""
        with self._mutex:
            self._closed = True
            self._drop(lost=self.lease.lost)
        if close_lease:
            self.lease.close()
