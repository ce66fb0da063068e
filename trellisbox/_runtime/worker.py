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
from trellisbox._runtime.allocator import release_memory
from trellisbox._runtime.observability import IN_FLIGHT, QUEUE_DEPTH, STAGE, name_os_thread

_log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    """``step`` of ``total`` in ``stage``."""

    stage: Stage
    step: int
    total: int
    message: str = ""


class ProgressGate:
    """Hands a job's progress events to its caller's event loop at most once per ``interval_s``, newest first.

    Each hand-off wakes the service's event loop (which takes the GIL from the model thread), and each event wakes the
    gateway and the client; a fast CPU model reports a step every few milliseconds, and relaying every one cost the
    gateway and the client 1-1.5 ms of CPU per request each (docs/benchmarks.md). Progress is state, not a log: a
    caller needs the newest step a few times a second, every stage, and each stage's final step. So:

    - an event goes out at once when it is the job's first, opens a new part of the job (a new stage, or a step
      count that starts again, as the refiner's next image does), or comes ``interval_s`` or more after the last
      hand-off;
    - any other event is held, and a newer one replaces it; the held event goes out when the interval ends, or with
      the event that opens the next part (the part's final state, then the new part, in one hand-off), or just
      before the job's result (:meth:`finish`), whichever comes first.

    Events reach the caller in the order reported; only steps that a newer step of the same part replaced within
    one interval are left out. ``interval_s`` 0 hands every event over as it comes.

    The timer that ends an interval is set by the loop itself as it delivers a hand-off (it is awake then anyway):
    the model thread wakes the loop only for what goes out, not to set a timer for what it holds, except when an
    event is held after the loop's last timer found nothing to send (docs/benchmarks.md, issue 16, twelfth round).
    The price, for a job whose steps are slower than the interval: one timer per step that finds nothing to send, a
    wake of the loop on its own thread rather than one the model thread causes.

    Args:
        deliver: Puts one event on the caller's stream; called on ``loop``'s thread.
        loop: The caller's event loop.
        interval_s: The least time between two hand-offs, except for an event that opens a part of the job.
    """

    def __init__(self, deliver: Callable[[ProgressEvent], None], loop: asyncio.AbstractEventLoop,
                 interval_s: float) -> None:
        self._deliver = deliver
        self._loop = loop
        self._interval_s = interval_s
        self._lock = threading.Lock()  # the model thread reports; the loop's timer and finish take what is held
        self._last: ProgressEvent | None = None
        self._last_at = 0.0
        self._held: ProgressEvent | None = None
        self._timer_set = False  # a timer is set, or the loop has been asked to set one
        self._finished = False  # the loop's thread only, as the timer
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, event: ProgressEvent) -> None:
        """Report ``event`` (any thread; never blocks)."""
        with self._lock:
            now = time.monotonic()
            newest = self._held or self._last
            # A new stage, or a count that starts again (the refiner's next image): a part of the job the caller
            # must see begin, after the newest state of the part before it.
            opens = newest is None or event.stage != newest.stage or event.step < newest.step
            if self._interval_s <= 0 or opens or now - self._last_at >= self._interval_s:
                held, self._held = self._held, None
                out = [held, event] if held is not None and opens else [event]
                self._last, self._last_at = event, now
                # Under the lock: what the timer hands off later was reported later, and is queued after this.
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody is left to tell
                    self._loop.call_soon_threadsafe(self._deliver_then, out, None)
                return
            self._held = event
            if self._timer_set:
                return  # the interval's timer sends it
            self._timer_set = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._set_timer)

    def finish(self, then: Callable[[], None]) -> None:
        """On the loop's thread, as the job's stream ends: hand off the held event (the job's newest state), then
        call ``then`` (which puts the stream's last item), after every event already on its way."""
        with self._lock:
            held, self._held = self._held, None
        self._finished = True  # the loop's thread only, as the timer
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop.call_soon(self._deliver_then, [held] if held is not None else [], then)

    def _set_timer(self, restart: bool = False) -> None:
        """On the loop's thread: end the current interval with :meth:`_send_held`; a timer already set stays, or with
        ``restart`` (an event just went out, so the interval starts again) moves to the new interval's end."""
        if self._interval_s <= 0:
            return
        if self._timer is not None:
            if not restart:
                return
            self._timer.cancel()
            self._timer = None
        if self._finished:
            return
        # Without the lock, which the model thread may hold as it waits for the GIL that this thread has: a stale
        # _last_at only ends the interval early, and _send_held then waits out the rest.
        self._timer_set = True
        delay = self._last_at + self._interval_s - time.monotonic()
        self._timer = self._loop.call_later(max(delay, 0.0), self._send_held)

    def _send_held(self) -> None:
        self._timer = None
        with self._lock:
            self._timer_set = False
            held = self._held
            if held is None:
                return  # nothing to send: the next event held asks for a timer again
            now = time.monotonic()
            if now < self._last_at + self._interval_s - 0.001:
                wait = True  # an event went out since this timer was set: its interval has not ended yet
            else:
                wait = False
                self._held, self._last, self._last_at = None, held, now
                # call_soon: after every hand-off the model thread queued before this one.
                self._loop.call_soon(self._deliver_then, [held], None)
        if wait:
            self._set_timer()

    def _deliver_then(self, events: list[ProgressEvent], then: Callable[[], None] | None) -> None:
        for event in events:
            self._deliver(event)
        if then is not None:
            then()
        else:
            # Awake anyway: more events are likely within the interval, and this timer sends the newest at its end.
            self._set_timer(restart=True)


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
        progress_interval_s: How often, at most, a job's progress goes to the event loop, except for an event
            that opens a part of the job (:class:`ProgressGate`); 0: every event as it comes.
    """

    def __init__(self, service: str, max_queue: int,
                 gpu_turn: Callable[[JobContext], AbstractContextManager[None]] | None = None,
                 release_when_idle_s: float | None = None, progress_interval_s: float = 0.0) -> None:
        self._service = service
        self.progress_interval_s = progress_interval_s
        self._max_queue = max_queue
        self._gpu_turn = gpu_turn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{service}-model",
                                            initializer=name_os_thread)
        # Counted where each happens, so that no count needs a wake of the loop: admissions on the loop's thread,
        # starts and ends on the model thread (where the GPU lease reads the queue depth as a turn ends).
        self._admissions = 0
        self._starts = 0
        self._ends = 0
        self._release_when_idle_s = release_when_idle_s
        self._idle_release: asyncio.TimerHandle | None = None

    @property
    def queue_depth(self) -> int:
        """Jobs admitted that have not started."""
        return self._admissions - self._starts

    @property
    def in_flight(self) -> int:
        """1 while a job runs, else 0."""
        return self._starts - self._ends

    @property
    def _admitted(self) -> int:
        return self._admissions - self._ends

    def _publish(self) -> None:
        QUEUE_DEPTH.labels(self._service).set(self.queue_depth)
        IN_FLIGHT.labels(self._service).set(self.in_flight)

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

        gate = ProgressGate(events.put_nowait, loop, self.progress_interval_s)
        ctx = JobContext(request_id, deadline, gate)
        ahead = self._admitted  # the jobs waiting and the one running: a caller behind a running job waits too
        self._admissions += 1
        self._publish()

        submitted = time.monotonic()
        computing: list[float] = []  # [start, end] of the job itself, set on the model thread

        def body() -> T:
            self._starts += 1  # here, not on the loop: a wake of the loop is a wait for the GIL on this thread
            self._publish()
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
            finally:
                self._ends += 1  # after the GPU turn, whose end reads the queue depth

        # Copy the caller's context so log lines from the model thread carry its request id.
        future = loop.run_in_executor(self._executor, contextvars.copy_context().run, body)

        def finished(done: asyncio.Future[T]) -> None:
            self._publish()
            if self._admitted == 0:
                self._schedule_release(loop)
            gate.finish(lambda: events.put_nowait(None))  # the job's newest progress, then the end of the stream
            if not done.cancelled():
                # Mark the outcome as seen: a job that stopped because its caller went away has nobody
                # left to read its Cancelled, and asyncio would log "exception was never retrieved".
                # A caller still listening gets the exception from future.result() all the same.
                done.exception()

        future.add_done_callback(finished)
        try:
            if ahead > 0:
                yield ProgressEvent(Stage.QUEUED, 0, ahead, f"{ahead} ahead in the queue")
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

    def shutdown(self) -> None:
        if self._idle_release is not None:
            self._idle_release.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
