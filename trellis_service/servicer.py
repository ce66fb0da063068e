"""The gRPC face of the TRELLIS service: protobuf in, domain calls on the model worker, a stream out.

The servicer holds no model logic: it validates and converts the request, queues one job on the
single :class:`~trellisbox._runtime.worker.ModelWorker`, relays progress, then streams each artifact in chunks
and a final ``ImageTo3DDone``. Errors become status codes in :func:`trellisbox._domain.errors.error_boundary`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from trellis_service.backends.base import ImageTo3DBackend
from trellis_service.config import TrellisSettings
from trellis_service.domain import GenerationResult
from trellisbox._domain.convert import decode_images, generation_params_from_proto
from trellisbox._domain.errors import InvalidInput, Unavailable, error_boundary
from trellisbox._runtime.observability import REQUEST_ID, observe_stage
from trellisbox._runtime.worker import Finished, JobContext, ModelWorker
from trellisbox.v1 import common_pb2, trellis_pb2, trellis_pb2_grpc

SERVICE_LABEL = "trellis"
_SUPPORTED_FORMATS = (common_pb2.ARTIFACT_KIND_GLB, common_pb2.ARTIFACT_KIND_GAUSSIAN_PLY)


def formats_from_proto(kinds: Sequence[int]) -> frozenset[int]:
    """The requested artifact kinds; empty means GLB. REFINED_IMAGE and unknown kinds are refused."""
    if not kinds:
        return frozenset({common_pb2.ARTIFACT_KIND_GLB})
    result: set[int] = set()
    for kind in kinds:
        if kind == common_pb2.ARTIFACT_KIND_REFINED_IMAGE:
            raise InvalidInput(
                "formats: ARTIFACT_KIND_REFINED_IMAGE comes from the refiner stage (ask the gateway for it); "
                "TrellisService produces ARTIFACT_KIND_GLB and ARTIFACT_KIND_GAUSSIAN_PLY"
            )
        if kind not in _SUPPORTED_FORMATS:
            known = kind in common_pb2.ArtifactKind.values()
            name = common_pb2.ArtifactKind.Name(kind) if known else str(kind)  # type: ignore[arg-type]
            raise InvalidInput(
                f"formats: {name} is not an artifact TrellisService can produce; "
                "use ARTIFACT_KIND_GLB and/or ARTIFACT_KIND_GAUSSIAN_PLY"
            )
        result.add(kind)
    return frozenset(result)


class BackendSlot:
    """The backend the service runs, set once warm-up has chosen and loaded it."""

    def __init__(self) -> None:
        self.backend: ImageTo3DBackend | None = None

    def require(self) -> ImageTo3DBackend:
        if self.backend is None:
            raise Unavailable("the TRELLIS service is not ready: its model is still loading or failed to load "
                              "(see its readiness and log)")
        return self.backend


class TrellisServicer(trellis_pb2_grpc.TrellisServiceServicer):
    """``trellisbox.v1.TrellisService``.

    Args:
        settings: Limits (images, chunk size) and the service configuration.
        worker: The single model worker every job runs on.
        slot: Where warm-up puts the loaded backend.
    """

    def __init__(self, settings: TrellisSettings, worker: ModelWorker, slot: BackendSlot) -> None:
        self._settings = settings
        self._worker = worker
        self._slot = slot

    @error_boundary
    async def ImageTo3D(  # the gRPC method name
        self, request: trellis_pb2.ImageTo3DRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[trellis_pb2.ImageTo3DResponse]:
        request_id = request.request_id or uuid.uuid4().hex[:16]
        REQUEST_ID.set(request_id)
        formats = formats_from_proto(list(request.formats))
        params = generation_params_from_proto(request.parameters)
        # Decoding up to max_images large images is CPU work: keep it off the event loop.
        images = await asyncio.to_thread(
            decode_images, request.images, self._settings.image_limits, self._settings.max_images
        )
        backend = self._slot.require()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None

        def job(ctx: JobContext) -> GenerationResult:
            return backend.generate(images, params, formats, ctx)

        finished: Finished[GenerationResult] | None = None
        async for item in self._worker.run(job, request_id=request_id, deadline=deadline):
            if isinstance(item, Finished):
                finished = item
            else:
                yield trellis_pb2.ImageTo3DResponse(progress=item.to_proto())
        if finished is None:  # the worker always ends with Finished or raises
            raise Unavailable("the model worker ended without a result")
        result = finished.value
        timings = {common_pb2.STAGE_QUEUED: finished.queued_s, **result.timings}
        for stage, seconds in timings.items():
            observe_stage(SERVICE_LABEL, stage, seconds)
        for artifact in result.artifacts:
            for chunk in artifact.chunks(self._settings.chunk_bytes):
                yield trellis_pb2.ImageTo3DResponse(chunk=chunk)
        yield trellis_pb2.ImageTo3DResponse(done=trellis_pb2.ImageTo3DDone(
            seed=result.seed,
            timings=[common_pb2.StageTiming(stage=stage, seconds=seconds)  # type: ignore[arg-type]
                     for stage, seconds in timings.items()],
            backend=backend.name,
            device=backend.device,
            notes=result.notes,
        ))

