"""Dynamic batching: concurrent compatible refine requests share one pipeline call on the model worker.

Every refine request goes through the batcher; with batching off (a zero window, one image per call, or a
backend that cannot share a call) each request is a group of one: one job on the model worker, exactly as
unbatched.

How a batch forms (all bookkeeping on the event loop, except the seal on the model thread):

- A request whose images the backend can batch (``batch_key`` not None, at most ``max_images`` images)
  joins the open group of its key when the group has room, otherwise opens a new group.
- A new group is handed to the :class:`~trellisbox._runtime.worker.ModelWorker` after ``window_s`` when the worker
  is idle (time for concurrent requests to arrive), at once when the worker is busy (the group waits in
  the worker's queue anyway) or when it is full.
- The group accepts joiners until the model thread starts it: then it is sealed. So under load, every
  compatible request that arrives while the previous job runs rides in the next call, up to
  ``max_images`` images.
- A group of one request runs exactly as without batching (``backend.refine``: image by image, progress
  per image, bit-identical to a direct diffusers call); two or more run as one ``backend.refine_batch``.

Each request keeps its seeds, prompts, result, progress events and cancellation: a member whose caller
goes away (or whose deadline passes) leaves the group, or, once the call runs, gets its error while the
others go on; the denoising loop stops only when every member has stopped. All model work still goes
through the one worker, and thus the GPU lease in shared placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field

from PIL import Image
from prometheus_client import Histogram

from refiner_service.backends.base import BatchMember, RefinerBackend, stop_reason
from trellisbox._domain.errors import Cancelled, DeadlineExceeded, ServiceError
from trellisbox._domain.params import RefineParams
from trellisbox._runtime.model import ModelHost
from trellisbox._runtime.observability import REQUEST_ID
from trellisbox._runtime.worker import Finished, JobContext, ProgressEvent, ProgressGate, log_stop

_log = logging.getLogger(__name__)

BATCH_IMAGES = Histogram(
    "trellisbox_batch_images", "Images per model call with dynamic batching on (1: the request ran alone).",
    ["service"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
BATCH_REQUESTS = Histogram(
    "trellisbox_batch_requests", "Requests per model job with dynamic batching on.",
    ["service"], buckets=(1, 2, 3, 4, 6, 8, 12, 16),
)

Images = list[Image.Image]
_Item = ProgressEvent | Finished[Images] | BaseException


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """Run ``fn(*args)`` on ``loop`` from the model thread; a loop already closed has nobody left to tell."""
    with contextlib.suppress(RuntimeError):  # "Event loop is closed": must not break the shared model call
        loop.call_soon_threadsafe(fn, *args)


@dataclass(eq=False)
class _Member:
    """One request inside a group."""

    images: Sequence[Image.Image]
    seeds: Sequence[int]
    params: RefineParams
    ctx: JobContext
    progress: ProgressGate  # ctx reports through it
    events: asyncio.Queue[_Item]
    loop: asyncio.AbstractEventLoop
    submitted: float
    ended: bool = False  # its final item (result or error) is in ``events`` or on its way there

    @property
    def request_id(self) -> str:
        return self.ctx.request_id


@dataclass(eq=False)
class _Group:
    """Requests that will share one model job."""

    key: Hashable | None
    members: list[_Member] = field(default_factory=list)
    images: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # members/sealed: loop vs model thread
    sealed: bool = False  # the model thread took it (or everyone left): nobody joins any more
    abandoned: bool = False  # everyone left before it ran
    dispatched: bool = False
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None
    started: float = 0.0
    run_s: float = 0.0


class DynamicBatcher:
    """Groups compatible refine requests into shared model calls on the service's model thread.

    Args:
        host: The model thread and the backend (``supports_batching`` decides whether requests are ever grouped).
        window_s: How long a new group waits for company while the worker is idle; 0 turns batching off.
        max_images: Most images in one call; a request with more runs alone; 1 turns batching off.
    """

    def __init__(self, host: ModelHost[RefinerBackend], *, window_s: float, max_images: int) -> None:
        if window_s < 0 or max_images < 1:
            raise ValueError(f"window_s must be >= 0 and max_images >= 1, got {window_s}, {max_images}")
        self._host = host
        self._worker = host.worker
        self._service = host.service
        self._window_s = window_s
        self._max_images = max_images
        self._enabled = window_s > 0 and max_images > 1
        self._open: dict[Hashable, list[_Group]] = {}  # groups that may still take joiners, per key
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones

    async def run(self, images: Sequence[Image.Image], params: RefineParams, seeds: Sequence[int], *,
                  request_id: str, deadline: float | None = None
                  ) -> AsyncIterator[ProgressEvent | Finished[Images]]:
        """Refine ``images`` (maybe together with other requests) and stream progress, then :class:`Finished`.

        Same contract as :meth:`ModelWorker.run` with a job that calls ``backend.refine``: ``Finished.queued_s``
        runs from this call to the start of the model call, ``run_s`` is the model call's duration.

        Raises:
            QueueFull: the worker's waiting line is full.
            ServiceError: what the model call raised, or ``Cancelled``/``DeadlineExceeded`` for this request.
        """
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Item] = asyncio.Queue()

        gate = ProgressGate(events.put_nowait, loop, self._worker.progress_interval_s)
        member = _Member(images, seeds, params, JobContext(request_id, deadline, gate), gate, events, loop,
                         time.monotonic())
        backend = self._host.require()
        shares = self._enabled and backend.supports_batching
        key = backend.batch_key(images, params) if shares else None
        group = self._place(member, None if len(images) > self._max_images else key)
        received_final = False
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    received_final = True
                    raise item
                if isinstance(item, Finished):
                    received_final = True
                    yield item
                    return
                yield item
        finally:
            if not received_final:
                member.ctx.cancel()  # the caller went away: stop this member at the next step
                self._leave(group, member)

    # -- forming groups (event loop) -------------------------------------------------------------------

    def _place(self, member: _Member, key: Hashable | None) -> _Group:
        size = len(member.images)
        if key is not None:
            groups = self._open.get(key, [])
            for group in list(groups):
                with group.lock:
                    if group.sealed:
                        groups.remove(group)
                        continue
                    if group.images + size > self._max_images:
                        continue
                    group.members.append(member)
                    group.images += size
                    full = group.images >= self._max_images
                if full:
                    groups.remove(group)
                    self._dispatch(group)  # no-op when it is already queued
                return group
        group = _Group(key, [member], size)
        if key is None or size >= self._max_images:
            self._dispatch(group)  # alone by nature, or already full
            return group
        self._open.setdefault(key, []).append(group)
        if self._worker.in_flight or self._worker.queue_depth:
            self._dispatch(group)  # busy worker: it waits (and takes joiners) in the queue anyway
        else:
            group.timer = asyncio.get_running_loop().call_later(self._window_s, self._dispatch, group)
        return group

    def _dispatch(self, group: _Group) -> None:
        if group.dispatched or group.abandoned:
            return
        group.dispatched = True
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        task = asyncio.get_running_loop().create_task(self._drive(group))
        group.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _leave(self, group: _Group, member: _Member) -> None:
        """``member``'s caller went away. Before the group runs: drop it (and the group once empty)."""
        with group.lock:
            if group.sealed:
                return  # running or done: the step callback sees its stopped context
            group.members.remove(member)
            group.images -= len(member.images)
            if group.members:
                return
            group.sealed = group.abandoned = True
        if group.timer is not None:
            group.timer.cancel()
        if group.task is not None:
            group.task.cancel()  # closes the worker's stream: its job stops before the GPU turn
        self._close(group)

    # -- running a group ------------------------------------------------------------------------------

    async def _drive(self, group: _Group) -> None:
        """Submit the group's job to the worker and hand each member its outcome."""
        first = group.members[0].request_id if group.members else "batch"
        try:
            await self._drive_job(group, first)
        finally:
            self._close(group)

    def _close(self, group: _Group) -> None:
        """The group ran (or failed): nobody may join it any more, and the open index forgets it."""
        with group.lock:
            group.sealed = True
        groups = self._open.get(group.key, [])
        if group in groups:
            groups.remove(group)
        if not groups:
            self._open.pop(group.key, None)

    async def _drive_job(self, group: _Group, first: str) -> None:
        try:
            outcome: Finished[dict[int, Images | ServiceError]] | None = None
            async for event in self._worker.run(lambda ctx: self._job(group), request_id=first,
                                                deadline=self._latest_deadline(group)):
                if isinstance(event, Finished):
                    outcome = event
                else:
                    for member in self._snapshot(group):
                        member.events.put_nowait(event)  # "n ahead in the queue"
            if outcome is None:
                raise RuntimeError("the model worker ended without a result")
        except asyncio.CancelledError:
            return  # every member left before the job ran
        except Exception as exc:  # QueueFull, ModelUnavailable, a failed model call: every member gets it
            for member in self._snapshot(group):
                self._end(member, exc)
            return
        for index, member in enumerate(self._snapshot(group)):
            result = outcome.value.get(index)
            if result is None:
                continue  # already ended while the call ran
            if isinstance(result, ServiceError):
                self._end(member, result)
            else:
                queued = max(0.0, group.started - member.submitted)
                self._end(member, Finished(result, queued_s=queued, run_s=group.run_s))

    def _latest_deadline(self, group: _Group) -> float | None:
        """The group's job may wait (queue, GPU lease) until its last member's deadline; None if one has none."""
        deadlines = [member.ctx.deadline for member in self._snapshot(group)]
        return None if not deadlines or None in deadlines else max(d for d in deadlines if d is not None)

    @staticmethod
    def _snapshot(group: _Group) -> list[_Member]:
        with group.lock:
            return list(group.members)

    @staticmethod
    def _end(member: _Member, item: Finished[Images] | BaseException) -> None:
        """Hand ``member`` its final item (event loop only)."""
        if not member.ended:
            member.ended = True
            member.progress.finish(lambda: member.events.put_nowait(item))  # its newest progress, then the end

    def _job(self, group: _Group) -> dict[int, Images | ServiceError]:
        """The group's job, on the model thread: seal, drop stopped members, run one model call."""
        with group.lock:
            if group.abandoned:
                raise Cancelled("every request of the batch went away")
            group.sealed = True
            members = list(group.members)
        group.started = time.monotonic()
        outcomes: dict[int, Images | ServiceError] = {}
        live = []
        for index, member in enumerate(members):
            if member.ctx.should_stop:
                outcomes[index] = stop_reason(member.ctx)
            else:
                live.append(index)
        token = REQUEST_ID.set("+".join(members[i].request_id for i in live) or "-")
        try:
            if len(live) == 1:
                outcomes.update(self._run_alone(live[0], members[live[0]], group.started))
            elif live:
                outcomes.update(self._run_together(live, members))
        finally:
            group.run_s = time.monotonic() - group.started
            REQUEST_ID.reset(token)
        return outcomes

    def _run_alone(self, index: int, member: _Member, started: float) -> dict[int, Images | ServiceError]:
        """One request: exactly the unbatched path (image by image, progress per image)."""
        BATCH_REQUESTS.labels(self._service).observe(1)
        for _ in member.images:
            BATCH_IMAGES.labels(self._service).observe(1)
        try:
            return {index: self._host.require().refine(member.images, member.params, member.seeds, member.ctx)}
        except (Cancelled, DeadlineExceeded) as exc:
            log_stop(member.ctx, exc, started)
            return {index: exc}

    def _run_together(self, live: list[int], members: list[_Member]) -> dict[int, Images | ServiceError]:
        """Two or more requests: one ``refine_batch`` call."""
        images = sum(len(members[i].images) for i in live)
        BATCH_REQUESTS.labels(self._service).observe(len(live))
        BATCH_IMAGES.labels(self._service).observe(images)
        _log.info("batched %d requests (%d images) into one pipeline call: %s", len(live), images,
                  ", ".join(members[i].request_id for i in live))

        def notifier(member: _Member) -> Callable[[ServiceError], None]:
            def notify(error: ServiceError) -> None:
                # On the model thread: hand the stopped member its error now, not when the batch ends.
                _post(member.loop, self._end, member, error)

            return notify

        batch = [BatchMember(members[i].images, members[i].seeds, members[i].params, members[i].ctx,
                             on_stop=notifier(members[i])) for i in live]
        results = self._host.require().refine_batch(batch)
        return dict(zip(live, results, strict=True))
