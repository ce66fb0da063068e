"""Admission control: a bounded number of requests run, a bounded number wait, the rest are refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from trellisbox._domain.errors import QueueFull
from trellisbox._runtime.observability import IN_FLIGHT, QUEUE_DEPTH


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

    def would_wait(self) -> bool:
        return self._slots.locked()

    def _publish(self) -> None:
        QUEUE_DEPTH.labels("gateway").set(self._waiting)
        IN_FLIGHT.labels("gateway").set(self._running)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self._waiting >= self._max_queue:
            raise QueueFull(
                f"gateway is at capacity ({self._waiting} requests waiting, limit {self._max_queue}); retry later"
            )
        self._waiting += 1
        self._publish()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        self._publish()
        try:
            yield
        finally:
            self._running -= 1
            self._slots.release()
            self._publish()
