"""Admission control: a bounded number of requests run, a bounded number wait, the rest are refused; and a
bounded number of request bytes are held at all.

A request is admitted or refused the moment it arrives (:meth:`Admission.enter`), before anything is sent
back: a refused caller gets ``RESOURCE_EXHAUSTED`` as the call's only message, with a retry hint, so gRPC
clients can retry it transparently; an admitted one may then be told it waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator
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


class Hold:
    """Bytes one request holds in a :class:`ByteBudget`."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.nbytes = 0

    def resize(self, nbytes: int) -> None:
        """Hold ``nbytes`` from now on; a growth that does not fit is refused now.

        Raises:
            QueueFull: the budget is spent.
        """
        self._budget._resize(self, nbytes)


class ByteBudget:
    """The bytes of requests the gateway holds: requests being received, validated and routed.

    The gateway reads a request only once the budget has room for the largest one twice (``max_request_bytes``: it
    and the stage request built from it): until then HTTP/2 flow control keeps its bytes at the client, so any
    number of uploads at once cannot take the gateway's memory. Once read, it keeps twice its own size until it
    ends and gives the rest back; it never needs more, so a request read is never refused for room. Requests
    waiting for room get it in the order they came, or are refused after waiting (``RESOURCE_EXHAUSTED``, with a
    retry hint). One request is always let in when nothing is held, however large (the transport's
    ``max_request_bytes`` bounds it). A hold that grows (:meth:`Hold.resize`) gets the room at once or is refused.

    Args:
        max_bytes: The budget.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._held = 0
        self._waiters: deque[tuple[int, Hold, asyncio.Future[None]]] = deque()

    @property
    def held(self) -> int:
        return self._held

    def _refusal(self, needed: int, waiting: int = 0) -> QueueFull:
        also = f" and {waiting} more wait" if waiting else ""
        return QueueFull(f"gateway is holding {self._held / 2**20:.0f} MiB of requests (limit "
                         f"{self._max_bytes / 2**20:.0f} MiB; this one needs {needed / 2**20:.0f} MiB){also}; "
                         "retry later", retry_after_s=RETRY_AFTER_S)

    def _fits(self, hold: Hold, nbytes: int) -> bool:
        others = self._held - hold.nbytes
        return others == 0 or others + nbytes <= self._max_bytes

    def _resize(self, hold: Hold, nbytes: int) -> None:
        if nbytes > hold.nbytes and not self._fits(hold, nbytes):
            raise self._refusal(nbytes)
        shrinks = nbytes < hold.nbytes
        self._held += nbytes - hold.nbytes
        hold.nbytes = nbytes
        HELD_BYTES.set(self._held)
        if shrinks:
            self._wake()

    def _wake(self) -> None:
        """Give the room that was freed to the waiters, first come first served."""
        while self._waiters:
            nbytes, hold, granted = self._waiters[0]
            if granted.done():  # it stopped waiting (timed out, or its caller left)
                self._waiters.popleft()
                continue
            if not self._fits(hold, nbytes):
                return
            self._waiters.popleft()
            self._resize(hold, nbytes)
            granted.set_result(None)

    async def _wait_for(self, hold: Hold, nbytes: int, wait_s: float) -> None:
        if not self._waiters and self._fits(hold, nbytes):
            hold.resize(nbytes)
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((nbytes, hold, granted))
        try:
            await asyncio.wait_for(granted, wait_s)
        except TimeoutError:
            raise self._refusal(nbytes, waiting=sum(not granted.done() for _, _, granted in self._waiters)) from None

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[Hold]:
        """Hold ``nbytes`` for the body, or refuse now; the body may change its hold (:meth:`Hold.resize`).

        Raises:
            QueueFull: the budget is spent.
        """
        hold = Hold(self)
        hold.resize(nbytes)
        try:
            yield hold
        finally:
            hold.resize(0)

    @asynccontextmanager
    async def hold_when_free(self, nbytes: int, wait_s: float) -> AsyncIterator[Hold]:
        """:meth:`hold`, waiting up to ``wait_s`` for room first, behind the requests that waited before.

        Raises:
            QueueFull: no room within ``wait_s``.
        """
        hold = Hold(self)
        try:
            await self._wait_for(hold, nbytes, wait_s)
            yield hold
        finally:
            hold.resize(0)  # also when it was granted just as its caller left
