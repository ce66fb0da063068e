"""The GPU lease: lets the two model services time-share one GPU safely.

A model service never wires this itself: :class:`~trellisbox._runtime.model.ModelHost` builds the lease and
the :class:`GpuTurns` guard from the service's :class:`LeaseSettings` (dedicated placement: none), hands the
guard to the model worker, and moves the backend per its residency policy at each turn's edges.

See docs/lease.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trellisbox._runtime.lease.base import AcquireCancelled, GpuLease, LeaseError, LeaseLost, LeaseTimeout
from trellisbox._runtime.lease.config import LeaseBackend, LeaseSettings, Placement, Residency
from trellisbox._runtime.lease.flock import FlockLease
from trellisbox._runtime.lease.records import LeaseRecorder, read_records
from trellisbox._runtime.lease.turns import GpuTurns, ResidencyHooks, TurnJob, TurnStats, residency_hooks

if TYPE_CHECKING:
    from trellisbox._runtime.lease.kube import KubernetesLease

__all__ = [
    "AcquireCancelled", "FlockLease", "GpuLease", "GpuTurns", "KubernetesLease", "LeaseBackend",
    "LeaseError", "LeaseLost", "LeaseRecorder", "LeaseSettings", "LeaseTimeout", "Placement", "Residency",
    "ResidencyHooks", "TurnJob", "TurnStats", "make_gpu_turns", "make_lease", "read_records",
    "residency_hooks",
]


def __getattr__(name: str) -> Any:
    # The kubernetes client is imported only by services that use that backend.
    if name == "KubernetesLease":
        from trellisbox._runtime.lease.kube import KubernetesLease

        return KubernetesLease
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_lease(settings: LeaseSettings, service: str, *, kube_api: Any = None) -> GpuLease | None:
    """The configured lease for this service, or None when the placement is dedicated.

    Args:
        settings: The service's settings (they inherit :class:`LeaseSettings`).
        service: Service name written to the lease record.
        kube_api: Optional ``CoordinationV1Api`` for the kubernetes backend (default: in-cluster
            config, else kubeconfig).
    """
    if not settings.shared:
        return None
    recorder = (LeaseRecorder(settings.lease_record, backend=settings.lease_backend)
                if settings.lease_record else None)
    if settings.lease_backend == "flock":
        return FlockLease(settings.lease_name, settings.lease_holder, settings.lease_dir, service=service,
                          recorder=recorder)
    from trellisbox._runtime.lease.kube import KubernetesLease

    return KubernetesLease(
        settings.lease_name, settings.lease_holder, namespace=settings.lease_namespace, api=kube_api,
        lease_duration_s=settings.lease_duration_s, renew_deadline_s=settings.renew_deadline_s,
        retry_period_s=settings.retry_period_s, service=service, recorder=recorder,
    )


def make_gpu_turns(settings: LeaseSettings, service: str, *, queue_depth: Callable[[], int],
                   hooks: ResidencyHooks, lease: GpuLease | None = None) -> GpuTurns | None:
    """The ``gpu_turn`` hook for ``ModelWorker``, or None when the placement is dedicated.

    Args:
        settings: The service's settings.
        service: Service name (metrics, records, messages).
        queue_depth: Jobs of this service waiting behind the running one (``lambda: worker.queue_depth``).
        hooks: What to do on acquire/release, usually from :func:`residency_hooks`.
        lease: Use this lease instead of building one from ``settings`` (tests).
    """
    if not settings.shared:
        return None
    lease = lease if lease is not None else make_lease(settings, service)
    assert lease is not None  # nosec B101  # for mypy: shared placement always builds one
    return GpuTurns(lease, service, queue_depth=queue_depth, on_acquire=hooks.on_acquire,
                    on_release=hooks.on_release, max_hold_s=settings.max_hold_s, wait_s=settings.lease_wait_s)
