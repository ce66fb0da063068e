"""The single model worker: one thread owns the model, jobs run one at a time, in arrival order.

Upstream pipelines (TRELLIS, diffusers) are not thread-safe, so every model call goes through one
:class:`ModelWorker`. The asyncio side gets a stream of progress events and then the result; a caller
that goes away (cancel, deadline) stops its job at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Generic, TypeVar

from trellisbox._domain.errors import Cancelled, DeadlineExceeded, QueueFull
from trellisbox._domain.kinds import Stage
from trellisbox._runtime.observability import IN_FLIGHT, QUEUE_DEPTH, STAGE
from trellisbox._runtime.server import release_memory

_log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    """``step`` of ``total`` in ``stage``."""

    stage: Stage
    step: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class Finished(Generic[T]):
    """The job's return value; always the last item of :meth:`ModelWorker.run`.

    Args:
        value: What the job returned.
        queued_s: Seconds from submission until the job started computing (queue and GPU-lease wait).
        run_s: Seconds the job computed.
    """

    value: T
    queued_s: float = 0.0
    run_s: float = 0.0


class JobContext:
    """What a running job sees: where to report progress and whether it should stop."""

    def __init__(self, request_id: str, deadline: float | None,
                 report: Callable[[ProgressEvent], None]) -> None:
        self.request_id = request_id
        self.deadline = deadline  # time.monotonic() seconds, or None
        self._report = report
        self._stop = threading.Event()
        self._cancelled_at: float | None = None

    def report(self, stage: Stage, step: int, total: int, message: str = "") -> None:
        """Send a progress event to the caller (thread-safe, never blocks); the job's log lines name ``stage`` from
        here on."""
        STAGE.set(stage.label)  # the job's own context (a copy per job): its later log lines
        self._report(ProgressEvent(stage, step, total, message))

    def cancel(self) -> None:
        """The caller went away (or gRPC ended the call at its deadline): stop at the next step."""
        if self._cancelled_at is None:
            self._cancelled_at = time.monotonic()
        self._stop.set()

    @property
    def should_stop(self) -> bool:
        """True once the caller cancelled or the deadline passed: stop at the next step."""
        return self._stop.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)

    @property
    def stop_asked_at(self) -> float | None:
        """When the job was first asked to stop (``time.monotonic()``): the deadline or the cancel, whichever came
        first; None while it need not stop."""
        moments = [m for m in (self._cancelled_at, self.deadline) if m is not None and m <= time.monotonic()]
        return min(moments) if moments else None

    def raise_if_stopped(self) -> None:
        """Raise ``DeadlineExceeded`` or ``Cancelled``, whichever happened first, once the job should stop."""
        asked = self.stop_asked_at
        if asked is None:
            return
        if self.deadline is not None and self.deadline <= asked:
            # gRPC also cancels a call whose deadline passed: that is still the deadline, not the caller.
            raise DeadlineExceeded("the deadline passed before the work finished")
        raise Cancelled("cancelled by the caller")


def log_stop(ctx: JobContext, error: Cancelled | DeadlineExceeded, started: float) -> None:
    """Say, with the request id, that a job stopped, why, and how long stopping took after it was asked."""
    now = time.monotonic()
    asked = ctx.stop_asked_at
    lag = f"{now - asked:.2f} s after it was asked" if asked is not None else "at once"
    why = "its deadline passed" if isinstance(error, DeadlineExceeded) else "cancelled by the caller"
    _log.info("request %s stopped: %s; it stopped %s, after %.2f s of work", ctx.request_id, why, lag,
              now - started)


class ModelWorker:
    """Runs model jobs on one dedicated thread with a bounded waiting line.

    Args:
        service: Name used in metrics and thread names.
        max_queue: Jobs that may wait while one runs; one more is refused with ``QueueFull``.
        gpu_turn: Optional context manager factory entered around each job (the GPU lease).
        release_when_idle_s: Once no job has been waiting or running for this long, collect the jobs' reference
            cycles and return the heap's free pages to the system (``release_memory``, in a thread). Jobs that follow
            each other closely reuse the memory the last one freed instead of faulting it in again; an idle service
            still gives it back. None: never.
    """

    def __init__(self, service: str, max_queue: int,
                 gpu_turn: Callable[[JobContext], AbstractContextManager[None]] | None = None,
                 release_when_idle_s: float | None = None) -> None:
        self._service = service
        self._max_queue = max_queue
        self._gpu_turn = gpu_turn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{service}-model")
        self._admitted = 0  # waiting + running; touched only on the event loop thread
        self._running = 0
        self._release_when_idle_s = release_when_idle_s
        self._idle_release: asyncio.TimerHandle | None = None

    @property
    def queue_depth(self) -> int:
        return self._admitted - self._running

    @property
    def in_flight(self) -> int:
        return self._running

    def _publish(self) -> None:
        QUEUE_DEPTH.labels(self._service).set(self.queue_depth)
        IN_FLIGHT.labels(self._service).set(self._running)

    def call_blocking(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread and wait (startup: load and warm-up), in a copy of the caller's context:
        what it sets (the stage its warm-up run reports) stays out of the thread's later work."""
        return self._executor.submit(contextvars.copy_context().run, fn).result()

    async def run(self, job: Callable[[JobContext], T], *, request_id: str,
                  deadline: float | None = None) -> AsyncIterator[ProgressEvent | Finished[T]]:
        """Queue ``job`` and stream its progress, then :class:`Finished` with its result.

        Raises:
            QueueFull: the waiting line is full.
            ServiceError: whatever the job raised.
        """
        if self._admitted > self._max_queue:
            raise QueueFull(
                f"{self._service} is busy: {self.queue_depth} requests waiting (limit {self._max_queue}); "
                "retry later", retry_after_s=1.0,
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ProgressEvent | None] = asyncio.Queue()

        def report(event: ProgressEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        ctx = JobContext(request_id, deadline, report)
        position = self.queue_depth
        self._admitted += 1
        self._publish()

        submitted = time.monotonic()
        computing: list[float] = []  # [start, end] of the job itself, set on the model thread

        def body() -> T:
            loop.call_soon_threadsafe(self._started)
            STAGE.set(Stage.QUEUED.label)  # until the job reports its first stage: the GPU turn's wait
            started = time.monotonic()
            try:
                ctx.raise_if_stopped()  # cancelled while it waited: do not touch the model
                with self._gpu_turn(ctx) if self._gpu_turn else contextlib.nullcontext():
                    ctx.raise_if_stopped()
                    computing.append(time.monotonic())
                    try:
                        return job(ctx)
                    finally:
                        computing.append(time.monotonic())
            except (Cancelled, DeadlineExceeded) as exc:
                log_stop(ctx, exc, started)
                raise

        # Copy the caller's context so log lines from the model thread carry its request id.
        future = loop.run_in_executor(self._executor, contextvars.copy_context().run, body)

        def finished(done: asyncio.Future[T]) -> None:
            self._admitted -= 1
            self._running -= 1
            self._publish()
            if self._admitted == 0:
                self._schedule_release(loop)
            events.put_nowait(None)
            if not done.cancelled():
                # Mark the outcome as seen: a job that stopped because its caller went away has nobody
                # left to read its Cancelled, and asyncio would log "exception was never retrieved".
                # A caller still listening gets the exception from future.result() all the same.
                done.exception()

        future.add_done_callback(finished)
        try:
            if position > 0:
                yield ProgressEvent(Stage.QUEUED, 0, position, f"{position} ahead in the queue")
            while (event := await events.get()) is not None:
                yield event
            value = future.result()
            yield Finished(value, queued_s=computing[0] - submitted, run_s=computing[1] - computing[0])
        finally:
            if not future.done():
                ctx.cancel()  # the caller went away: stop the job at its next step

    def _schedule_release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Release memory ``release_when_idle_s`` from now, unless a job is admitted meanwhile (then after it)."""
        if self._release_when_idle_s is None:
            return
        if self._idle_release is not None:
            self._idle_release.cancel()
        self._idle_release = loop.call_later(self._release_when_idle_s, self._release_if_idle, loop)

    def _release_if_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        self._idle_release = None
        if self._admitted == 0:
            loop.run_in_executor(None, release_memory)  # the last jobs' reference cycles, then the free pages

    def _started(self) -> None:
        self._running += 1
        self._publish()

    def shutdown(self) -> None:
        if self._idle_release is not None:
            self._idle_release.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
