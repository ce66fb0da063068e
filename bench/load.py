"""A bounded closed-loop load generator: N concurrent clients on one asyncio channel, for a fixed time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

GENERATE = "/trellisbox.v1.GatewayService/Generate"
T = TypeVar("T")
_loops = threading.local()


def _run(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` on this thread's one event loop, left open for the life of the process. grpc.aio binds its
    completion-queue poller to every loop that uses it, and goes on calling into a loop that ``asyncio.run`` has
    closed ("Event loop is closed" from ``PollerCompletionQueue._handle_events``, grpc/grpc#25364)."""
    runner = getattr(_loops, "runner", None)
    if runner is None:
        runner = _loops.runner = asyncio.Runner()
    return runner.run(work)


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class LoadResult:
    completed_in_window: int
    window_s: float
    completed: int
    errors: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.completed_in_window / self.window_s


async def _closed_loop(target: str, request: bytes, clients: int, warm_s: float, window_s: float,
                       call_timeout: float, stop: threading.Event | None) -> LoadResult:
    options = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        generate = channel.unary_stream(GENERATE, request_serializer=_identity, response_deserializer=_identity)
        started = time.monotonic()
        window_start, window_end = started + warm_s, started + warm_s + window_s
        done: list[tuple[float, float]] = []
        errors: Counter[str] = Counter()

        def running() -> bool:
            return time.monotonic() < window_end and not (stop is not None and stop.is_set())

        async def client() -> None:
            while running():
                begun = time.monotonic()
                try:
                    async for _ in generate(request, timeout=call_timeout):
                        pass
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    await asyncio.sleep(0.05)
                    continue
                done.append((begun, time.monotonic()))

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        # Stop at the end of the window, or once ``stop`` is set: calls still in flight are cancelled.
        while running() and not all(task.done() for task in tasks):
            await asyncio.wait(tasks, timeout=min(0.1, max(0.0, window_end - time.monotonic()) + 0.01))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    in_window = [end for _, end in done if window_start <= end < window_end]
    return LoadResult(len(in_window), window_s, len(done), errors,
                      [end - begun for begun, end in done if window_start <= end < window_end])


def closed_loop(target: str, request: bytes, clients: int, warm_s: float, window_s: float,
                call_timeout: float = 60.0, stop: threading.Event | None = None) -> LoadResult:
    """Run ``clients`` back-to-back Generate loops; count calls that finish inside [warm_s, warm_s + window_s].
    ``stop``: ends the loops early when set (from another thread)."""
    return _run(_closed_loop(target, request, clients, warm_s, window_s, call_timeout, stop))


async def _stalled(target: str, request: bytes, streams: int, stall_s: float, call_timeout: float) -> int:
    options = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        generate = channel.unary_stream(GENERATE, request_serializer=_identity, response_deserializer=_identity)
        started = asyncio.Event()
        first_seen = 0

        async def client() -> int:
            nonlocal first_seen
            call = generate(request, timeout=call_timeout)
            received = 0
            async for message in call:
                received += len(message)
                if received == len(message):  # the first message: wait until every stream has one
                    first_seen += 1
                    if first_seen == streams:
                        started.set()
                    await asyncio.wait_for(started.wait(), call_timeout)
                    await asyncio.sleep(stall_s)
            return received

        results = await asyncio.gather(*(client() for _ in range(streams)), return_exceptions=True)
    return sum(1 for r in results if isinstance(r, int))


def stalled_streams(target: str, request: bytes, streams: int, stall_s: float, call_timeout: float = 60.0) -> int:
    """Open ``streams`` calls, read one message on each, stop reading for ``stall_s`` once all have started,
    then drain them. Returns how many completed. Buffering in between is bounded only by flow control."""
    return _run(_stalled(target, request, streams, stall_s, call_timeout))
