"""Configuration as validated typed objects: the one loader for every service.

Each service declares a subclass of :class:`ServiceSettings` with its own environment prefix
(``TRELLISBOX_GATEWAY_``, ``TRELLISBOX_REFINER_``, ``TRELLISBOX_TRELLIS_``). Values come from, in order of
precedence: command-line flags, environment variables, an optional ``.env`` file, then defaults.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from trellisbox._domain.imaging import ImageLimits
from trellisbox._runtime.observability import LogFormat


class ServiceSettings(BaseSettings):
    """Settings every gRPC service shares."""

    model_config = SettingsConfigDict(extra="forbid", cli_kebab_case=True, cli_implicit_flags=True)

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 or [::] in a container.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it.")
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: LogFormat = Field(
        "plain", description="plain: one readable line per record (for a terminal); json: one JSON object per line "
        "with time, level, service, request_id, stage, logger, message (and trace_id, span_id when tracing)."
    )
    tracing: bool = Field(
        False, description="Export OpenTelemetry traces over OTLP/gRPC: one trace per request across the gateway, "
        "refiner and TRELLIS (trace context in the gRPC metadata), the request id as the span attribute "
        "trellisbox.request_id, the trace id in every log line written inside a call. Off: no tracing code runs. The "
        "standard OTEL_* variables apply (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME, "
        "OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_BSP_*, ...)."
    )
    otlp_endpoint: str = Field(
        "", description="Where tracing sends spans (OTLP/gRPC), e.g. http://otel-collector:4317 (http: plaintext, "
        "https: TLS); setting it turns tracing on. Empty: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4317."
    )
    max_request_bytes: int = Field(64 * 2**20, ge=2**20, description="Largest accepted request message.")
    max_image_bytes: int = Field(32 * 2**20, ge=1024, description="Largest accepted encoded image.")
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, description="Largest accepted width × height.")
    max_images: int = Field(8, ge=1, le=64, description="Most images in one request.")
    max_queue: int = Field(16, ge=0, description="Requests that may wait; more get RESOURCE_EXHAUSTED.")
    max_concurrent_rpcs: int = Field(
        128, ge=4, description="Calls this server handles at once (health checks included); one more is refused by "
        "gRPC with RESOURCE_EXHAUSTED before its request is read, which bounds the memory uploads in flight can take."
    )
    chunk_bytes: int = Field(2**20, ge=16 * 1024, le=3 * 2**20, description="Artifact chunk size.")
    max_connection_age_s: float = Field(
        300.0, ge=0, description="Close client connections after this long so clients re-resolve DNS (and find new "
        "replicas); calls in flight on a closing connection go on, up to longest_call_s."
    )
    longest_call_s: float = Field(
        3600.0, gt=0, description="The longest call this server lets run on a connection that is closing because of "
        "max_connection_age_s (gRPC's connection age grace): new calls go to a new connection, long jobs are not cut."
    )
    grace_s: float = Field(10.0, ge=0, description="How long a draining server (SIGTERM) lets calls finish.")

    @property
    def traced(self) -> bool:
        """Whether this service exports traces: ``tracing`` on, or an ``otlp_endpoint`` given."""
        return self.tracing or bool(self.otlp_endpoint)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S], argv: list[str] | None = None) -> S:
    """Build ``cls`` from flags (``argv``, e.g. ``["--port", "50052"]``), environment and defaults."""
    return cls(_cli_parse_args=argv if argv is not None else [])  # type: ignore[call-arg]
