"""Admission control: a bounded number of requests run, a bounded number wait, the rest are refused.

A request is admitted or refused the moment it arrives (:meth:`Admission.enter`), before anything is sent
back: a refused caller gets ``RESOURCE_EXHAUSTED`` as the call's only message, with a retry hint, so gRPC
clients can retry it transparently; an admitted one may then be told it waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from trellisbox._domain.errors import QueueFull
from trellisbox._runtime.observability import IN_FLIGHT, QUEUE_DEPTH

#: What a refused caller is told to wait before retrying (``grpc-retry-pushback-ms``).
RETRY_AFTER_S = 1.0


class Ticket:
    """An admitted request: it holds a place in the queue until it gets a slot or leaves."""

    def __init__(self, admission: Admission, waits: bool, ahead: int) -> None:
        self._admission = admission
        #: Every slot was busy when it arrived: it waits in the queue.
        self.waits = waits
        #: Requests admitted before it that still wait for a slot.
        self.ahead = ahead
        self._queued = True

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a slot and hold it for the body."""
        await self._admission._acquire(self)
        try:
            yield
        finally:
            self._admission._release()

    def leave(self) -> None:
        """Give the queue place back if the request goes away before it got a slot (idempotent)."""
        if self._queued:
            self._queued = False
            self._admission._dequeue()


class Admission:
    """Args:
        max_concurrent: Requests routed through the stages at once.
        max_queue: Requests that may wait for a slot; one more gets RESOURCE_EXHAUSTED.
    """

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_queue = max_queue
        self._waiting = 0
        self._running = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    def _publish(self) -> None:
        QUEUE_DEPTH.labels("gateway").set(self._waiting)
        IN_FLIGHT.labels("gateway").set(self._running)

    def enter(self) -> Ticket:
        """Admit the request now or refuse it now.

        Raises:
            QueueFull: every slot is busy and the queue is full (nothing has been sent to the caller yet).
        """
        busy = self._slots.locked()
        if busy and self._waiting >= self._max_queue:
            raise QueueFull(f"gateway is at capacity ({self._waiting} requests waiting, limit {self._max_queue}); "
                            "retry later", retry_after_s=RETRY_AFTER_S)
        ticket = Ticket(self, waits=busy, ahead=self._waiting)
        self._waiting += 1
        self._publish()
        return ticket

    async def _acquire(self, ticket: Ticket) -> None:
        try:
            await self._slots.acquire()
        finally:
            ticket.leave()
        self._running += 1
        self._publish()

    def _dequeue(self) -> None:
        self._waiting -= 1
        self._publish()

    def _release(self) -> None:
        self._running -= 1
        self._slots.release()
        self._publish()
