"""The GPU lease interface every backend implements, and the errors it raises.

A lease is the right to put a model on one GPU and compute there. At most one contender holds a
GPU's lease at a time; each acquisition gets a fencing token that is strictly greater than every
token handed out before it for that GPU, so anything a holder writes can be ordered after the fact.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType

from trellisbox._domain.errors import Unavailable
from trellisbox._runtime.lease.records import LeaseRecorder

_log = logging.getLogger(__name__)


class LeaseError(RuntimeError):
    """Misuse of a lease (acquire while held, use after close) or a broken lock store."""


class LeaseTimeout(TimeoutError):
    """No turn on the GPU within the time allowed."""


class AcquireCancelled(Exception):
    """The caller gave up waiting (its job was cancelled) before the lease was acquired."""


class LeaseLost(Unavailable):
    """The lease was lost while held (renewals failed past the renew deadline, or it was taken over).

    Maps to gRPC ``UNAVAILABLE``: the request may be retried, here or on another replica.
    """


class GpuLease(ABC):
    """Exclusive, fenced, thread-safe right to use one GPU.

    Usage::

        token = lease.acquire(timeout=30)   # blocks; raises LeaseTimeout
        try:
            ...                              # GPU work; check lease.lost at step boundaries
        finally:
            lease.release()

    or ``with lease: ...``. ``acquire`` may be called from any thread but not from two threads at
    once on the same object (a lease object is one contender). ``held``, ``lost``, ``token`` and
    ``peer_waiting`` may be read from any thread.
    """

    def __init__(self, name: str, holder: str, *, service: str = "",
                 recorder: LeaseRecorder | None = None) -> None:
        self.name = name  # the GPU's lease name, e.g. "gpu-0"
        self.holder = holder
        self.service = service
        self._recorder = recorder
        self._lost_callbacks: list[Callable[[], None]] = []
        self._callbacks_lock = threading.Lock()

    # -- the interface ---------------------------------------------------------------------------

    @abstractmethod
    def acquire(self, timeout: float | None = None, *,
                cancelled: Callable[[], bool] | None = None) -> int:
        """Block until this contender holds the lease; return the new fencing token.

        Args:
            timeout: Seconds to wait at most; ``None`` waits forever.
            cancelled: Polled while waiting; when it returns True the wait ends.

        Raises:
            LeaseTimeout: not acquired within ``timeout``.
            AcquireCancelled: ``cancelled()`` became true first.
            LeaseError: already held by this object, or the lease was closed.
        """

    @abstractmethod
    def release(self) -> None:
        """Give the lease up (no-op when not held). Also clears the ``lost`` state."""

    @property
    @abstractmethod
    def held(self) -> bool:
        """True while this contender holds the lease and has not lost it."""

    @property
    @abstractmethod
    def lost(self) -> bool:
        """True once a held lease was lost; stays true until :meth:`release`."""

    @property
    @abstractmethod
    def token(self) -> int | None:
        """The fencing token of the current acquisition, or None when not held."""

    @abstractmethod
    def peer_waiting(self) -> bool:
        """Best-effort: is another contender waiting for this GPU right now?"""

    @abstractmethod
    def wait_for_peer(self, timeout: float | None = None) -> bool:
        """After giving the lease up: wait until a waiting peer has taken its turn.

        Returns at once when no peer waits. Used so that a contender that just yielded does not
        re-grab the lock before the peer it yielded to. ``timeout`` None uses the backend's
        default grace. Returns True if a waiting peer was seen and took its turn; False when it saw
        no peer waiting (the peer may have taken its turn already) or the grace ran out.
        """

    def close(self) -> None:
        """Release if held and free resources (threads, file descriptors). Idempotent."""
        self.release()

    def access_problem(self) -> str | None:
        """Why this contender could not take a turn even if the peer gave the GPU up now, or None.

        A readiness probe: None while the lease store can be read (and, as far as one can tell without
        writing, written); otherwise one line naming the cause, e.g. missing RBAC on the Lease. It does not
        say whether the peer holds the GPU: waiting for a turn is normal, an unreadable lease is not.
        """
        return None

    @property
    def lost_reason(self) -> str:
        """Why the lease was lost (empty when it was not)."""
        return ""

    # -- shared plumbing ------------------------------------------------------------------------

    def add_lost_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from a background thread) when a held lease is lost."""
        with self._callbacks_lock:
            self._lost_callbacks.append(callback)

    def _notify_lost(self) -> None:
        with self._callbacks_lock:
            callbacks = list(self._lost_callbacks)
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a broken observer must not stop the others from hearing it
                _log.exception("lost-lease callback failed")

    def _record(self, event: str, token: int | None, **extra: object) -> None:
        if self._recorder is not None:
            self._recorder.record(event, service=self.service, holder=self.holder, gpu=self.name,
                                  token=token, **extra)

    def __enter__(self) -> GpuLease:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, holder={self.holder!r}, held={self.held})"
