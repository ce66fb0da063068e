"""The gRPC face of the TRELLIS service: protobuf in, domain calls on the model thread, a stream out.

The servicer holds no model logic: it validates and converts the request, queues one job on the service's
model thread (:class:`~trellisbox._runtime.model.ModelHost`), relays progress, encodes the generated asset
into GLB and PLY off the model thread, then streams each artifact in chunks and a final ``ImageTo3DDone``.
Errors become status codes in the server's interceptor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from trellis_service.backends.base import ImageTo3DBackend
from trellis_service.config import TrellisSettings
from trellis_service.domain import GeneratedAsset
from trellis_service.exporters import encode_asset
from trellisbox._domain.contract import TRELLIS_SERVICE
from trellisbox._domain.convert import kinds_from_proto, params_from_proto, progress_to_proto, timings_to_proto
from trellisbox._domain.kinds import ArtifactKind, Stage
from trellisbox._domain.params import GenerationParams
from trellisbox._runtime.model import ModelHost
from trellisbox._runtime.observability import observe_stages, outstanding
from trellisbox._runtime.server import release_memory
from trellisbox._runtime.servicing import (
    JobEvents,
    bind_request_id,
    deadline_of,
    decode_request_images,
    encode_off_thread,
    passthrough_serializer,
)
from trellisbox._runtime.worker import JobContext
from trellisbox.v1 import common_pb2, trellis_pb2

if TYPE_CHECKING:
    from trellis_service.gaussian_refinement import RefinementReport

_log = logging.getLogger(__name__)

#: Artifacts of at least this size mark a heavy job: its freed pages are returned before its call ends (5-30 ms),
#: where a light job's are returned once the service is idle (the model worker's idle release), off any call's path.
HEAVY_JOB_BYTES = 8 * 2**20

#: What TrellisService produces; the refined image comes from the refiner (ask the gateway for it).
PRODUCED = (ArtifactKind.GLB, ArtifactKind.GAUSSIAN_PLY)


def requested_formats(kinds: Iterable[int]) -> frozenset[ArtifactKind]:
    """The artifact kinds to produce; none requested means the GLB."""
    hints = {ArtifactKind.REFINED_IMAGE: "it comes from the refiner stage (ask the gateway for it)"}
    return kinds_from_proto(kinds, PRODUCED, hints=hints) or frozenset({ArtifactKind.GLB})


def refinement_to_proto(report: RefinementReport) -> common_pb2.GaussianRefinementReport:
    """The refinement's figures as the done message carries them."""
    return common_pb2.GaussianRefinementReport(
        views=[common_pb2.GaussianRefinementView(
            image_index=view.image_index, yaw_degrees=view.pose.yaw_degrees, pitch_degrees=view.pose.pitch_degrees,
            distance=view.pose.distance, silhouette_iou=view.silhouette_iou, psnr_before=view.before.psnr,
            psnr_after=view.after.psnr, ssim_before=view.before.ssim, ssim_after=view.after.ssim,
        ) for view in report.views],
        held_out=[common_pb2.HeldOutView(yaw_degrees=view.yaw_degrees, pitch_degrees=view.pitch_degrees,
                                         psnr=view.scores.psnr, ssim=view.scores.ssim) for view in report.held_out],
        steps=report.steps, stopped_early=report.stopped_early, gaussians=report.gaussians,
        resolution=report.resolution, rasterizer=report.rasterizer,
    )


