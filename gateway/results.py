"""Durable requests: jobs that outlive their call, and the store that keeps their results.

A Generate call that carries a caller-chosen ``request_id`` starts a *durable* job: it runs as a task of the
gateway, not of the call, so a dropped connection or a restarted client does not stop it. Its artifact chunks and
its ``done`` event are appended, in the bytes they go to the caller as, to a file (a 4-byte length, then the
message) as they arrive; progress events are kept in memory, the most recent ones only. Every caller of the job —
the one that started it and any that attach later with the same request or ``GetResult`` — reads that file from
its start at its own pace and gets progress live from the moment it attached. So a late caller gets every
artifact, a slow one holds no memory in the gateway, and when the job finishes the file is its stored result,
kept for ``results_retention_s`` within ``results_max_bytes``.

A failed or cancelled job keeps nothing: sending the request again runs it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import os
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from prometheus_client import Gauge

from gateway.relay import PROGRESS, Encoded, Outgoing, single_field
from trellisbox._domain.convert import progress_to_proto
from trellisbox._domain.errors import AlreadyExists, Cancelled
from trellisbox._domain.kinds import Stage
from trellisbox.v1 import gateway_pb2

_log = logging.getLogger(__name__)

DURABLE_JOBS = Gauge("trellisbox_gateway_durable_jobs", "Durable requests (with a request_id) running now.")
STORED_BYTES = Gauge("trellisbox_gateway_stored_result_bytes", "Bytes of finished results in the result store.")

_LENGTH = struct.Struct("<I")
#: Progress events a job keeps for callers that are reading its artifacts behind the live edge.
_RECENT_PROGRESS = 64


def request_fingerprint(request: gateway_pb2.GenerateRequest) -> str:
    """What makes two requests the same request: every field, images included, the formats as a set (their order
    and repeats ask for nothing different). CPU work: call it off the loop, before anything else reads
    ``request`` (its formats are put in order while it is serialized, then put back). A request whose formats are
    in order already has the fingerprint it had before formats were taken as a set, so results stored then match."""
    formats = list(request.formats)
    request.formats[:] = sorted(set(formats))
    try:
        return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    finally:
        request.formats[:] = formats


def _append_record(file: BinaryIO, data: bytes) -> None:
    file.write(_LENGTH.pack(len(data)))
    file.write(data)
    file.flush()  # readers of this file read only whole records the job has counted


def _read_record(file: BinaryIO) -> bytes:
    header = file.read(_LENGTH.size)
    if len(header) != _LENGTH.size:
        raise OSError(f"{file.name}: result record truncated")
    (length,) = _LENGTH.unpack(header)
    data = file.read(length)
    if len(data) != length:
        raise OSError(f"{file.name}: result record truncated")
    return data


def _is_progress(event: Outgoing) -> bool:
    if isinstance(event, Encoded):
        return single_field(event.data) == PROGRESS
    return event.WhichOneof("event") == "progress"


def _note(message: str) -> gateway_pb2.GenerateResponse:
    return gateway_pb2.GenerateResponse(progress=progress_to_proto(Stage.QUEUED, 0, 0, message))


def _check_same(request_id: str, stored: str, given: str | None) -> None:
    if given is not None and given != stored:
        raise AlreadyExists(f"request_id {request_id!r} is taken by a different request; use another id to run "
                            "this one, or GetResult to fetch that one")


@dataclass(frozen=True)
class StoredResult:
    """A finished durable job's result on disk."""

    request_id: str
    fingerprint: str
    finished_at: float
    size: int
    path: Path


