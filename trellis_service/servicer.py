"""The gRPC face of the TRELLIS service: protobuf in, domain calls on the model thread, a stream out.

The servicer holds no model logic: it validates and converts the request, queues one job on the service's
model thread (:class:`~trellisbox._runtime.model.ModelHost`), relays progress, encodes the generated asset
into GLB and PLY off the model thread, then streams each artifact in chunks and a final ``ImageTo3DDone``.
Errors become status codes in the server's interceptor.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from PIL import Image

from trellis_service.backends.base import ImageTo3DBackend
from trellis_service.config import TrellisSettings
from trellis_service.domain import GeneratedAsset, GenerationState, HandedOver
from trellis_service.exporters import ExportError, encode_result
from trellisbox._domain.artifacts import Artifact
from trellisbox._domain.contract import TRELLIS_SERVICE
from trellisbox._domain.convert import kinds_from_proto, params_from_proto, progress_to_proto, timings_to_proto
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.kinds import ArtifactKind, Stage
from trellisbox._domain.params import GenerationParams
from trellisbox._runtime.allocator import release_memory
from trellisbox._runtime.model import ModelHost
from trellisbox._runtime.observability import observe_stages, outstanding
from trellisbox._runtime.servicing import (
    JobEvents,
    add_streaming_servicer,
    bind_request_id,
    deadline_of,
    decode_request_images,
    start_encoding,
)
from trellisbox._runtime.worker import JobContext
from trellisbox.v1 import common_pb2, trellis_pb2

if TYPE_CHECKING:
    from trellis_service.gaussian_refinement import NovelViewPlan, RefinementReport
    from trellis_service.gaussian_refinement.cameras import OrbitPose

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
        resolution=report.resolution, rasterizer=report.rasterizer, novel_views=report.novel_views,
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
        request_id, formats, params, images = await self._accepted(
            request, "hand_over_novel_views" if request.hand_over_novel_views else None)
        backend = self._host.require()

        def generate(ctx: JobContext) -> GeneratedAsset | HandedOver:
            if request.hand_over_novel_views:
                return backend.hand_over(images, params, ctx)
            return backend.generate(images, params, formats, ctx)

        _log.info("image to 3D: %d image(s) with %s, formats %s%s", len(images), backend.name,
                  sorted(kind.name for kind in formats),
                  ", handing over for novel views" if request.hand_over_novel_views else "")
        async for response in self._serve(generate, len(images), request_id, context):
            yield response

    async def RefineGaussians(  # the gRPC method name
        self, request: trellis_pb2.RefineGaussiansRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[trellis_pb2.ImageTo3DResponse | bytes]:
        request_id, formats, params, images = await self._accepted(request, "RefineGaussians")
        refined_views = await decode_request_images(request.novel_views, self._settings, handoff=True,
                                                    field="novel_views")
        state = await asyncio.to_thread(read_state, request.state)
        plan = plan_from_proto(request.hand_over, refined_views)
        backend = self._host.require()

        def refine(ctx: JobContext) -> GeneratedAsset | HandedOver:
            return backend.refine_handed_over(state, plan, images, params, formats, request.seed, ctx)

        _log.info("refine Gaussians: %d image(s) and %d refined novel view(s) with %s, formats %s", len(images),
                  len(refined_views), backend.name, sorted(kind.name for kind in formats))
        async for response in self._serve(refine, len(images), request_id, context):
            yield response

    async def _accepted(self, request: trellis_pb2.ImageTo3DRequest | trellis_pb2.RefineGaussiansRequest,
                        novel_views_for: str | None
                        ) -> tuple[str, frozenset[ArtifactKind], GenerationParams, list[Image.Image]]:
        """The request id, formats, parameters and decoded images of a call, validated in that order (the images,
        the costly part, last); ``novel_views_for`` names what needs the parameters to ask for novel views."""
        request_id = bind_request_id(request.request_id)
        formats = requested_formats(request.formats)
        params = params_from_proto(GenerationParams, request.parameters, "parameters")
        if novel_views_for is not None:
            require_novel_views(params, novel_views_for)
        images = await decode_request_images(request.images, self._settings, handoff=True)
        return request_id, formats, params, images

    async def _serve(self, work: Callable[[JobContext], GeneratedAsset | HandedOver], count: int, request_id: str,
                     context: grpc.aio.ServicerContext[Any, Any]
                     ) -> AsyncIterator[trellis_pb2.ImageTo3DResponse | bytes]:
        """Run ``work`` on the model thread, relay its progress, encode its artifacts off the model thread, stream
        them in chunks, then ``done``."""
        backend = self._host.require()

        def work_then_encode(ctx: JobContext) -> tuple[GeneratedAsset | HandedOver,
                                                       Future[tuple[list[Artifact], float]]]:
            result = work(ctx)
            ctx.raise_if_stopped()  # the caller went away as the job finished: nobody needs the files
            return result, start_encoding(partial(encode_result, result))  # from the model thread: no wait for the loop

        with outstanding(self._host.service, count):  # what autoscaling counts: requests, not jobs
            job = JobEvents(self._host.worker.run(work_then_encode, request_id=request_id,
                                                  deadline=deadline_of(context)))
            async for progress in job.progress():
                yield trellis_pb2.ImageTo3DResponse(progress=progress)
            finished = job.finished
            result, encoding = finished.value
            yield trellis_pb2.ImageTo3DResponse(progress=progress_to_proto(Stage.EXPORT, 0, 1, _writing(result)))
            artifacts, encode_s = await asyncio.wrap_future(encoding)
            timings = {Stage.QUEUED: finished.queued_s, **result.timings}
            timings[Stage.EXPORT] = timings.get(Stage.EXPORT, 0.0) + encode_s
            done = trellis_pb2.ImageTo3DDone(seed=result.seed, timings=timings_to_proto(timings), backend=backend.name,
                                             device=backend.device, notes=result.notes)
            if isinstance(result, HandedOver):
                done.hand_over.CopyFrom(hand_over_to_proto(result.plan))
            elif result.refinement is not None:
                done.gaussian_refinement.CopyFrom(refinement_to_proto(result.refinement))
            del job, finished, result, encoding  # the mesh and splats: only the encoded artifacts are needed now
            # Their reference cycles: under a millisecond, as the warm service's heap is frozen (settle_heap). Left to
            # the interpreter's own collections, a light job's cycles added ~50 MiB to the service's RSS over 60
            # requests (measured). A heavy job's go now, before its long stream, so the trim after it returns their
            # pages; a light job's once the call has ended (its status sent), off the caller's path (0.3-0.7 ms).
            heavy = sum(len(artifact.data) for artifact in artifacts) >= HEAVY_JOB_BYTES
            if heavy:
                release_memory(trim=False)
            else:
                context.add_done_callback(lambda _: release_memory(trim=False))  # type: ignore[arg-type]  # stubs
            observe_stages(self._host.service, timings)
            try:
                for artifact in artifacts:
                    for frame in artifact.frames(self._settings.chunk_bytes):
                        yield frame  # an ImageTo3DResponse with its chunk set, already serialized
            finally:
                del artifacts
            if heavy:  # ... and before the call ends after a heavy job, whose pages are what RSS is made of
                await asyncio.to_thread(release_memory, collect=False)
        _log.info("generated 3D from %d image(s) in %.2f s (queued %.2f s), seed %d", count,
                  sum(timings.values()) - timings[Stage.QUEUED], timings[Stage.QUEUED], done.seed)
        yield trellis_pb2.ImageTo3DResponse(done=done)


def _writing(result: GeneratedAsset | HandedOver) -> str:
    if isinstance(result, HandedOver):
        return f"handing over {len(result.plan.renders)} novel views and the generated Gaussians"
    kinds = [kind for kind, present in ((ArtifactKind.GLB, result.mesh), (ArtifactKind.GAUSSIAN_PLY, result.splats))
             if present is not None]
    return "writing " + " and ".join(kind.name for kind in kinds)


def read_state(data: bytes) -> GenerationState:
    """A ``RefineGaussians`` request's state, its Gaussians readable.

    Raises:
        InvalidInput: not a generation state, or its PLY is not one of 3D Gaussians.
    """
    from trellis_service.gaussian_refinement.gaussians import read_splat_ply  # torch: only for novel views

    state = GenerationState.from_bytes(data)
    try:
        read_splat_ply(state.splats)
    except (ExportError, ValueError) as exc:
        raise InvalidInput(f"state: gaussians.ply: {exc}; send the GENERATION_STATE artifact as it was") from None
    return state


def require_novel_views(params: GenerationParams, where: str) -> None:
    """``where`` belongs to a novel-view refinement: the parameters must ask for one."""
    refinement = params.gaussian_refinement
    if not (refinement.enabled and refinement.novel_views):
        raise InvalidInput(f"{where} needs parameters.gaussian_refinement.enabled and .novel_views")


def orbit_to_proto(pose: OrbitPose) -> trellis_pb2.OrbitCamera:
    return trellis_pb2.OrbitCamera(yaw_degrees=pose.yaw_degrees, pitch_degrees=pose.pitch_degrees,
                                   distance=pose.distance, offset_x=pose.offset[0], offset_y=pose.offset[1],
                                   size=pose.size)


def hand_over_to_proto(plan: NovelViewPlan) -> trellis_pb2.NovelViewHandOver:
    """The cameras of a hand-over, as ``ImageTo3DDone.hand_over`` carries them."""
    return trellis_pb2.NovelViewHandOver(
        input_cameras=[orbit_to_proto(camera.pose) for camera in plan.cameras],
        silhouette_iou=[camera.iou for camera in plan.cameras],
        novel_view_cameras=[orbit_to_proto(pose) for pose in plan.poses],
    )


def plan_from_proto(hand_over: trellis_pb2.NovelViewHandOver, refined: list[Image.Image]) -> NovelViewPlan:
    """The hand-over of a ``RefineGaussians`` request, with the refined novel views as the plan's renders.

    Raises:
        InvalidInput: the cameras are not those of a hand-over (missing, unequal counts, out of range).
    """
    from trellis_service.gaussian_refinement import NovelViewPlan  # torch: only for novel-view refinement
    from trellis_service.gaussian_refinement.cameras import OrbitPose
    from trellis_service.gaussian_refinement.pose import RecoveredPose

    def pose(camera: trellis_pb2.OrbitCamera, where: str) -> OrbitPose:
        values = (camera.yaw_degrees, camera.pitch_degrees, camera.distance, camera.offset_x, camera.offset_y)
        if not all(math.isfinite(value) for value in values) or camera.distance <= 0 or not 0 < camera.size <= 4096:
            raise InvalidInput(f"hand_over.{where}: not a camera (finite angles, distance > 0, size in [1, 4096])")
        return OrbitPose(camera.yaw_degrees, camera.pitch_degrees, camera.distance,
                         (camera.offset_x, camera.offset_y), camera.size)

    if not hand_over.input_cameras or len(hand_over.silhouette_iou) != len(hand_over.input_cameras):
        raise InvalidInput("hand_over: one input camera and one silhouette_iou per image are required; send "
                           "ImageTo3DDone.hand_over as it was")
    if len(refined) != len(hand_over.novel_view_cameras):
        raise InvalidInput(f"novel_views: {len(refined)} image(s) for {len(hand_over.novel_view_cameras)} "
                           "novel-view camera(s) in hand_over")
    cameras = [RecoveredPose(pose(camera, f"input_cameras[{index}]"), iou) for index, (camera, iou)
               in enumerate(zip(hand_over.input_cameras, hand_over.silhouette_iou, strict=True))]
    poses = [pose(camera, f"novel_view_cameras[{index}]")
             for index, camera in enumerate(hand_over.novel_view_cameras)]
    return NovelViewPlan(cameras=cameras, poses=poses, renders=refined)


class ImageTo3DServicer(Protocol):
    """What :func:`add_trellis_servicer` registers: ``ImageTo3D`` and ``RefineGaussians``, which may yield pre-encoded
    responses."""

    def ImageTo3D(self, request: trellis_pb2.ImageTo3DRequest,  # the gRPC method name
                  context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[trellis_pb2.ImageTo3DResponse | bytes]:
        ...

    def RefineGaussians(self, request: trellis_pb2.RefineGaussiansRequest,  # the gRPC method name
                        context: grpc.aio.ServicerContext[Any, Any]
                        ) -> AsyncIterator[trellis_pb2.ImageTo3DResponse | bytes]:
        ...


def add_trellis_servicer(servicer: ImageTo3DServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_TrellisServiceServicer_to_server``, with a response serializer
    that sends its pre-encoded artifact chunks (``bytes``) as they are."""
    add_streaming_servicer(server, TRELLIS_SERVICE, {
        "ImageTo3D": (servicer.ImageTo3D, trellis_pb2.ImageTo3DRequest),
        "RefineGaussians": (servicer.RefineGaussians, trellis_pb2.RefineGaussiansRequest),
    }, trellis_pb2.ImageTo3DResponse)
