"""Channels and stubs to the model services, one long-lived channel per stage.

The refiner target is normally ``dns:///<headless service>:port``: with the round_robin policy and
client-side health checking, calls are spread over every replica that reports its readiness service
SERVING, and replicas that appear or disappear are picked up when the servers' max connection age
makes the channel re-resolve.

Responses are deserialized by :func:`gateway.relay.stage_deserializer`: progress and artifact chunks stay
in the bytes they arrived as and are relayed to the client unparsed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import grpc

from gateway.config import GatewaySettings
from gateway.relay import M, StageEvent, stage_deserializer
from trellisbox._domain.contract import REFINER_SERVICE, TRELLIS_SERVICE
from trellisbox._runtime import tracing
from trellisbox._runtime.config import MAX_RESPONSE_BYTES
from trellisbox._runtime.security import FileWatch, channel_credentials
from trellisbox.v1 import refiner_pb2, trellis_pb2

_log = logging.getLogger(__name__)

RefineCall = grpc.aio.UnaryStreamCall[refiner_pb2.RefineRequest, StageEvent[refiner_pb2.RefineResponse]]
ImageTo3DCall = grpc.aio.UnaryStreamCall[trellis_pb2.ImageTo3DRequest, StageEvent[trellis_pb2.ImageTo3DResponse]]
RefineGaussiansCall = grpc.aio.UnaryStreamCall[trellis_pb2.RefineGaussiansRequest,
                                               StageEvent[trellis_pb2.ImageTo3DResponse]]


#: The longest a stage channel waits between attempts to reconnect to a replica that went away.
MAX_RECONNECT_BACKOFF_MS = 2_000


def _method_path(service: str, method: str) -> str:
    """``/package.Service/Method``, the HTTP/2 path of a method."""
    return f"/{service}/{method}"


def service_config(service: str) -> str:
    """Round-robin over healthy backends. No retry policy: the router is the one place a stage call is tried
    again (``stage_retries`` attempts, also mid-stream, with a note to the caller); a second layer here would
    multiply them."""
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": service},
    })


def channel_options(settings: GatewaySettings, service: str) -> list[tuple[str, int | str]]:
    return [
        ("grpc.service_config", service_config(service)),
        # Requests carry whole images; let gRPC's transparent retries (a call that never reached a server) buffer
        # them instead of committing early.
        ("grpc.per_rpc_retry_buffer_size", settings.max_request_bytes),
        ("grpc.retry_buffer_size", 4 * settings.max_request_bytes),
        ("grpc.max_send_message_length", settings.max_request_bytes),
        ("grpc.max_receive_message_length", max(settings.max_request_bytes, MAX_RESPONSE_BYTES)),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # A replica closing an aged connection makes the channel re-resolve; gRPC's default allows that once in
        # 30 s, which would hide a new replica that long.
        ("grpc.dns_min_time_between_resolutions_ms", 2_000),
        # A stage that was down comes back within a second or two of being ready: gRPC's default reconnect backoff
        # grows to 120 s, and calls fail UNAVAILABLE while the channel waits out a long one.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def _stage_method(channel: grpc.aio.Channel, service: str, method: str, request_type: type[Any],
                  response_type: type[M]) -> grpc.aio.UnaryStreamMultiCallable[Any, StageEvent[M]]:
    """A server-streaming stage method whose events keep the bytes they arrived as (:mod:`gateway.relay`)."""
    return channel.unary_stream(_method_path(service, method), request_serializer=request_type.SerializeToString,
                                response_deserializer=stage_deserializer(response_type))


class StageClients:
    """The gateway's calls to the refiner pool and the TRELLIS service: one long-lived channel each.

    With ``stage_tls`` the channels verify the services' certificates and (mutual) present the gateway's; when those
    files change (a rotated Secret) the next call opens new channels with them, and the old ones close once the calls
    on them are done.
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        mode = settings.stage_tls or "off"
        files = (settings.stage_ca_file, *((settings.stage_cert_file, settings.stage_key_file)
                                            if mode == "mutual" else ()))
        self._tls_files = FileWatch([f for f in files if f is not None]) if mode != "off" else None
        self._retiring: set[asyncio.Task[None]] = set()
        self._open()

    def _open(self) -> None:
        settings = self._settings
        credentials = None
        if self._tls_files is not None:
            ca_file, *client = self._tls_files.paths
            credentials = channel_credentials(ca_file, *client)

        def channel(target: str, service: str) -> grpc.aio.Channel:
            options = channel_options(settings, service)
            interceptors = tracing.client_interceptors()  # None unless tracing is on
            if credentials is None:
                return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
            return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)

        self._refiner_channel = channel(settings.refiner_target, REFINER_SERVICE)
        self._trellis_channel = channel(settings.trellis_target, TRELLIS_SERVICE)
        self._refine: grpc.aio.UnaryStreamMultiCallable[
            refiner_pb2.RefineRequest, StageEvent[refiner_pb2.RefineResponse]
        ] = _stage_method(self._refiner_channel, REFINER_SERVICE, "Refine", refiner_pb2.RefineRequest,
                          refiner_pb2.RefineResponse)
        self._image_to_3d: grpc.aio.UnaryStreamMultiCallable[
            trellis_pb2.ImageTo3DRequest, StageEvent[trellis_pb2.ImageTo3DResponse]
        ] = _stage_method(self._trellis_channel, TRELLIS_SERVICE, "ImageTo3D", trellis_pb2.ImageTo3DRequest,
                          trellis_pb2.ImageTo3DResponse)
        # Its responses are ImageTo3DResponse's twin (a test holds them to that): read alike.
        self._refine_gaussians: grpc.aio.UnaryStreamMultiCallable[
            trellis_pb2.RefineGaussiansRequest, StageEvent[trellis_pb2.ImageTo3DResponse]
        ] = _stage_method(self._trellis_channel, TRELLIS_SERVICE, "RefineGaussians",
                          trellis_pb2.RefineGaussiansRequest, trellis_pb2.ImageTo3DResponse)

    def _follow_rotation(self) -> None:
        """New channels when the TLS files changed; the old ones finish their calls (up to the longest deadline)."""
        if self._tls_files is None or not self._tls_files.changed():
            return
        old = (self._refiner_channel, self._trellis_channel)
        try:
            self._open()
        except ValueError as exc:
            _log.warning("stage TLS files changed but cannot be used (%s); keeping the current channels", exc)
            return
        _log.info("stage TLS files changed: new connections to the model services use them")
        for channel in old:
            task = asyncio.create_task(channel.close(self._settings.default_timeout_s))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def refine(self, request: refiner_pb2.RefineRequest, timeout: float) -> RefineCall:
        self._follow_rotation()
        return self._refine(request, timeout=timeout)

    def image_to_3d(self, request: trellis_pb2.ImageTo3DRequest, timeout: float) -> ImageTo3DCall:
        self._follow_rotation()
        return self._image_to_3d(request, timeout=timeout)

    def refine_gaussians(self, request: trellis_pb2.RefineGaussiansRequest, timeout: float) -> RefineGaussiansCall:
        self._follow_rotation()
        return self._refine_gaussians(request, timeout=timeout)

    def unreachable(self) -> list[str]:
        """The stages with no ready replica now: the channel's round_robin counts only replicas whose readiness is
        SERVING. Asks an idle channel to connect."""
        self._follow_rotation()
        channels = (("refiner", self._refiner_channel), ("trellis", self._trellis_channel))
        return [stage for stage, channel in channels
                if channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY]

    async def close(self) -> None:
        await self._refiner_channel.close(None)
        await self._trellis_channel.close(None)
        for task in list(self._retiring):
            task.cancel()
