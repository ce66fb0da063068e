"""Stage routing: optional refinement, then image-to-3D, relayed as one stream.

A Gaussian refinement with novel views takes three calls, all orchestrated here (:meth:`Router._with_novel_views`):
TRELLIS generates and hands over, the refiner pool refines the novel views, TRELLIS fits and exports.

The router speaks to the model services over gRPC and streams their progress and artifact chunks to
the caller as they arrive. Chunks are forwarded in the bytes they arrived as (see
:mod:`gateway.relay`), never reassembled, except refined images, which are the next stage's input.
Leaving the stream (client cancel, deadline) cancels the stage call in flight, which stops the model
worker at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from gateway.admission import Admission, ByteBudget
from gateway.relay import CHUNK, DONE, PROGRESS, M, Outgoing, StageEvent
from gateway.stages import ImageTo3DCall, RefineGaussiansCall, StageClients
from trellisbox._domain.artifacts import Artifact, ArtifactAssembler, ArtifactProtocolError
from trellisbox._domain.convert import kinds_to_proto, params_to_proto, progress_to_proto, timings_to_proto
from trellisbox._domain.errors import InvalidInput, StageFailed
from trellisbox._domain.imaging import HANDOFF_MEDIA_TYPE
from trellisbox._domain.kinds import ArtifactKind, Stage, known_stage
from trellisbox._domain.params import GenerationParams, RefineParams
from trellisbox._runtime.observability import STAGE, observe_stages
from trellisbox.v1 import common_pb2, gateway_pb2, refiner_pb2, trellis_pb2

_log = logging.getLogger(__name__)

_Event = TypeVar("_Event", StageEvent[refiner_pb2.RefineResponse], StageEvent[trellis_pb2.ImageTo3DResponse])

TrellisCall = ImageTo3DCall | RefineGaussiansCall

GENERATED_KINDS = frozenset({ArtifactKind.GLB, ArtifactKind.GAUSSIAN_PLY})
#: The first pause before a stage call is tried again, and the longest (it doubles in between).
RETRY_BACKOFF_S = 0.2
MAX_RETRY_BACKOFF_S = 2.0
#: The classic (CPU restoration) refiner has no diffusion model: say so rather than ignore the parameters silently.
CLASSIC_NOTE = "classic refiner: only strength applies; prompts, guidance, steps and seed are ignored"


@dataclass(frozen=True)
class GenerateJob:
    """A validated request.

    Args:
        request_id: Correlates logs and metrics across the three services.
        images: The caller's encoded images, already checked (``check_image``): the first stage decodes them.
        refine: Refinement parameters, or None to skip refinement.
        generation: Image-to-3D parameters.
        formats: Requested ``ArtifactKind`` values.
        deadline: ``time.monotonic()`` by which everything must be done.
    """

    request_id: str
    images: Sequence[common_pb2.Image]
    refine: RefineParams | None
    generation: GenerationParams
    formats: frozenset[ArtifactKind]
    deadline: float

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)


class Router:
    """Args:
        stages: Stubs to the model services.
        admission: Bounds how many requests run and wait.
        attempts: Calls per stage when a replica fails with UNAVAILABLE (also mid-stream).
    """

    def __init__(self, stages: StageClients, admission: Admission, attempts: int = 3, *,
                 budget: ByteBudget | None = None, max_message_bytes: int = 64 * 2**20) -> None:
        self._stages = stages
        self._admission = admission
        self._attempts = attempts
        self._budget = budget if budget is not None else ByteBudget(2**62)
        self._max_message_bytes = max_message_bytes

    async def generate(self, job: GenerateJob) -> AsyncIterator[Outgoing]:
        started = time.monotonic()
        ticket = self._admission.enter()  # a refusal is raised here, before the caller has heard anything
        try:
            if ticket.waits:
                yield gateway_pb2.GenerateResponse(progress=progress_to_proto(
                    Stage.QUEUED, 0, ticket.ahead + 1, f"waiting for a gateway slot: {ticket.ahead} ahead"))
            async with ticket.slot():
                async for response in self._run(job, {Stage.QUEUED: time.monotonic() - started}):
                    yield response
        finally:
            ticket.leave()  # the caller went away before it got a slot

    async def _run(self, job: GenerateJob, timings: dict[Stage, float]) -> AsyncIterator[Outgoing]:
        """The stages of an admitted request: refine (when asked), then image to 3D, then ``done``."""
        images: Sequence[common_pb2.Image] = job.images
        refine_done = refiner_pb2.RefineDone()
        if job.refine is not None:
            refine_started = time.monotonic()
            refined: dict[int, Artifact] = {}
            async for event in self._refine(job, job.refine, refined):
                if event.field == DONE:
                    refine_done = event.message.done
                elif event.field:
                    yield event.relay()
            timings[Stage.REFINE] = time.monotonic() - refine_started
            images = [common_pb2.Image(data=refined[i].data, media_type=refined[i].media_type)
                      for i in range(len(images))]
        generate_done = trellis_pb2.ImageTo3DDone()
        refinement = job.generation.gaussian_refinement
        stage_events = (self._with_novel_views(job, images) if refinement.enabled and refinement.novel_views
                        else self._image_to_3d(job, images))
        async for stage_event in stage_events:
            if stage_event.field == DONE:
                generate_done = stage_event.message.done
            elif stage_event.field:
                yield stage_event.relay()
        for timing in generate_done.timings:
            stage = known_stage(timing.stage)
            if stage is not None and stage is not Stage.QUEUED:  # the gateway's own queueing counts here
                timings[stage] = timing.seconds
        observe_stages("gateway", timings)
        yield gateway_pb2.GenerateResponse(done=gateway_pb2.GenerateDone(
            request_id=job.request_id,
            timings=timings_to_proto(timings),
            refine_seeds=refine_done.seeds,
            generation_seed=generate_done.seed,
            refiner_backend=refine_done.backend,
            generator_backend=generate_done.backend,
            notes=[*generate_done.notes, *([CLASSIC_NOTE] if refine_done.backend == "classic" else [])],
            gaussian_refinement=(generate_done.gaussian_refinement
                                 if generate_done.HasField("gaussian_refinement") else None),
        ))


    async def _refine(self, job: GenerateJob, params: RefineParams, refined: dict[int, Artifact],
                      images: Sequence[common_pb2.Image] | None = None, forward_as: ArtifactKind | None = None,
                      ) -> AsyncIterator[StageEvent[refiner_pb2.RefineResponse]]:
        """The refiner's events; its refined images go into ``refined`` (and, once complete, to the caller when it
        asked for them).

        Args:
            images: What to refine: the caller's images, or (novel-view refinement) the novel views.
            forward_as: The kind the caller gets the refined images as when it asked for them (the refiner's chunks
                as they came for refined images, re-cut for novel views); None: it did not ask.
        """
        STAGE.set("refine")  # this call's log lines, to its end (a failure is logged with the stage it failed in)
        if images is None:
            images = job.images
            forward_as = ArtifactKind.REFINED_IMAGE if ArtifactKind.REFINED_IMAGE in job.formats else None
        forward_chunks = forward_as is ArtifactKind.REFINED_IMAGE
        # A refined image only TRELLIS sees travels in the lossless hand-off form: no PNG encode, a cheaper decode.
        request = refiner_pb2.RefineRequest(request_id=job.request_id, images=images,
                                            output_media_type="" if forward_as else HANDOFF_MEDIA_TYPE)
        params_to_proto(params, request.parameters)
        for attempt in range(1, self._attempts + 1):
            assembler = ArtifactAssembler()
            refined.clear()
            # Held back until the stage completed, so that a retry on another replica can start over cleanly.
            chunks: list[StageEvent[refiner_pb2.RefineResponse]] = []
            try:
                async for event in self._stream("refiner", self._stages.refine(request, timeout=job.remaining())):
                    if event.field != CHUNK:
                        yield event
                        continue
                    artifact = assembler.feed(*event.chunk())  # the data as a view of the received bytes
                    if artifact is not None:
                        refined[artifact.index] = artifact
                    if forward_chunks:
                        chunks.append(event)
                break
            except StageFailed as failure:
                if not self._retryable(failure, attempt, job):
                    raise
                yield _retrying(refiner_pb2.RefineResponse, Stage.REFINE, failure, attempt + 1, self._attempts)
                await asyncio.sleep(self._backoff_s(attempt, job))
        missing = set(range(len(images))) - set(refined)
        if missing:
            raise StageFailed("refiner", "INTERNAL", f"returned no refined image for images {sorted(missing)}")
        for chunk in chunks:
            yield chunk
        if forward_as is not None and not forward_chunks:
            for index in sorted(refined):
                artifact = refined[index]
                for frame in Artifact(forward_as, artifact.data, index, artifact.media_type).frames():
                    yield StageEvent(refiner_pb2.RefineResponse, CHUNK, encoded=frame)

    async def _image_to_3d(self, job: GenerateJob, images: Sequence[common_pb2.Image]
                           ) -> AsyncIterator[StageEvent[trellis_pb2.ImageTo3DResponse]]:
        """TRELLIS's events; its artifact chunks are relayed as they come, so it is retried only before the first."""
        STAGE.set("image_to_3d")
        request = trellis_pb2.ImageTo3DRequest(request_id=job.request_id, images=images,
                                               formats=_generated_formats(job))
        params_to_proto(job.generation, request.parameters)
        async for event in self._relayed(lambda: self._stages.image_to_3d(request, timeout=job.remaining()), job):
            yield event

    async def _relayed(self, call: Callable[[], TrellisCall], job: GenerateJob
                       ) -> AsyncIterator[StageEvent[trellis_pb2.ImageTo3DResponse]]:
        """A TRELLIS call whose artifact chunks are relayed as they come, so it is retried only before the first."""
        for attempt in range(1, self._attempts + 1):
            relayed_chunk = False
            try:
                async for event in self._stream("trellis", call()):
                    relayed_chunk = relayed_chunk or event.field == CHUNK
                    yield event
                return
            except StageFailed as failure:
                if relayed_chunk or not self._retryable(failure, attempt, job):
                    raise
                yield _retrying(trellis_pb2.ImageTo3DResponse, Stage.QUEUED, failure, attempt + 1, self._attempts)
                await asyncio.sleep(self._backoff_s(attempt, job))

    async def _with_novel_views(self, job: GenerateJob, images: Sequence[common_pb2.Image]
                                ) -> AsyncIterator[StageEvent[trellis_pb2.ImageTo3DResponse]]:
        """Gaussian refinement with novel views (docs/gaussian-refinement.md), as one stage's events:

        1. TRELLIS generates, recovers the images' cameras and renders the novel views, then hands over: the views,
           the generated state (Gaussians as PLY, TRELLIS's mesh) and the cameras. Nothing of it reaches the caller.
        2. The refiner pool refines the novel views in one batched call, at ``novel_view_strength`` (the request's
           other refinement settings when it refines, the defaults otherwise; the generation seed).
        3. TRELLIS fits to the images and the refined views, and exports; its events are relayed as
           :meth:`_image_to_3d`'s are. ``done`` carries the stage times of all three calls.

        The service keeps nothing between calls, so any replica may take each of them and a failed one is retried
        elsewhere like any stage call; the hand-over's bytes count against the gateway's byte budget meanwhile.
        """
        refinement = job.generation.gaussian_refinement
        STAGE.set("image_to_3d")
        request = trellis_pb2.ImageTo3DRequest(request_id=job.request_id, images=images, hand_over_novel_views=True,
                                               formats=_generated_formats(job))
        params_to_proto(job.generation, request.parameters)
        handed: list[Artifact] = []
        first_done = trellis_pb2.ImageTo3DDone()
        async for event in self._collected(lambda: self._stages.image_to_3d(request, timeout=job.remaining()), job,
                                           handed):
            if event.field == DONE:
                first_done = event.message.done
            else:
                yield event
        views = sorted((artifact for artifact in handed if artifact.kind == ArtifactKind.NOVEL_VIEW),
                       key=lambda artifact: artifact.index)
        states = [artifact for artifact in handed if artifact.kind == ArtifactKind.GENERATION_STATE]
        if not first_done.HasField("hand_over") or len(states) != 1 or len(views) != len(
                first_done.hand_over.novel_view_cameras):
            raise StageFailed("trellis", "INTERNAL", "the hand-over for novel views is incomplete")
        held = 2 * (len(states[0].data) + sum(len(view.data) for view in views))  # the artifacts and the requests
        # Before the refiner runs: the second call's message can be no larger than this (a refined view comes back
        # as uncompressed RGBA at most, PNG's worst case a little over it).
        self._check_fits(sum(image.ByteSize() for image in images) + len(states[0].data) + sum(
            int(camera.size**2 * 4 * 1.01) + 4096 for camera in first_done.hand_over.novel_view_cameras))
        async with self._budget.hold_when_free(held, job.remaining()):
            refine_started = time.monotonic()
            base = job.refine if job.refine is not None else RefineParams()
            novel_params = base.model_copy(update={"strength": refinement.novel_view_strength,
                                                   "seed": first_done.seed})
            refined: dict[int, Artifact] = {}
            forward_as = ArtifactKind.NOVEL_VIEW if ArtifactKind.NOVEL_VIEW in job.formats else None
            novel_images = [common_pb2.Image(data=view.data, media_type=view.media_type) for view in views]
            async for refine_event in self._refine(job, novel_params, refined, novel_images, forward_as):
                if refine_event.field in (PROGRESS, CHUNK):  # chunks: the refined novel views the caller asked for
                    # The two responses lay their events out alike (gateway.relay), so the bytes carry over.
                    encoded = refine_event.encoded or refine_event.message.SerializeToString()
                    yield StageEvent(trellis_pb2.ImageTo3DResponse, refine_event.field, encoded=encoded)
            refine_s = time.monotonic() - refine_started
            STAGE.set("image_to_3d")
            finish = trellis_pb2.RefineGaussiansRequest(
                request_id=job.request_id, images=images, formats=_generated_formats(job),
                seed=first_done.seed, hand_over=first_done.hand_over, state=states[0].data,
                novel_views=[common_pb2.Image(data=refined[i].data, media_type=refined[i].media_type)
                             for i in range(len(views))])
            params_to_proto(job.generation, finish.parameters)
            del handed, views, states, refined, novel_images
            self._check_fits(finish.ByteSize())
            async for event in self._relayed(lambda: self._stages.refine_gaussians(finish, timeout=job.remaining()),
                                             job):
                if event.field == DONE:
                    yield StageEvent(trellis_pb2.ImageTo3DResponse, DONE, message=trellis_pb2.ImageTo3DResponse(
                        done=_merged(first_done, event.message.done, refine_s)))
                else:
                    yield event

    def _check_fits(self, nbytes: int) -> None:
        """A novel-view refinement's second call must fit one message to the TRELLIS service."""
        if nbytes > self._max_message_bytes:
            raise InvalidInput(
                f"generation.gaussian_refinement.novel_views: this object's Gaussians and mesh with the images make "
                f"{nbytes / 2**20:.0f} MiB, more than one message to the TRELLIS service may carry "
                f"({self._max_message_bytes / 2**20:.0f} MiB); refine without novel_views, or raise max_request_bytes "
                "on the gateway and the TRELLIS service")

    async def _collected(self, call: Callable[[], TrellisCall], job: GenerateJob, into: list[Artifact]
                         ) -> AsyncIterator[StageEvent[trellis_pb2.ImageTo3DResponse]]:
        """A TRELLIS call whose artifacts are the next call's input: assembled into ``into`` in arrival order (not
        relayed), its other events relayed; retried from the start on another replica."""
        for attempt in range(1, self._attempts + 1):
            assembler = ArtifactAssembler()
            into.clear()
            try:
                async for event in self._stream("trellis", call()):
                    if event.field != CHUNK:
                        yield event
                        continue
                    artifact = assembler.feed(*event.chunk())
                    if artifact is not None:
                        into.append(artifact)
                return
            except StageFailed as failure:
                if not self._retryable(failure, attempt, job):
                    raise
                yield _retrying(trellis_pb2.ImageTo3DResponse, Stage.QUEUED, failure, attempt + 1, self._attempts)
                await asyncio.sleep(self._backoff_s(attempt, job))

    def _retryable(self, failure: StageFailed, attempt: int, job: GenerateJob) -> bool:
        """A replica that went away (or is not ready) mid-call: another one may take the stage, within the deadline.
        The stage gets the same request, seeds included, so it gives the same result."""
        return failure.code == "UNAVAILABLE" and attempt < self._attempts and job.remaining() > 1.0

    @staticmethod
    def _backoff_s(attempt: int, job: GenerateJob) -> float:
        """The pause before attempt ``attempt + 1``: 0.2 s, doubling, at most 2 s, leaving a second of the deadline.
        Time for DNS and the channel's health checks to drop a replica that went away. This loop is the only retry
        of a stage call (the channels have no retry policy), so ``attempts`` means what it says."""
        return max(0.0, min(RETRY_BACKOFF_S * 2.0 ** (attempt - 1), MAX_RETRY_BACKOFF_S, job.remaining() - 1.0))

    async def _stream(self, stage: str, call: grpc.aio.UnaryStreamCall[Any, _Event]) -> AsyncIterator[_Event]:
        """Iterate a stage call; its failures become ``StageFailed`` with the stage's own status code."""
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            retry_after_s = 1.0 if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None  # a stage's full queue
            raise StageFailed(stage, exc.code().name, exc.details() or exc.code().name,
                              retry_after_s=retry_after_s) from exc
        except ArtifactProtocolError as exc:
            raise StageFailed(stage, "INTERNAL", str(exc)) from exc
        finally:
            call.cancel()  # no-op when finished; stops the stage when we leave early


