"""The servicer in-process with a scripted backend: deadline, queue limit, readiness, stream order.

In-process there is no interceptor: the servicer's typed errors surface as they are (the interceptor's
mapping to status codes is tested in tests/unit/test_interceptor.py and over loopback).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Set
from typing import Any

import pytest
from PIL import Image

from tests.trellis.trellis_helpers import object_image, png_bytes
from trellis_service.backends.base import ImageTo3DBackend
from trellis_service.config import TrellisSettings
from trellis_service.domain import GeneratedAsset
from trellis_service.exporters import PlyDocument
from trellis_service.servicer import TrellisServicer
from trellisbox._domain.errors import DeadlineExceeded, QueueFull, Unavailable
from trellisbox._domain.kinds import ArtifactKind, Stage
from trellisbox._domain.params import GenerationParams
from trellisbox._runtime.model import ModelHost
from trellisbox._runtime.worker import JobContext
from trellisbox.v1 import common_pb2, trellis_pb2


class FakeContext:
    def __init__(self, timeout: float | None = None) -> None:
        self._deadline = time.monotonic() + timeout if timeout is not None else None
        self.done_callbacks: list[Callable[[Any], None]] = []  # grpc runs them once the call has ended

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.done_callbacks.append(callback)


class ScriptedBackend(ImageTo3DBackend):
    """Reports ``steps`` SLAT steps, ``delay`` seconds each, checking for cancellation between them."""

    name = "scripted"

    def __init__(self, steps: int = 3, delay: float = 0.0) -> None:
        self.steps = steps
        self.delay = delay
        self.stopped_at: int | None = None

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def loaded(self) -> bool:
        return True

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def warm_up(self) -> None:
        pass

    def generate(self, images: list[Image.Image], params: GenerationParams, formats: Set[ArtifactKind],
                 ctx: JobContext) -> GeneratedAsset:
        for step in range(1, self.steps + 1):
            if ctx.should_stop:
                self.stopped_at = step
                ctx.raise_if_stopped()
            time.sleep(self.delay)
            ctx.report(Stage.SLAT, step, self.steps, "step")
        data = b"ply\n" + bytes(range(256)) * 300  # 76.8 kB: several 16 KiB chunks
        return GeneratedAsset(seed=params.seed or 0, splats=PlyDocument(data), timings={Stage.SLAT: 0.01},
                              notes=["scripted"])


def make_servicer(backend: ImageTo3DBackend | None, max_queue: int = 4) -> TrellisServicer:
    settings = TrellisSettings(chunk_bytes=16 * 1024, max_queue=max_queue)
    host: ModelHost[ImageTo3DBackend] = ModelHost("trellis-test", max_queue, settings)
    if backend is not None:
        host.start(lambda: backend)
    return TrellisServicer(host, settings)


REQUEST = trellis_pb2.ImageTo3DRequest(
    request_id="r1", images=[common_pb2.Image(data=png_bytes(object_image((64, 64))))],
    parameters=common_pb2.GenerationParameters(seed=11),
)


async def collect(servicer: TrellisServicer, context: Any) -> list[trellis_pb2.ImageTo3DResponse]:
    return [trellis_pb2.ImageTo3DResponse.FromString(response) if isinstance(response, bytes) else response
            async for response in servicer.ImageTo3D(REQUEST, context)]


def test_stream_order_and_done() -> None:
    context = FakeContext()
    responses = asyncio.run(collect(make_servicer(ScriptedBackend()), context))
    assert len(context.done_callbacks) == 1  # the job's reference cycles, collected after the call, off its path
    context.done_callbacks[0](context)
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[:4] == ["progress"] * 4 and kinds[-1] == "done"  # 3 steps, then "writing" the files
    assert set(kinds[4:-1]) == {"chunk"} and len(kinds[4:-1]) == 5
    assert responses[3].progress.stage == common_pb2.STAGE_EXPORT and "writing" in responses[3].progress.message
    done = responses[-1].done
    assert done.seed == 11 and done.backend == "scripted" and list(done.notes) == ["scripted"]
    assert [t.stage for t in done.timings] == [common_pb2.STAGE_QUEUED, common_pb2.STAGE_SLAT, common_pb2.STAGE_EXPORT]
    assert all(t.seconds > 0 for t in done.timings)


def test_deadline_stops_the_job() -> None:
    backend = ScriptedBackend(steps=50, delay=0.02)
    with pytest.raises(DeadlineExceeded):
        asyncio.run(collect(make_servicer(backend), FakeContext(timeout=0.2)))
    assert backend.stopped_at is not None and backend.stopped_at < 50


def test_full_queue_is_resource_exhausted() -> None:
    servicer = make_servicer(ScriptedBackend(steps=10, delay=0.02), max_queue=0)

    async def two() -> list[Any]:
        return list(await asyncio.gather(collect(servicer, FakeContext()), collect(servicer, FakeContext()),
                                         return_exceptions=True))

    results = asyncio.run(two())
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 1 and isinstance(refused[0], QueueFull)
    assert any(isinstance(r, list) for r in results)


def test_not_ready_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="not ready"):
        asyncio.run(collect(make_servicer(None), FakeContext()))
