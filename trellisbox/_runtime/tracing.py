"""OpenTelemetry tracing, off unless a service's settings turn it on (``tracing`` or ``otlp_endpoint``).

When on, for the whole process:

- a tracer provider whose spans go through a batch processor to the OTLP/gRPC exporter (the standard ``OTEL_*``
  variables configure both: endpoint, headers, sampler, batch sizes); the resource names the service
  ``trellisbox-<label>`` unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` name it;
- every gRPC server gets opentelemetry-instrumentation-grpc's aio server interceptor, ahead of the error
  interceptor: each call is a span (its status the call's status), child of the caller's span when the caller
  sent W3C ``traceparent`` metadata;
- the gateway's channels to the stages get the aio client interceptors: each stage call is a child span of the
  gateway's call and sends ``traceparent`` on, so one request is one trace across the three services;
- each request's id is the span attribute ``trellisbox.request_id`` (:func:`tag_request`);
- log lines written inside a call carry its trace id (:func:`current_ids`).

Health checks and reflection are not traced (probes would drown the traces). When tracing is off nothing of
OpenTelemetry is imported and no interceptor is installed: the calls pay nothing for it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from trellisbox._runtime.config import ServiceSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

_log = logging.getLogger(__name__)

#: The span attribute that holds the request id (the one in every log line and in ``done``).
REQUEST_ID_ATTRIBUTE = "trellisbox.request_id"
#: Services whose calls make no spans: probes and tools.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                     "grpc.reflection.v1.ServerReflection")


class Tracing:
    """A tracer provider and the gRPC interceptors that record into it.

    Args:
        provider: Where spans go (the process's provider; tests pass one with an in-memory exporter).
    """

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
        from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_name

        traced = negate(any_of(*(service_name(name) for name in UNTRACED_SERVICES)))
        self.provider = provider
        self._server = aio_server_interceptor(tracer_provider=provider, filter_=traced)  # type: ignore[no-untyped-call]
        self._client = aio_client_interceptors(tracer_provider=provider, filter_=traced)  # type: ignore[no-untyped-call]

    def server_interceptors(self) -> list[Any]:
        """For ``grpc.aio.server(interceptors=...)``, ahead of the error interceptor: the span covers the call as
        the caller sees it, its status included."""
        return [self._server]

    def client_interceptors(self) -> list[Any]:
        """For ``grpc.aio.insecure_channel(interceptors=...)``: a span per call, its context sent along."""
        return list(self._client)

    def shutdown(self) -> None:
        """Export what is still buffered, then stop (at the end of the process)."""
        self.provider.shutdown()


_active: Tracing | None = None


def service_resource(service_label: str) -> Any:
    """The ``Resource`` of this process: ``OTEL_RESOURCE_ATTRIBUTES`` / ``OTEL_SERVICE_NAME`` when set, with
    ``service.name`` defaulting to ``trellisbox-<label>``."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()  # reads the OTEL_* variables
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"trellisbox-{service_label}"}))
    return resource


def start(settings: ServiceSettings, service_label: str, *, exporter: SpanExporter | None = None) -> Tracing:
    """Turn tracing on for this process (once, before the server starts) and return it.

    Args:
        settings: The service's settings (``otlp_endpoint``).
        service_label: "gateway", "refiner", "trellis": the default service name.
        exporter: Export there instead of OTLP (tests).
    """
    global _active
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # endpoint None: the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else localhost:4317.
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint or None)
    provider = TracerProvider(resource=service_resource(service_label))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _active = Tracing(provider)
    endpoint = (settings.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4317")
    _log.info("tracing on: OTLP to %s as %s", endpoint, provider.resource.attributes.get("service.name"))
    return _active


def stop() -> None:
    """Flush and stop tracing, if it is on (at the end of the process)."""
    global _active
    if _active is not None:
        _active.shutdown()
        _active = None


def active() -> Tracing | None:
    """This process's tracing, or None when it is off."""
    return _active


def server_interceptors() -> list[Any]:
    """The tracing server interceptors, none when tracing is off."""
    return _active.server_interceptors() if _active is not None else []


def client_interceptors() -> list[Any] | None:
    """The tracing client interceptors for a channel, None (no interceptors at all) when tracing is off."""
    return _active.client_interceptors() if _active is not None else None


def tag_request(request_id: str) -> None:
    """Put the request id on the current call's span (nothing when tracing is off)."""
    if _active is not None:
        from opentelemetry import trace

        trace.get_current_span().set_attribute(REQUEST_ID_ATTRIBUTE, request_id)


def current_ids() -> tuple[str, str] | None:
    """The current (trace id, span id) in hex, or None outside a traced call: for log lines."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)