def _generated_formats(job: GenerateJob) -> list[common_pb2.ArtifactKind.ValueType]:
    """What TRELLIS writes of what the caller asked for."""
    return kinds_to_proto(job.formats & GENERATED_KINDS)


def _merged(handed_over: trellis_pb2.ImageTo3DDone, finished: trellis_pb2.ImageTo3DDone, refine_s: float
            ) -> trellis_pb2.ImageTo3DDone:
    """One ``done`` for the three calls of a novel-view refinement: the stage times added up (the refiner call on the
    novel views counts as Gaussian refinement), the notes of both TRELLIS calls, the second call's report."""
    seconds: dict[int, float] = {}
    for timing in (*handed_over.timings, *finished.timings):
        if timing.stage != int(Stage.QUEUED) or timing.stage not in seconds:  # the first call's queueing is the job's
            seconds[timing.stage] = seconds.get(timing.stage, 0.0) + timing.seconds
    seconds[Stage.GAUSSIAN_REFINEMENT] = seconds.get(Stage.GAUSSIAN_REFINEMENT, 0.0) + refine_s
    merged = trellis_pb2.ImageTo3DDone()
    merged.CopyFrom(finished)
    del merged.timings[:]
    merged.timings.extend(common_pb2.StageTiming(stage=common_pb2.Stage.ValueType(stage), seconds=value)
                          for stage, value in seconds.items())
    del merged.notes[:]
    merged.notes.extend(dict.fromkeys([*handed_over.notes, *finished.notes]))
    return merged


def _retrying(message_type: type[M], stage: Stage, failure: StageFailed, attempt: int, attempts: int
              ) -> StageEvent[M]:
    """The progress event that tells the caller a stage moves to another replica."""
    note = f"{failure}; retrying on another replica (attempt {attempt} of {attempts})"
    return StageEvent(message_type, PROGRESS, message=message_type(progress=progress_to_proto(stage, 0, 0, note)))
