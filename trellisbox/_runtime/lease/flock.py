"""``flock`` backend: one lock file per GPU on a volume both contenders mount.

Same pod: an ``emptyDir``; same node, different pods: a ``hostPath``; locally: a directory under
/tmp. The kernel drops an ``flock`` when the last descriptor of the holder closes, which includes
the holder's death (kill -9, OOM kill), so a dead holder never blocks the GPU.

Files in ``lease_dir`` (never delete them while contenders run; a deleted lock file would let a new
contender lock a different inode — acquisition re-checks the inode to catch exactly that):

- ``<name>.lock``: the lock. Its first 128 bytes hold the fencing counter and the last holder
  (``cat`` it to see who had the GPU last). The counter is bumped under the lock, so tokens
  strictly increase across processes and restarts.
- ``<name>.waiters``: contenders waiting for the GPU hold a *shared* flock on it. The holder asks
  "is a peer waiting?" by trying an exclusive non-blocking lock: it fails exactly while some live
  process waits, and a dead waiter's lock vanishes with it — no stale flags to clean up.

Must be a local filesystem (emptyDir, hostPath, tmpfs); ``flock`` over NFS is not dependable.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trellisbox._runtime.lease.base import AcquireCancelled, GpuLease, LeaseError, LeaseTimeout
from trellisbox._runtime.lease.records import LeaseRecorder

_log = logging.getLogger(__name__)

RECORD_SIZE = 128  # bytes of the lock file holding "<token> <holder> <pid> <time>"


@dataclass
class _Attempt:
    """One blocking ``flock`` in flight on a helper thread (there is at most one per lease)."""

    done: threading.Event = field(default_factory=threading.Event)
    fd: int | None = None
    acquired: bool = False
    abandoned: bool = False  # no caller waits for it any more: unlock at once if it succeeds
    error: OSError | None = None


def read_lock_file(path: Path | str) -> tuple[int, str]:
    """(last fencing token, last holder) from a lock file; (0, "") for a new one."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(RECORD_SIZE)
    except FileNotFoundError:
        return 0, ""
    return _parse_record(data)


def _parse_record(data: bytes) -> tuple[int, str]:
    fields = data.decode("utf-8", "replace").split()
    if not fields:
        return 0, ""
    return int(fields[0]), (fields[1] if len(fields) > 1 else "")


