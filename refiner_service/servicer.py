"""The gRPC front of the refiner: protobuf in, domain objects to the model worker, protobuf out."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from PIL import Image

from refiner_service.backends import RefinerBackend, seeds_for
from refiner_service.batching import DynamicBatcher
from refiner_service.config import RefinerSettings
from trellisbox._domain.artifacts import Artifact
from trellisbox._domain.convert import decode_images, refine_params_from_proto
from trellisbox._domain.errors import Cancelled, DeadlineExceeded, error_boundary
from trellisbox._domain.imaging import encode_png
from trellisbox._domain.params import RefineParams, random_seed
from trellisbox._runtime.observability import REQUEST_ID, observe_stage
from trellisbox._runtime.worker import Finished, JobContext, ModelWorker
from trellisbox.v1 import common_pb2, refiner_pb2, refiner_pb2_grpc

_log = logging.getLogger(__name__)
SERVICE_LABEL = "refiner"


class RefinerServicer(refiner_pb2_grpc.RefinerServiceServicer):
    """``trellisbox.v1.RefinerService``: every model call goes through the one :class:`ModelWorker`.

    With ``batch_window_ms`` > 0 and ``max_batch_images`` > 1, and a backend that supports it (``sdxl``),
    compatible concurrent requests share one pipeline call (:mod:`refiner_service.batching`); otherwise each
    request is one job, as before.

    Args:
        backend: The loaded (or lazily loading) refiner backend.
        worker: The model worker that owns ``backend``.
        settings: Limits (images, bytes, pixels), the artifact chunk size and the batching settings.
    """

    def __init__(self, backend: RefinerBackend, worker: ModelWorker, settings: RefinerSettings) -> None:
        self._backend = backend
        self._worker = worker
        self._settings = settings
        self._batcher: DynamicBatcher | None = None
        if settings.batching and backend.supports_batching:
            self._batcher = DynamicBatcher(backend, worker, service=SERVICE_LABEL,
                                           window_s=settings.batch_window_ms / 1000,
                                           max_images=settings.max_batch_images)
            _log.info("dynamic batching on: window %g ms, up to %d images per call",
                      settings.batch_window_ms, settings.max_batch_images)
        elif settings.batching:
            _log.info("dynamic batching off: the %s backend refines one request at a time", backend.name)

    @error_boundary
    async def Refine(
        self, request: refiner_pb2.RefineRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[refiner_pb2.RefineResponse]:
        request_id = request.request_id or uuid.uuid4().hex[:12]
        REQUEST_ID.set(request_id)  # this RPC's task only: contextvars are per task
        # Decoding up to max_images large images is CPU work: off the event loop, so health checks and
        # other calls stay responsive meanwhile.
        images = await asyncio.to_thread(
            decode_images, request.images, self._settings.image_limits, self._settings.max_images
        )
        params = refine_params_from_proto(request.parameters)
        self._backend.check(params)  # reject before queueing, not after a wait
        seeds = seeds_for(random_seed() if params.seed is None else params.seed, len(images))
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        _log.info("refine %d image(s) with %s, seeds %s", len(images), self._backend.name, seeds)

        def job(ctx: JobContext) -> list[Image.Image]:
            return self._run(ctx, images, params, seeds)

        events = (
            self._worker.run(job, request_id=request_id, deadline=deadline) if self._batcher is None
            else self._batcher.run(images, params, seeds, request_id=request_id, deadline=deadline)
        )
        outcome: Finished[list[Image.Image]] | None = None
        async for event in events:
            if isinstance(event, Finished):
                outcome = event
            else:
                yield refiner_pb2.RefineResponse(progress=event.to_proto())
        if outcome is None:  # run() ends with Finished or raises; this guards against a broken worker
            raise RuntimeError("the model worker ended without a result")

        queued, refined = outcome.queued_s, outcome.run_s
        observe_stage(SERVICE_LABEL, common_pb2.STAGE_QUEUED, queued)
        observe_stage(SERVICE_LABEL, common_pb2.STAGE_REFINE, refined)
        for index, image in enumerate(outcome.value):
            # PNG encoding is CPU work: keep it off the event loop and off the model thread.
            data = await asyncio.to_thread(encode_png, image)
            artifact = Artifact(common_pb2.ARTIFACT_KIND_REFINED_IMAGE, data, index=index)
            for chunk in artifact.chunks(self._settings.chunk_bytes):
                yield refiner_pb2.RefineResponse(chunk=chunk)
        yield refiner_pb2.RefineResponse(done=refiner_pb2.RefineDone(
            seeds=seeds,
            timings=[
                common_pb2.StageTiming(stage=common_pb2.STAGE_QUEUED, seconds=queued),
                common_pb2.StageTiming(stage=common_pb2.STAGE_REFINE, seconds=refined),
            ],
            backend=self._backend.name,
            device=self._backend.device,
        ))
        _log.info("refined %d image(s) in %.2f s (queued %.2f s)", len(images), refined, queued)

    def _run(self, ctx: JobContext, images: list[Image.Image], params: RefineParams,
             seeds: list[int]) -> list[Image.Image]:
        """The job body, on the model thread."""
        token = REQUEST_ID.set(ctx.request_id)  # log lines from the model thread name the request
        started = time.monotonic()
        try:
            refined = self._backend.refine(images, params, seeds, ctx)
        except (Cancelled, DeadlineExceeded) as exc:
            _log.info("refine stopped after %.2f s: %s", time.monotonic() - started, exc)
            raise
        finally:
            REQUEST_ID.reset(token)
        return refined
