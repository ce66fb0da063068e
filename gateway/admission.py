"""Admission control: a bounded number of requests run, a bounded number wait, the rest are refused; and a
bounded number of request bytes are held at all.

A request is admitted or refused the moment it arrives (:meth:`Admission.enter`), before anything is sent
back: a refused caller gets ``RESOURCE_EXHAUSTED`` as the call's only message, with a retry hint, so gRPC
clients can retry it transparently; an admitted one may then be told it waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from prometheus_client import Gauge

from trellisbox._domain.errors import QueueFull
from trellisbox._runtime.observability import IN_FLIGHT, QUEUE_DEPTH

HELD_BYTES = Gauge("trellisbox_gateway_held_request_bytes", "Bytes of requests the gateway holds past the transport.")

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


class ByteBudget:
    """The bytes of requests the gateway holds past the transport: received messages being validated and routed.

    A request that would go over the budget is refused (``RESOURCE_EXHAUSTED``, with a retry hint) before any of its
    images is decoded, so many large uploads at once cannot take the gateway's memory. One request is always let
    in when nothing is held, however large (the transport's ``max_request_bytes`` bounds it).

    Args:
        max_bytes: The budget.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._held = 0

    @property
    def held(self) -> int:
        return self._held

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[Callable[[int], None]]:
        """Hold ``nbytes`` for the body; the body may change its hold (a temporary decode reservation).

        Raises:
            QueueFull: the budget is spent.
        """
        held = [0]

        def resize(new: int) -> None:
            if new > held[0] and self._held > held[0] and self._held - held[0] + new > self._max_bytes:
                raise QueueFull(
                    f"gateway is holding {self._held / 2**20:.0f} MiB of requests (limit "
                    f"{self._max_bytes / 2**20:.0f} MiB); retry later", retry_after_s=RETRY_AFTER_S)
            self._held += new - held[0]
            held[0] = new
            HELD_BYTES.set(self._held)

        resize(nbytes)
        try:
            yield resize
        finally:
            resize(0)