class ResultStore:
    """Finished results, one ``<request_id>.result`` file each with a ``<request_id>.json`` beside it, written last.

    Expired results are deleted when the store is next used; beyond ``max_bytes`` the oldest go first. The
    directory may be shared by gateway replicas (a ReadWriteMany volume): lookups read it, not a local index.

    Args:
        root: The directory (created when missing).
        retention_s: How long a result is kept after it finished; 0 keeps none.
        max_bytes: Disk the results may take.
        stale_after_s: A job file nobody has written to for this long belongs to a job that died with its gateway.
    """

    def __init__(self, root: Path, retention_s: float, max_bytes: int, stale_after_s: float) -> None:
        self._root = root
        self._retention_s = retention_s
        self._max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for partial in root.glob("*.partial"):
            with contextlib.suppress(OSError):
                if now - partial.stat().st_mtime > stale_after_s:
                    partial.unlink()
        self.evict()

    @property
    def root(self) -> Path:
        return self._root

    def new_job_file(self, request_id: str) -> Path:
        return self._root / f"{request_id}.{uuid.uuid4().hex[:8]}.partial"

    def publish(self, request_id: str, fingerprint: str, job_file: Path) -> None:
        """Keep a finished job's file as its result (or delete it when nothing is retained)."""
        if self._retention_s <= 0:
            job_file.unlink(missing_ok=True)
            return
        result = self._root / f"{request_id}.result"
        os.replace(job_file, result)
        meta = {"request_id": request_id, "fingerprint": fingerprint, "finished_at": time.time(),
                "bytes": result.stat().st_size}
        staged = self._root / f".{request_id}.{uuid.uuid4().hex[:8]}.json"
        staged.write_text(json.dumps(meta))
        os.replace(staged, self._meta(request_id))
        self.evict()

    def lookup(self, request_id: str) -> StoredResult | None:
        """The stored result of ``request_id`` when there is one and it has not expired."""
        try:
            meta = json.loads(self._meta(request_id).read_text())
            stored = StoredResult(request_id, str(meta["fingerprint"]), float(meta["finished_at"]), int(meta["bytes"]),
                                  self._root / f"{request_id}.result")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if time.time() - stored.finished_at > self._retention_s:
            self.delete(request_id)
            return None
        return stored

    def delete(self, request_id: str) -> bool:
        """Delete a stored result; whether there was one. Callers reading it keep their open file."""
        found = self._meta(request_id).exists()
        for path in (self._meta(request_id), self._root / f"{request_id}.result"):
            path.unlink(missing_ok=True)
        return found

    def evict(self) -> None:
        """Delete expired results, then the oldest while the rest take more than ``max_bytes``."""
        now = time.time()
        kept: list[tuple[float, int, str]] = []
        for path in self._root.glob("*.json"):
            try:
                meta = json.loads(path.read_text())
                finished_at, size = float(meta["finished_at"]), int(meta["bytes"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            request_id = path.name.removesuffix(".json")
            if now - finished_at > self._retention_s:
                self.delete(request_id)
            else:
                kept.append((finished_at, size, request_id))
        total = sum(size for _, size, _ in kept)
        for _, size, request_id in sorted(kept):
            if total <= self._max_bytes:
                break
            self.delete(request_id)
            total -= size
        STORED_BYTES.set(total)

    def _meta(self, request_id: str) -> Path:
        return self._root / f"{request_id}.json"


class _Job:
    """A running durable job: its records on disk, its recent progress, and who is waiting for either."""

    def __init__(self, request_id: str, fingerprint: str, path: Path) -> None:
        self.request_id = request_id
        self.fingerprint = fingerprint
        self.path = path
        self._file = path.open("wb")
        self.records = 0
        self._progress: deque[tuple[int, Outgoing]] = deque(maxlen=_RECENT_PROGRESS)
        self._progress_seq = 0
        self._changed = asyncio.Event()
        self.finished = False
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None

    def add(self, event: Outgoing) -> None:
        if _is_progress(event):
            self._progress_seq += 1
            self._progress.append((self._progress_seq, event))
        else:
            _append_record(self._file, event.data if isinstance(event, Encoded) else event.SerializeToString())
            self.records += 1
        self._notify()

    def end(self, error: BaseException | None) -> None:
        self._file.close()
        self.finished = True
        self.error = error
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def follow(self, note: str | None) -> AsyncIterator[Outgoing]:
        """A caller's view of the job: ``note`` first, progress from now on, every record from the first."""
        # Opened now, while the job file is certainly there: it may be renamed (stored) or deleted (failed) later.
        return self._follow(self.path.open("rb"), self._progress_seq, note)

    async def _follow(self, reader: BinaryIO, seen: int, note: str | None) -> AsyncIterator[Outgoing]:
        with reader:
            if note:
                yield _note(note)
            sent = 0
            while True:
                changed = self._changed
                for seq, event in [item for item in self._progress if item[0] > seen]:
                    seen = seq
                    yield event
                while sent < self.records:
                    yield Encoded(await asyncio.to_thread(_read_record, reader))
                    sent += 1
                if self.finished and sent == self.records:
                    if self.error is not None:
                        raise self.error
                    return
                if changed is self._changed:
                    await changed.wait()


class CancelOutcome(enum.Enum):
    STOPPED = "stopped"
    DELETED = "deleted"


class DurableJobs:
    """The durable jobs this gateway runs, and the store their results go to.

    Args:
        store: Where finished results are kept.
    """

    def __init__(self, store: ResultStore) -> None:
        self._store = store
        self._running: dict[str, _Job] = {}

    def attach(self, request_id: str, fingerprint: str | None) -> AsyncIterator[Outgoing] | None:
        """The job ``request_id`` as a response stream: live while it runs, else its stored result; None when this
        gateway has neither.

        Args:
            fingerprint: The request's :func:`request_fingerprint`, or None to take whatever runs under that id.

        Raises:
            AlreadyExists: the id belongs to a different request.
        """
        job = self._running.get(request_id)
        if job is not None:
            _check_same(request_id, job.fingerprint, fingerprint)
            return job.follow(f"attached to the running request {request_id}")
        stored = self._store.lookup(request_id)
        if stored is None:
            return None
        _check_same(request_id, stored.fingerprint, fingerprint)
        try:
            reader = stored.path.open("rb")
        except FileNotFoundError:  # deleted since the lookup
            return None
        return self._replay(reader, stored)

    async def start(self, request_id: str, fingerprint: str, events: Callable[[], AsyncIterator[Outgoing]],
                    resources: AsyncExitStack) -> AsyncIterator[Outgoing]:
        """Run ``events()`` as the durable job ``request_id`` and follow it; ``resources`` are released when it ends.
        When the same request started meanwhile (two calls raced), follow that one instead.

        Raises:
            AlreadyExists: a different request took the id meanwhile.
        """
        attached = self.attach(request_id, fingerprint)
        if attached is not None:
            await resources.aclose()
            return attached
        job = _Job(request_id, fingerprint, self._store.new_job_file(request_id))
        self._running[request_id] = job
        DURABLE_JOBS.set(len(self._running))
        job.task = asyncio.get_running_loop().create_task(self._run(job, events, resources),
                                                          name=f"durable {request_id}")
        return job.follow(None)

    def cancel(self, request_id: str) -> CancelOutcome | None:
        """Stop the running job ``request_id``, or delete its stored result; None when there is neither."""
        job = self._running.get(request_id)
        if job is not None and job.task is not None:
            job.task.cancel()
            return CancelOutcome.STOPPED
        return CancelOutcome.DELETED if self._store.delete(request_id) else None

    async def drain(self, timeout_s: float) -> None:
        """Let running jobs finish for up to ``timeout_s``, then stop the rest (the gateway is shutting down)."""
        tasks = [job.task for job in self._running.values() if job.task is not None]
        if not tasks:
            return
        _log.info("waiting up to %.0f s for %d durable request(s)", timeout_s, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _run(self, job: _Job, events: Callable[[], AsyncIterator[Outgoing]], resources: AsyncExitStack) -> None:
        error: BaseException | None = None
        try:
            async with resources:
                async for event in events():
                    job.add(event)
        except asyncio.CancelledError:
            error = Cancelled(f"request {job.request_id} was cancelled (Cancel, or the gateway shut down)")
            _log.info("durable request cancelled")
        except Exception as exc:  # passed to every caller of the job; the interceptor maps it to a status
            error = exc
        finally:
            # One synchronous step: the job leaves the registry and its file is stored or deleted together, so a
            # caller either finds it running (and opens the file first) or finds the stored result.
            job.end(error)
            del self._running[job.request_id]
            DURABLE_JOBS.set(len(self._running))
            if error is None:
                try:
                    self._store.publish(job.request_id, job.fingerprint, job.path)
                except OSError:
                    _log.exception("could not store the result of request %s", job.request_id)
            else:
                job.path.unlink(missing_ok=True)

    async def _replay(self, reader: BinaryIO, stored: StoredResult) -> AsyncIterator[Outgoing]:
        with reader:
            age = time.time() - stored.finished_at
            yield _note(f"the stored result of request {stored.request_id} (finished {age:.0f} s ago)")
            size = os.fstat(reader.fileno()).st_size
            while reader.tell() < size:
                yield Encoded(await asyncio.to_thread(_read_record, reader))
