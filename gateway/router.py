"""Stage routing: optional refinement, then image-to-3D, relayed as one stream.

The router speaks to the model services over gRPC and streams their progress and artifact chunks to
the caller as they arrive. Chunks are forwarded in the bytes they arrived as (see
:mod:`gateway.relay`), never reassembled, except refined images, which are the next stage's input.
Leaving the stream (client cancel, deadline) cancels the stage call in flight, which stops the model
worker at its next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from gateway.admission import Admission
from gateway.relay import CHUNK, DONE, PROGRESS, M, Outgoing, StageEvent
from gateway.stages import StageClients
from trellisbox._domain.artifacts import Artifact, ArtifactAssembler, ArtifactProtocolError
from trellisbox._domain.convert import kinds_to_proto, params_to_proto, progress_to_proto, timings_to_proto
from trellisbox._domain.errors import StageFailed
from trellisbox._domain.imaging import HANDOFF_MEDIA_TYPE
from trellisbox._domain.kinds import ArtifactKind, Stage, known_stage
from trellisbox._domain.params import GenerationParams, RefineParams
from trellisbox._runtime.observability import STAGE, observe_stages
from trellisbox.v1 import common_pb2, gateway_pb2, refiner_pb2, trellis_pb2

_log = logging.getLogger(__name__)

_Event = TypeVar("_Event", StageEvent[refiner_pb2.RefineResponse], StageEvent[trellis_pb2.ImageTo3DResponse])

GENERATED_KINDS = frozenset({ArtifactKind.GLB, ArtifactKind.GAUSSIAN_PLY})
#: The classic (CPU restoration) refiner has no diffusion model: say so rather than ignore the parameters silently.
CLASSIC_NOTE = "classic refiner: only strength applies; prompts, guidance, steps and seed are ignored"


@dataclass(frozen=True)
class GenerateJob:
    """A validated request.

    Args:
        request_id: Correlates logs and metrics across the three services.
        images: The caller's encoded images, already validated by decoding them once.
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

    def __init__(self, stages: StageClients, admission: Admission, attempts: int = 3) -> None:
        self._stages = stages
        self._admission = admission
        self._attempts = attempts

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
        async for stage_event in self._image_to_3d(job, images):
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


    async def _refine(self, job: GenerateJob, params: RefineParams,
                      refined: dict[int, Artifact]) -> AsyncIterator[StageEvent[refiner_pb2.RefineResponse]]:
        """The refiner's events; its refined images go into ``refined`` (and to the caller once complete)."""
        STAGE.set("refine")  # this call's log lines, to its end (a failure is logged with the stage it failed in)
        forward_chunks = ArtifactKind.REFINED_IMAGE in job.formats
        # A refined image only TRELLIS sees travels in the lossless hand-off form: no PNG encode, a cheaper decode.
        request = refiner_pb2.RefineRequest(request_id=job.request_id, images=job.images,
                                            output_media_type="" if forward_chunks else HANDOFF_MEDIA_TYPE)
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
        for chunk in chunks:
            yield chunk
        missing = set(range(len(job.images))) - set(refined)
        if missing:
            raise StageFailed("refiner", "INTERNAL", f"returned no refined image for images {sorted(missing)}")

    async def _image_to_3d(self, job: GenerateJob, images: Sequence[common_pb2.Image]
                           ) -> AsyncIterator[StageEvent[trellis_pb2.ImageTo3DResponse]]:
        """TRELLIS's events; its artifact chunks are relayed as they come, so it is retried only before the first."""
        STAGE.set("image_to_3d")
        request = trellis_pb2.ImageTo3DRequest(request_id=job.request_id, images=images,
                                               formats=kinds_to_proto(job.formats & GENERATED_KINDS))
        params_to_proto(job.generation, request.parameters)
        for attempt in range(1, self._attempts + 1):
            relayed_chunk = False
            try:
                async for event in self._stream("trellis", self._stages.image_to_3d(request,
                                                                                     timeout=job.remaining())):
                    relayed_chunk = relayed_chunk or event.field == CHUNK
                    yield event
                return
            except StageFailed as failure:
                if relayed_chunk or not self._retryable(failure, attempt, job):
                    raise
                yield _retrying(trellis_pb2.ImageTo3DResponse, Stage.QUEUED, failure, attempt + 1, self._attempts)

    def _retryable(self, failure: StageFailed, attempt: int, job: GenerateJob) -> bool:
        """A replica that went away (or is not ready) mid-call: another one may take the stage, within the deadline.
        The stage gets the same request, seeds included, so it gives the same result."""
        return failure.code == "UNAVAILABLE" and attempt < self._attempts and job.remaining() > 1.0

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


def _retrying(message_type: type[M], stage: Stage, failure: StageFailed, attempt: int, attempts: int
              ) -> StageEvent[M]:
    """The progress event that tells the caller a stage moves to another replica."""
    note = f"{failure}; retrying on another replica (attempt {attempt} of {attempts})"
    return StageEvent(message_type, PROGRESS, message=message_type(progress=progress_to_proto(stage, 0, 0, note)))