class FlockLease(GpuLease):
    """A GPU lease held as an exclusive ``flock`` on ``<directory>/<name>.lock``.

    Args:
        name: The GPU's lease name (file stem), e.g. ``gpu-0``.
        holder: This contender's identity (written to the lock file and the record).
        directory: The shared lease directory; created if missing.
        service: Service name for the record.
        recorder: Where acquire/release events go (optional).
        handoff_grace_s: Default bound for :meth:`wait_for_peer`.
    """

    def __init__(self, name: str, holder: str, directory: Path | str, *, service: str = "",
                 recorder: LeaseRecorder | None = None, handoff_grace_s: float = 1.0) -> None:
        super().__init__(name, holder, service=service, recorder=recorder)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lock_path = self.directory / f"{name}.lock"
        self.waiters_path = self.directory / f"{name}.waiters"
        self.handoff_grace_s = handoff_grace_s
        self._lock = threading.Lock()  # guards the fields below; never held across a blocking call
        self._fd: int | None = None
        self._token: int | None = None
        self._acquiring = False
        self._closed = False
        self._attempt: _Attempt | None = None
        self._probe_lock = threading.Lock()
        self._probe_fd: int | None = None
        self._announce_fd: int | None = None

    # -- acquire -----------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None, *,
                cancelled: Callable[[], bool] | None = None) -> int:
        with self._lock:
            if self._closed:
                raise LeaseError(f"lease {self.name} is closed")
            if self._fd is not None:
                raise LeaseError(f"lease {self.name} is already held by this contender")
            if self._acquiring:
                raise LeaseError(f"an acquire of lease {self.name} is already in progress")
            self._acquiring = True
        try:
            fd = self._lock_now()
            if fd is None:
                fd = self._wait(timeout, cancelled)
            token = self._bump_token(fd)
            with self._lock:
                self._fd, self._token = fd, token
            self._record("acquire", token)
            return token
        finally:
            with self._lock:
                self._acquiring = False

    def _open_lock(self) -> int:
        return os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def _same_inode(self, fd: int) -> bool:
        """False when the path no longer names the file we locked (it was deleted or replaced)."""
        try:
            st = os.stat(self.lock_path)
        except FileNotFoundError:
            return False
        fst = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

    def _lock_now(self) -> int | None:
        """Non-blocking attempt: the locked fd, or None when someone else holds the lock."""
        while True:
            fd = self._open_lock()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if self._same_inode(fd):
                return fd
            os.close(fd)  # raced with a deletion: lock the file that the path names now

    def _wait(self, timeout: float | None, cancelled: Callable[[], bool] | None) -> int:
        """Wait for the helper's blocking flock while announcing ourselves as a waiter."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        self._announce(True)
        try:
            with self._lock:
                attempt = self._attempt
                if attempt is None:  # reuse a helper still blocked from an earlier timed-out wait
                    attempt = self._attempt = _Attempt()
                    threading.Thread(target=self._helper, args=(attempt,), daemon=True,
                                     name=f"flock-{self.name}").start()
                attempt.abandoned = False
            while True:
                step = 0.05 if cancelled is not None else None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    step = remaining if step is None else min(step, remaining)
                if attempt.done.wait(max(0.0, step) if step is not None else None):
                    break
                gave_up: Exception | None = None
                if cancelled is not None and cancelled():
                    gave_up = AcquireCancelled(f"stopped waiting for GPU lease {self.name}")
                elif deadline is not None and time.monotonic() >= deadline:
                    gave_up = LeaseTimeout(f"GPU lease {self.name} not acquired within {timeout:.3g} s; "
                                           "held by another contender")
                if gave_up is not None:
                    with self._lock:
                        if not attempt.acquired:  # else it just succeeded: take it after all
                            attempt.abandoned = True
                            raise gave_up
                    break
            with self._lock:
                self._attempt = None
            if attempt.error is not None or attempt.fd is None:
                raise LeaseError(f"flock on {self.lock_path} failed: {attempt.error}")
            return attempt.fd
        finally:
            self._announce(False)

    def _helper(self, attempt: _Attempt) -> None:
        fd: int | None = None
        try:
            while True:
                fd = self._open_lock()
                fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder releases or dies
                if self._same_inode(fd):
                    break
                os.close(fd)
                fd = None
        except OSError as exc:
            if fd is not None:
                os.close(fd)
                fd = None
            attempt.error = exc
        with self._lock:
            if fd is not None and (attempt.abandoned or self._closed):
                os.close(fd)  # nobody wants it any more: pass the lock on at once
                fd = None
                if self._attempt is attempt:
                    self._attempt = None
            elif fd is not None:
                attempt.fd, attempt.acquired = fd, True
            elif self._attempt is attempt:
                self._attempt = None
        attempt.done.set()

    def _bump_token(self, fd: int) -> int:
        """Read the counter, write counter+1 with our name: one ``pwrite`` of a fixed-size record so
        that a holder killed mid-write cannot leave a half-written counter."""
        data = os.pread(fd, RECORD_SIZE, 0)
        try:
            previous, _ = _parse_record(data)
        except ValueError:
            _log.error("lock file %s has an unreadable counter %r; restarting it at 0", self.lock_path,
                       data[:40])
            previous = 0
        token = previous + 1
        text = f"{token:020d} {self.holder} {os.getpid()} {time.time():.6f}".encode()
        os.pwrite(fd, text[: RECORD_SIZE - 1].ljust(RECORD_SIZE - 1) + b"\n", 0)
        return token

    # -- release -----------------------------------------------------------------------------

    def release(self) -> None:
        with self._lock:
            fd, token = self._fd, self._token
            self._fd = self._token = None
        if fd is None:
            return
        try:
            self._record("release", token)  # before unlocking: the recorded turn encloses the GPU work
            try:
                found, _ = _parse_record(os.pread(fd, RECORD_SIZE, 0))
                if found != token:
                    _log.error("lock file %s changed under holder %s (token %s, file says %s): "
                               "was it deleted or written by hand?", self.lock_path, self.holder,
                               token, found)
            except (OSError, ValueError):
                pass
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    # -- state -------------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        with self._lock:
            return self._fd is not None

    @property
    def lost(self) -> bool:
        return False  # the kernel never takes a flock from a live holder

    @property
    def token(self) -> int | None:
        with self._lock:
            return self._token

    # -- fairness ----------------------------------------------------------------------------

    def _announce(self, waiting: bool) -> None:
        """Hold (or drop) a shared flock on the waiters file while we wait for the GPU."""
        if waiting:
            fd = os.open(self.waiters_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            fcntl.flock(fd, fcntl.LOCK_SH)  # blocks only for a prober's microsecond-long check
            self._announce_fd = fd
        elif self._announce_fd is not None:
            os.close(self._announce_fd)
            self._announce_fd = None

    def access_problem(self) -> str | None:
        """None while the lock directory can be written (both contenders need that)."""
        if not os.access(self.directory, os.W_OK | os.X_OK):
            return f"GPU lease directory {self.directory} is not writable by uid {os.getuid()}"
        return None

    def peer_waiting(self) -> bool:
        with self._probe_lock:
            if self._probe_fd is None:
                self._probe_fd = os.open(self.waiters_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(self._probe_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # some live contender holds a waiter's shared lock
            fcntl.flock(self._probe_fd, fcntl.LOCK_UN)
            return False

    def wait_for_peer(self, timeout: float | None = None) -> bool:
        end = time.monotonic() + (self.handoff_grace_s if timeout is None else timeout)
        seen = False
        while self.peer_waiting():
            seen = True
            if time.monotonic() >= end:
                return False
            time.sleep(0.0005)
        return seen

    def close(self) -> None:
        self.release()
        with self._lock:
            self._closed = True
            if self._attempt is not None:
                self._attempt.abandoned = True
        with self._probe_lock:
            if self._probe_fd is not None:
                os.close(self._probe_fd)
                self._probe_fd = None
