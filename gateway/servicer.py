"""gRPC transport of the gateway: protobuf in, validated domain job to the router, protobuf out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import grpc

from gateway.admission import ByteBudget
from gateway.config import GatewaySettings
from gateway.relay import Outgoing, serialize_response
from gateway.results import CancelOutcome, DurableJobs, request_fingerprint
from gateway.router import GENERATED_KINDS, GenerateJob, Router
from trellisbox._domain.contract import GATEWAY_SERVICE
from trellisbox._domain.convert import kinds_from_proto, params_from_proto
from trellisbox._domain.errors import DeadlineExceeded, InvalidInput, NotFound
from trellisbox._domain.kinds import ArtifactKind
from trellisbox._domain.params import GenerationParams, RefineParams, random_seed
from trellisbox._runtime.allocator import release_memory
from trellisbox._runtime.interceptor import parse_request
from trellisbox._runtime.servicing import bind_request_id, check_request_images
from trellisbox.v1 import gateway_pb2

_log = logging.getLogger(__name__)

def requested_formats(request: gateway_pb2.GenerateRequest, generation: GenerationParams) -> frozenset[ArtifactKind]:
    """The artifact kinds to return; GLB (plus the refined image when refining) by default."""
    hints = {ArtifactKind.GENERATION_STATE: "it is internal to a novel-view Gaussian refinement"}
    formats = kinds_from_proto(request.formats, set(ArtifactKind) - {ArtifactKind.GENERATION_STATE}, hints=hints)
    if not formats:
        formats = frozenset({ArtifactKind.GLB})
        if request.refine:
            formats |= {ArtifactKind.REFINED_IMAGE}
    if ArtifactKind.REFINED_IMAGE in formats and not request.refine:
        raise InvalidInput("ARTIFACT_KIND_REFINED_IMAGE was requested but refine is false; set refine=true")
    refinement = generation.gaussian_refinement
    if ArtifactKind.NOVEL_VIEW in formats and not (refinement.enabled and refinement.novel_views):
        raise InvalidInput("ARTIFACT_KIND_NOVEL_VIEW was requested but there are no novel views; set "
                           "generation.gaussian_refinement.enabled and generation.gaussian_refinement.novel_views")
    if not formats & GENERATED_KINDS:
        formats |= {ArtifactKind.GLB}  # the 3D model is the point of the call
    return formats


#: Requests above this size leave enough freed memory behind to be worth returning it to the system.
_LARGE_REQUEST = 8 * 2**20

_Seeded = TypeVar("_Seeded", RefineParams, GenerationParams)


def _seeded(params: _Seeded) -> _Seeded:
    """``params`` with its seed chosen here when the caller left it unset: a stage retried on another replica then
    gives the same result, and ``done`` echoes the seed either way."""
    return params if params.seed is not None else params.model_copy(update={"seed": random_seed()})


class GatewayServicer:
    """``trellisbox.v1.GatewayService``; register it with :func:`add_gateway_servicer`.

    Args:
        settings: Gateway settings (limits, default deadline).
        router: Runs the stages.
        budget: Bounds the request bytes held at once (reading waits for room; refusal before decoding).
        jobs: Runs the durable requests (those with a request_id) and keeps their results.
    """

    def __init__(self, settings: GatewaySettings, router: Router, budget: ByteBudget, jobs: DurableJobs) -> None:
        self._settings = settings
        self._router = router
        self._budget = budget
        self._jobs = jobs

    async def Generate(self, requests: AsyncIterator[bytes],
                       context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Outgoing]:
        """Registered as a request stream, which is the same on the wire as a unary request: the gateway reads the
        request itself, once the byte budget has room for the largest one (see :class:`ByteBudget`)."""
        async with AsyncExitStack() as held:
            request = await self._receive(context, held)
            request_id = bind_request_id(request.request_id)
            fingerprint: str | None = None
            if request.request_id:  # durable: the same request again attaches to its job, or gets its stored result
                fingerprint = await asyncio.to_thread(request_fingerprint, request)
                existing = self._jobs.attach(request_id, fingerprint)
                if existing is not None:
                    _log.info("generate: the same request again; attached")
                    async for response in existing:
                        yield response
                    return
            await self._validate(request)
            job = self._job(request_id, request, context)
            if fingerprint is None:
                async for response in self._router.generate(job):
                    yield response
                return
            # The job runs as the gateway's, holding the request until it ends; this call only follows it.
            followed = await self._jobs.start(request_id, fingerprint, lambda: self._router.generate(job),
                                              held.pop_all())
        async for response in followed:
            yield response

    async def GetResult(self, request: gateway_pb2.GetResultRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Outgoing]:
        request_id = self._named(request.request_id)
        found = self._jobs.attach(request_id, None)
        if found is None:
            raise NotFound(f"no running request and no stored result with request_id {request_id!r} on this gateway "
                           f"(results are kept {self._settings.results_retention_s:.0f} s after they finish; failed "
                           "requests are not kept: send the request again)")
        async for response in found:
            yield response

    async def Cancel(self, request: gateway_pb2.CancelRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> gateway_pb2.CancelResponse:
        request_id = self._named(request.request_id)
        outcome = self._jobs.cancel(request_id)
        if outcome is None:
            raise NotFound(f"no running request and no stored result with request_id {request_id!r} on this gateway")
        _log.info("cancel: %s", outcome.value)
        return gateway_pb2.CancelResponse(outcome=gateway_pb2.CancelResponse.OUTCOME_STOPPED
                                          if outcome is CancelOutcome.STOPPED
                                          else gateway_pb2.CancelResponse.OUTCOME_DELETED)

    @staticmethod
    def _named(given: str) -> str:
        if not given:
            raise InvalidInput("request_id is required: the id the request was sent with")
        return bind_request_id(given)

    async def _receive(self, context: grpc.aio.ServicerContext[Any, Any], held: AsyncExitStack
                       ) -> gateway_pb2.GenerateRequest:
        """Read the request once the budget has room for the largest one twice; twice its bytes stay held until
        ``held`` closes."""
        large = False

        async def return_memory() -> None:  # registered first, so it runs after the hold is given back
            if large and self._budget.held == 0:
                # The last large request is done: give the heap's free pages back (uploads arrive in many small
                # transport buffers, which glibc keeps otherwise).
                await asyncio.to_thread(release_memory, collect=False)

        held.push_async_callback(return_memory)
        limit_s = self._settings.receive_timeout_s
        # Room for the largest request twice (it and the stage request built from it, held until the job ends), so
        # that once read it needs no more: a request read is never refused for room, and never waits for it while
        # holding some.
        reserve = min(2 * self._settings.max_request_bytes, self._settings.max_held_bytes)
        hold = await held.enter_async_context(self._budget.hold_when_free(reserve, self._wait_s(context)))
        try:
            data = await asyncio.wait_for(context.read(), limit_s)
        except TimeoutError:
            raise DeadlineExceeded(f"the request did not arrive within {limit_s:.0f} s (receive_timeout_s)") from None
        if not isinstance(data, bytes):
            raise InvalidInput("no request message: send one GenerateRequest")
        hold.resize(min(2 * len(data), reserve))  # what it holds until the job ends; the rest goes to the next
        large = len(data) > _LARGE_REQUEST
        return parse_request(gateway_pb2.GenerateRequest, data)

    async def _validate(self, request: gateway_pb2.GenerateRequest) -> None:
        """Check the images without decoding them: format, declared type, size, pixel count, and a PNG's structure and
        checksums. The stage that first reads the pixels decodes them and refuses what only decoding finds (a JPEG cut
        short) before its model runs, with the same message; decoding here too would cost every request a few ms per
        image before any stage starts (docs/benchmarks.md). The stages get the caller's bytes, not a re-encoding."""
        await check_request_images(request.images, self._settings, request.ByteSize())

    def _wait_s(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        """How long a request may wait for room in the byte budget."""
        limit_s = self._settings.receive_timeout_s
        return min(limit_s, context.time_remaining() or limit_s)

    def _job(self, request_id: str, request: gateway_pb2.GenerateRequest,
             context: grpc.aio.ServicerContext[Any, Any]) -> GenerateJob:
        generation = _seeded(params_from_proto(GenerationParams, request.generation, "generation"))
        # Checked with refinement off too: a value out of range is the caller's mistake either way.
        refine = params_from_proto(RefineParams, request.refine_parameters, "refine_parameters")
        remaining_s = context.time_remaining()
        # A durable request is the gateway's job, not the call's: a caller's deadline ends its call (it attaches again
        # or fetches the result), and the job has the longer of that deadline and default_timeout_s.
        limit_s = (max(remaining_s or 0.0, self._settings.default_timeout_s) if request.request_id
                   else remaining_s or self._settings.default_timeout_s)
        job = GenerateJob(
            request_id=request_id,
            images=request.images,
            refine=_seeded(refine) if request.refine else None,
            generation=generation,
            formats=requested_formats(request, generation),
            deadline=time.monotonic() + limit_s,
        )
        _log.info("generate: %d image(s), refine=%s, formats=%s%s", len(job.images), job.refine is not None,
                  sorted(kind.name for kind in job.formats), ", durable" if request.request_id else "")
        return job


def add_gateway_servicer(servicer: GatewayServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_GatewayServiceServicer_to_server``, but with a response
    serializer that passes relayed stage events (:class:`gateway.relay.Encoded`) through unchanged."""
    handlers = {
        # A request stream with raw bytes in: the servicer reads and parses the request when the budget has room.
        "Generate": grpc.stream_stream_rpc_method_handler(servicer.Generate, response_serializer=serialize_response),
        "GetResult": grpc.unary_stream_rpc_method_handler(
            servicer.GetResult,
            request_deserializer=gateway_pb2.GetResultRequest.FromString,
            response_serializer=serialize_response,
        ),
        "Cancel": grpc.unary_unary_rpc_method_handler(
            servicer.Cancel,
            request_deserializer=gateway_pb2.CancelRequest.FromString,
            response_serializer=gateway_pb2.CancelResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(GATEWAY_SERVICE, handlers),))
    server.add_registered_method_handlers(GATEWAY_SERVICE, handlers)  # type: ignore[attr-defined]  # stubs lag