class TrellisServicer:
    """``trellisbox.v1.TrellisService``.

    Args:
        host: The model thread and, once warm-up has loaded it, the backend.
        settings: Limits (images, bytes, pixels) and the artifact chunk size.
    """

    def __init__(self, host: ModelHost[ImageTo3DBackend], settings: TrellisSettings) -> None:
        self._host = host
        self._settings = settings

    async def ImageTo3D(  # the gRPC method name
        self, request: trellis_pb2.ImageTo3DRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[trellis_pb2.ImageTo3DResponse | bytes]:
        request_id = bind_request_id(request.request_id)
        formats = requested_formats(request.formats)
        params = params_from_proto(GenerationParams, request.parameters, "parameters")
        images = await decode_request_images(request.images, self._settings, handoff=True)
        backend = self._host.require()

        def generate(ctx: JobContext) -> GeneratedAsset:
            return backend.generate(images, params, formats, ctx)

        _log.info("image to 3D: %d image(s) with %s, formats %s", len(images), backend.name,
                  sorted(kind.name for kind in formats))

        with outstanding(self._host.service, len(images)):  # what autoscaling counts: requests, not jobs
            job = JobEvents(self._host.worker.run(generate, request_id=request_id, deadline=deadline_of(context)))
            async for progress in job.progress():
                yield trellis_pb2.ImageTo3DResponse(progress=progress)
            finished = job.finished
            asset = finished.value
            yield trellis_pb2.ImageTo3DResponse(progress=progress_to_proto(
                Stage.EXPORT, 0, 1, "writing " + " and ".join(kind.name for kind in sorted(formats))))
            artifacts, encode_s = await encode_off_thread(partial(encode_asset, asset))
            timings = {Stage.QUEUED: finished.queued_s, **asset.timings}
            timings[Stage.EXPORT] = timings.get(Stage.EXPORT, 0.0) + encode_s
            done = trellis_pb2.ImageTo3DDone(seed=asset.seed, timings=timings_to_proto(timings), backend=backend.name,
                                             device=backend.device, notes=asset.notes)
            if asset.refinement is not None:
                done.gaussian_refinement.CopyFrom(refinement_to_proto(asset.refinement))
            del job, finished, asset  # the mesh and splats: only the encoded artifacts are needed from here on
            # Their reference cycles, now: under a millisecond, as the warm service's heap is frozen (settle_heap).
            release_memory(trim=False)
            observe_stages(self._host.service, timings)
            heavy = sum(len(artifact.data) for artifact in artifacts) >= HEAVY_JOB_BYTES
            try:
                for artifact in artifacts:
                    for frame in artifact.frames(self._settings.chunk_bytes):
                        yield frame  # an ImageTo3DResponse with its chunk set, already serialized
            finally:
                del artifacts  # a light job's freed pages go back to the system once the service is idle (ModelWorker)
            if heavy:  # ... and before the call ends after a heavy job, whose pages are what RSS is made of
                await asyncio.to_thread(release_memory, collect=False)
        _log.info("generated 3D from %d image(s) in %.2f s (queued %.2f s), seed %d", len(images),
                  sum(timings.values()) - timings[Stage.QUEUED], timings[Stage.QUEUED], done.seed)
        yield trellis_pb2.ImageTo3DResponse(done=done)


class ImageTo3DServicer(Protocol):
    """What :func:`add_trellis_servicer` registers: an ``ImageTo3D`` that may yield pre-encoded responses."""

    def ImageTo3D(self, request: trellis_pb2.ImageTo3DRequest,  # the gRPC method name
                  context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[trellis_pb2.ImageTo3DResponse | bytes]:
        ...


def add_trellis_servicer(servicer: ImageTo3DServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_TrellisServiceServicer_to_server``, with a response serializer
    that sends its pre-encoded artifact chunks (``bytes``) as they are."""
    handlers = {
        "ImageTo3D": grpc.unary_stream_rpc_method_handler(
            servicer.ImageTo3D,
            request_deserializer=trellis_pb2.ImageTo3DRequest.FromString,
            response_serializer=passthrough_serializer(trellis_pb2.ImageTo3DResponse.SerializeToString),
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(TRELLIS_SERVICE, handlers),))
    server.add_registered_method_handlers(TRELLIS_SERVICE, handlers)  # type: ignore[attr-defined]  # stubs lag
