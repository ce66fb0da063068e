"""The gRPC front of the refiner: protobuf in, domain objects to the batcher, protobuf out.

Every request goes through the :class:`~refiner_service.batching.DynamicBatcher` (with batching off, each
request is its own job on the model thread). Refined images are encoded as PNG off the model thread, as the
TRELLIS service encodes its GLB and PLY. Errors become status codes in the server's interceptor.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import grpc
from PIL import Image

from refiner_service.backends import RefinerBackend, seeds_for
from refiner_service.batching import DynamicBatcher
from refiner_service.config import RefinerSettings
from trellisbox._domain.artifacts import Artifact
from trellisbox._domain.contract import REFINER_SERVICE
from trellisbox._domain.convert import params_from_proto, timings_to_proto
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.imaging import HANDOFF_MEDIA_TYPE, encode_handoff, encode_png
from trellisbox._domain.kinds import ArtifactKind, Stage
from trellisbox._domain.params import RefineParams, random_seed
from trellisbox._runtime.model import ModelHost
from trellisbox._runtime.observability import observe_stages, outstanding
from trellisbox._runtime.servicing import (
    INLINE_PIXELS,
    JobEvents,
    add_streaming_servicer,
    bind_request_id,
    deadline_of,
    decode_request_images,
    encode_outputs,
)
from trellisbox.v1 import refiner_pb2, refiner_pb2_grpc

_log = logging.getLogger(__name__)


def encode_refined(images: Sequence[Image.Image], media_type: str = "") -> list[Artifact]:
    """One artifact per refined image, in input order (alpha kept): PNG, or the hand-off form when ``media_type``
    asks for it (:data:`~trellisbox._domain.imaging.HANDOFF_MEDIA_TYPE`)."""
    if media_type == HANDOFF_MEDIA_TYPE:
        return [Artifact(ArtifactKind.REFINED_IMAGE, encode_handoff(image), index=i, media_type=HANDOFF_MEDIA_TYPE)
                for i, image in enumerate(images)]
    return [Artifact(ArtifactKind.REFINED_IMAGE, encode_png(image), index=i) for i, image in enumerate(images)]


def output_media_type(given: str) -> str:
    """The refined images' media type a request asks for ("" and image/png: PNG)."""
    media_type = given.strip().lower()
    if media_type not in ("", "image/png", HANDOFF_MEDIA_TYPE):
        raise InvalidInput(f"output_media_type {given[:40]!r} is not image/png or {HANDOFF_MEDIA_TYPE}")
    return media_type


class RefinerServicer(refiner_pb2_grpc.RefinerServiceServicer):
    """``trellisbox.v1.RefinerService``.

    Args:
        host: The model thread and, once warm-up has loaded it, the backend.
        settings: Limits (images, bytes, pixels), the artifact chunk size and the batching settings.
    """

    def __init__(self, host: ModelHost[RefinerBackend], settings: RefinerSettings) -> None:
        self._host = host
        self._settings = settings
        self._batcher = DynamicBatcher(host, window_s=settings.batch_window_ms / 1000,
                                       max_images=settings.max_batch_images)
        if settings.batching:
            _log.info("dynamic batching on: window %g ms, up to %d images per call (for backends that can share "
                      "a call)", settings.batch_window_ms, settings.max_batch_images)

    async def Refine(  # type: ignore[override]  # may yield pre-encoded chunk events (add_refiner_servicer)
        self, request: refiner_pb2.RefineRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[refiner_pb2.RefineResponse | bytes]:
        request_id = bind_request_id(request.request_id)
        media_type = output_media_type(request.output_media_type)
        images = await decode_request_images(request.images, self._settings)
        params: RefineParams = params_from_proto(RefineParams, request.parameters, "parameters")
        backend = self._host.require()
        backend.check(params)  # reject before queueing, not after a wait
        seeds = seeds_for(random_seed() if params.seed is None else params.seed, len(images))
        _log.info("refine %d image(s) with %s, seeds %s", len(images), backend.name, seeds)

        with outstanding(self._host.service, len(images)):  # what autoscaling counts: requests, not jobs
            job = JobEvents(self._batcher.run(images, params, seeds, request_id=request_id,
                                              deadline=deadline_of(context)))
            async for progress in job.progress():
                yield refiner_pb2.RefineResponse(progress=progress)
            finished = job.finished
            refined = finished.value
            artifacts, encode_s = await encode_outputs(
                partial(encode_refined, refined, media_type),
                inline=media_type == HANDOFF_MEDIA_TYPE and sum(i.width * i.height for i in refined) <= INLINE_PIXELS)
            timings = {Stage.QUEUED: finished.queued_s, Stage.REFINE: finished.run_s + encode_s}
            observe_stages(self._host.service, timings)
            for artifact in artifacts:
                for frame in artifact.frames(self._settings.chunk_bytes):
                    yield frame  # a RefineResponse with its chunk set, already serialized
            yield refiner_pb2.RefineResponse(done=refiner_pb2.RefineDone(
                seeds=seeds,
                timings=timings_to_proto(timings),
                backend=backend.name,
                device=backend.device,
            ))
        _log.info("refined %d image(s) in %.2f s (queued %.2f s)", len(images), timings[Stage.REFINE],
                  finished.queued_s)


def add_refiner_servicer(servicer: RefinerServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_RefinerServiceServicer_to_server``, with a response serializer
    that sends its pre-encoded chunk events (``bytes``) as they are."""
    add_streaming_servicer(server, REFINER_SERVICE, {"Refine": (servicer.Refine, refiner_pb2.RefineRequest)},
                           refiner_pb2.RefineResponse)
