"""The one server bootstrap: gRPC aio server, health, reflection, metrics, graceful shutdown.

Liveness (health service "") is SERVING as soon as the port is open; readiness (the service's full
name) turns SERVING only after ``warm_up`` has loaded the model and run it once, so Kubernetes startup
and readiness probes and the gateway never send work to a cold model.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import _async as reflection_aio  # the aio servicer (no public name in the stubs)
from grpc_reflection.v1alpha import reflection, reflection_pb2

from trellisbox._domain.errors import ServiceError
from trellisbox._runtime import tracing
from trellisbox._runtime.allocator import MallocProfile, settle_heap, tune_malloc
from trellisbox._runtime.config import MAX_RESPONSE_BYTES, ServiceSettings
from trellisbox._runtime.interceptor import ErrorInterceptor, ServerInterceptor
from trellisbox._runtime.observability import configure_logging, start_metrics_server
from trellisbox._runtime.security import describe_tls, is_loopback, server_credentials

_log = logging.getLogger(__name__)


@dataclass
class ServiceSpec:
    """What a service plugs into the bootstrap.

    Args:
        name: Full proto service name, e.g. ``"trellisbox.v1.RefinerService"``; also the readiness key.
        register: Adds the servicer(s) to the server.
        warm_up: Blocking load + first inference; runs in a thread after the port is open.
        describe: One line for the log once ready (backend, device).
        on_drain: Called with the grace period (seconds) when the server starts draining, and awaited alongside the
            calls' drain: work that outlives calls (the gateway's durable requests) ends within the same grace.
        on_shutdown: Called after the server stopped (free the model, release leases, close channels); may be
            a coroutine function.
        readiness: After warm-up, what readiness follows for the server's lifetime: an async iterator of
            whether the service can serve now (the gateway: whether its stages can be reached). None: ready
            from warm-up on.
        interceptors: Server interceptors of this service (the gateway's token check), run inside the error
            mapping, so what they raise becomes a status code like any handler's error.
    """

    name: str
    register: Callable[[grpc.aio.Server], None]
    warm_up: Callable[[], object] | None = None
    describe: Callable[[], str] = field(default=lambda: "")
    on_drain: Callable[[float], Awaitable[None]] | None = None
    on_shutdown: Callable[[], Awaitable[None] | None] | None = None
    readiness: Callable[[], AsyncIterator[bool]] | None = None
    interceptors: Sequence[ServerInterceptor] = ()


#: Server reflection v1 (what current grpcurl and GUI clients ask for first). grpcio-reflection serves v1alpha only;
#: v1's messages are the same on the wire, so the same servicer answers under both names.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Server reflection, v1 and v1alpha, listing ``service_names`` and both reflection services."""
    names = (*service_names, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection_aio.ReflectionServicer(names)
    for service in (reflection.SERVICE_NAME, REFLECTION_V1):
        handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel arguments every service's server uses."""
    options = [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", max(settings.max_request_bytes, MAX_RESPONSE_BYTES)),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # No bandwidth-delay probing of receive windows: a stream whose request is not being read yet (the gateway
        # reads one when its byte budget has room) then buffers nothing, instead of up to several MiB each; a request
        # being read still gets the window for its whole message. Measured: 16 waiting 60 MiB uploads held 130 MiB
        # with probing and none without; the reads themselves took as long.
        ("grpc.http2.bdp_probe", 0),
    ]
    if settings.max_connection_age_s > 0:
        # Bounded connection age makes dns:/// clients re-resolve and find new replicas; the grace lets the calls
        # in flight on an aging connection finish (a generation can take minutes), new calls use a new one.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.longest_call_s * 1000)),
        ]
    return options


class StartupError(Exception):
    """The server cannot start as configured (its port is taken): one line for its log, not a traceback."""


def _bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind to address ...; set GRPC_VERBOSITY=debug ..."
        bound = 0
    if bound == 0:
        raise StartupError(f"cannot listen on {address}: the port is taken, or the address is not this machine's")
    return bound


def _health_only_server(health_servicer: health_aio.HealthServicer) -> grpc.aio.Server:
    server = grpc.aio.server(maximum_concurrent_rpcs=16)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server


async def serve(settings: ServiceSettings, spec: ServiceSpec) -> None:
    """Serve until SIGTERM/SIGINT, then drain for ``settings.grace_s`` seconds."""
    # The interceptor maps every handler's errors to status codes (and counts calls): one place for all RPCs. With
    # tracing on, its span interceptor comes first, so the span sees the status the caller gets; the service's own
    # interceptors (the gateway's token check) run inside the mapping, so what they raise becomes a status too.
    server = grpc.aio.server(options=server_options(settings),
                             interceptors=[*tracing.server_interceptors(), ErrorInterceptor(), *spec.interceptors],
                             maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    spec.register(server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((spec.name, health.SERVICE_NAME), server)
    credentials = server_credentials(settings.tls_mode, settings.tls_cert_file, settings.tls_key_file,
                                     settings.tls_client_ca_file)
    port = _bind(server, settings.host, settings.port, credentials)
    # Probes only: the kubelet's gRPC probe speaks plaintext and has no client certificate.
    health_server = _health_only_server(health_servicer) if settings.health_port else None
    if health_server is not None:
        _bind(health_server, settings.host, settings.health_port, None)
        await health_server.start()
    await server.start()
    start_metrics_server(settings.metrics_port, settings.host)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(spec.name, health_pb2.HealthCheckResponse.NOT_SERVING)
    transport = describe_tls(settings.tls_mode, settings.tls_cert_file, settings.tls_client_ca_file)
    # Plaintext reachable from other machines is allowed (tls=off) but never quiet.
    plaintext_exposed = credentials is None and not is_loopback(settings.host)
    _log.log(logging.WARNING if plaintext_exposed else logging.INFO, "listening on %s:%d, %s (%s not ready yet)",
             settings.host, port, transport, spec.name)
    if health_server is not None:
        _log.info("health checks only, plaintext, on %s:%d", settings.host, settings.health_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def warm_up() -> None:
        try:
            if spec.warm_up is not None:
                await asyncio.to_thread(spec.warm_up)
        except ServiceError as exc:  # an explained failure (e.g. missing weights): the message is the point
            _log.error("%s cannot start its model and stays NOT_SERVING: %s", spec.name, exc)
            return
        except Exception:
            _log.exception("warm-up failed: %s stays NOT_SERVING", spec.name)
            return
        settle_heap()
        if spec.readiness is None:
            await health_servicer.set(spec.name, health_pb2.HealthCheckResponse.SERVING)
            _log.info("ready: %s %s", spec.name, spec.describe())
            return
        ready: bool | None = None
        async for now in spec.readiness():
            if now != ready:
                ready = now
                status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
                await health_servicer.set(spec.name, status)
                _log.log(logging.INFO if now else logging.WARNING, "%s: %s %s", "ready" if now else "NOT ready",
                         spec.name, spec.describe())

    warm_task = asyncio.create_task(warm_up())
    await stop.wait()
    _log.info("draining for up to %.0f s", settings.grace_s)
    await health_servicer.enter_graceful_shutdown()
    # One grace for everything: the calls in flight and, alongside, what outlives calls.
    await asyncio.gather(server.stop(settings.grace_s),
                         *([spec.on_drain(settings.grace_s)] if spec.on_drain is not None else []))
    if health_server is not None:
        await health_server.stop(None)
    warm_task.cancel()
    if spec.on_shutdown is not None:
        done = spec.on_shutdown()
        if inspect.isawaitable(done):
            await done
    _log.info("stopped")



def run(settings: ServiceSettings, spec: ServiceSpec, service_label: str, *,
        malloc: MallocProfile | None = None) -> None:
    """Entry point for a service's ``__main__``; ``malloc``: the allocator settings to apply (:func:`tune_malloc`),
    before any thread starts."""
    configure_logging(service_label, settings.log_level, settings.log_format,
                      trace_ids=tracing.current_ids if settings.traced else None)
    if settings.traced:
        tracing.start(settings, service_label)
    if malloc is not None:
        _log.info("%s", tune_malloc(malloc))
    try:
        asyncio.run(serve(settings, spec))
    except StartupError as exc:
        _log.error("cannot start: %s", exc)
        raise SystemExit(1) from None
    finally:
        tracing.stop()  # export the spans still buffered
