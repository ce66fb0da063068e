"""gRPC transport of the gateway: protobuf in, validated domain job to the router, protobuf out."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from gateway.config import GatewaySettings
from gateway.relay import Outgoing, serialize_response
from gateway.router import GENERATED_KINDS, GenerateJob, Router
from trellisbox._domain.contract import GATEWAY_SERVICE
from trellisbox._domain.convert import decode_images, generation_params_from_proto, refine_params_from_proto
from trellisbox._domain.errors import InvalidInput, error_boundary
from trellisbox._runtime.observability import REQUEST_ID
from trellisbox.v1 import common_pb2, gateway_pb2

_log = logging.getLogger(__name__)

_KNOWN_KINDS = GENERATED_KINDS | {common_pb2.ARTIFACT_KIND_REFINED_IMAGE}


def requested_formats(request: gateway_pb2.GenerateRequest) -> frozenset[int]:
    """The artifact kinds to return; GLB (plus the refined image when refining) by default."""
    for kind in request.formats:
        if kind not in _KNOWN_KINDS:
            raise InvalidInput(
                f"formats contains {kind}; use ARTIFACT_KIND_GLB, ARTIFACT_KIND_GAUSSIAN_PLY or "
                "ARTIFACT_KIND_REFINED_IMAGE"
            )
    formats = frozenset(request.formats)
    if not formats:
        formats = frozenset({common_pb2.ARTIFACT_KIND_GLB})
        if request.refine:
            formats |= {common_pb2.ARTIFACT_KIND_REFINED_IMAGE}
    if common_pb2.ARTIFACT_KIND_REFINED_IMAGE in formats and not request.refine:
        raise InvalidInput("ARTIFACT_KIND_REFINED_IMAGE was requested but refine is false; set refine=true")
    if not formats & GENERATED_KINDS:
        formats |= {common_pb2.ARTIFACT_KIND_GLB}  # the 3D model is the point of the call
    return formats


class GatewayServicer:
    """``trellisbox.v1.GatewayService``; register it with :func:`add_gateway_servicer`.

    Args:
        settings: Gateway settings (limits, default deadline).
        router: Runs the stages.
    """

    def __init__(self, settings: GatewaySettings, router: Router) -> None:
        self._settings = settings
        self._router = router

    @error_boundary
    async def Generate(self, request: gateway_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Outgoing]:
        request_id = request.request_id or uuid.uuid4().hex[:16]
        REQUEST_ID.set(request_id)
        # Decoding once here is the validation: format, size, pixel count, truncation. It is CPU work
        # (a 4096² PNG takes a few hundred ms): off the event loop, so streams in flight keep flowing.
        await asyncio.to_thread(decode_images, request.images, self._settings.image_limits, self._settings.max_images)
        job = GenerateJob(
            request_id=request_id,
            images=request.images,
            refine=refine_params_from_proto(request.refine_parameters) if request.refine else None,
            generation=generation_params_from_proto(request.generation),
            formats=requested_formats(request),
            deadline=time.monotonic() + (context.time_remaining() or self._settings.default_timeout_s),
        )
        _log.info("generate: %d image(s), refine=%s, formats=%s", len(job.images), job.refine is not None,
                  sorted(common_pb2.ArtifactKind.Name(k) for k in job.formats))  # type: ignore[arg-type]
        async for response in self._router.generate(job):
            yield response


def add_gateway_servicer(servicer: GatewayServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_GatewayServiceServicer_to_server``, but with a response
    serializer that passes relayed stage events (:class:`gateway.relay.Encoded`) through unchanged."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=gateway_pb2.GenerateRequest.FromString,
            response_serializer=serialize_response,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(GATEWAY_SERVICE, handlers),))
    server.add_registered_method_handlers(GATEWAY_SERVICE, handlers)  # type: ignore[attr-defined]  # stubs lag
