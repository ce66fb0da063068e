"""Configuration as validated typed objects: the one loader for every service.

Each service declares a subclass of :class:`ServiceSettings` with its own environment prefix
(``TRELLISBOX_GATEWAY_``, ``TRELLISBOX_REFINER_``, ``TRELLISBOX_TRELLIS_``). Values come from, in order of
precedence: command-line flags, environment variables, an optional ``.env`` file, then defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn, Self, TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from trellisbox._domain.imaging import ImageLimits
from trellisbox._runtime.observability import LogFormat
from trellisbox._runtime.security import TlsMode, is_loopback

#: The largest response message a service sends: one artifact chunk at the largest ``chunk_bytes`` (3 MiB) with its
#: fields, or a ``done``. Responses are bounded by this, not by ``max_request_bytes``, which may be set lower.
MAX_RESPONSE_BYTES = 4 * 2**20


class ServiceSettings(BaseSettings):
    """Settings every gRPC service shares."""

    model_config = SettingsConfigDict(extra="forbid", cli_kebab_case=True, cli_implicit_flags=True,
                                      cli_hide_none_type=True)

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
    tls: TlsMode | None = Field(
        None, description="The gRPC port's transport. off: plaintext; on: TLS with tls_cert_file and tls_key_file; "
        "mutual: TLS, and clients must present a certificate from tls_client_ca_file. Unset: plaintext, allowed only "
        "when host is a loopback address (the local stack); any other host must choose, so that plaintext is never an "
        "accident. The files are reread when they change (rotation without restart)."
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate (chain) the server presents (tls=on/mutual).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle that client certificates must chain to (tls=mutual)."
    )
    health_port: int = Field(
        0, ge=0, le=65535, description="A second, plaintext port that serves grpc.health.v1 only, for Kubernetes gRPC "
        "probes (the kubelet can neither present a client certificate nor verify the server's); 0: none."
    )

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        if self.tls is None and not is_loopback(self.host):
            variable = f"{self.model_config.get('env_prefix', '')}TLS"
            raise ValueError(f"host {self.host} is reachable from other machines: choose the transport with tls "
                             f"(--tls or {variable}): on or mutual, with tls_cert_file and tls_key_file; or off to "
                             "serve plaintext")
        if self.tls in ("on", "mutual") and (self.tls_cert_file is None or self.tls_key_file is None):
            raise ValueError(f"tls={self.tls} needs tls_cert_file and tls_key_file")
        if self.tls == "mutual" and self.tls_client_ca_file is None:
            raise ValueError("tls=mutual needs tls_client_ca_file (the CA of the clients' certificates)")
        return self

    @property
    def tls_mode(self) -> TlsMode:
        """The transport in effect (unset on a loopback host is plaintext)."""
        return self.tls or "off"

    @property
    def traced(self) -> bool:
        """Whether this service exports traces: ``tracing`` on, or an ``otlp_endpoint`` given."""
        return self.tracing or bool(self.otlp_endpoint)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


S = TypeVar("S", bound=ServiceSettings)


def program_name(cls: type[ServiceSettings]) -> str:
    """How the service of ``cls`` is started: ``python -m gateway`` (its settings live in ``gateway.config``)."""
    return f"python -m {cls.__module__.split('.')[0]}"


def refuse_start(cls: type[ServiceSettings], message: str, status: int = 1) -> NoReturn:
    """End the process before it serves, saying why on stderr in one line (2: a usage error, as argparse exits)."""
    print(f"{program_name(cls)}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def load_settings(cls: type[S], argv: list[str] | None = None) -> S:
    """Build ``cls`` from flags (``argv``, e.g. ``["--port", "50052"]``), environment and defaults.

    Raises:
        pydantic.ValidationError: a value out of range or of the wrong type, or a combination refused
            (``--host 0.0.0.0`` without ``--tls``).
    """
    return cls(_cli_parse_args=argv if argv is not None else [],  # type: ignore[call-arg]
               _cli_prog_name=program_name(cls))


def settings_or_exit(cls: type[S], argv: list[str]) -> S:
    """:func:`load_settings` for a service's entry point: what it refuses ends the process with status 2 and one
    line on stderr, each problem named by its flag and environment variable."""
    try:
        return load_settings(cls, argv)
    except ValidationError as exc:
        refuse_start(cls, "; ".join(_explain(cls, error) for error in exc.errors(include_url=False)), status=2)


def _explain(cls: type[ServiceSettings], error: ErrorDetails) -> str:
    """One problem, named as a user sets it: ``--max-queue / TRELLISBOX_GATEWAY_MAX_QUEUE: ... (got 'abc')``."""
    message = error["msg"].removeprefix("Value error, ")  # a validator's own sentence
    if not error["loc"]:
        return message
    name = "_".join(str(part) for part in error["loc"])
    value = error.get("input")
    shown = f" (got {value!r})" if isinstance(value, (str, int, float)) else ""
    prefix = cls.model_config.get("env_prefix", "")
    return f"--{name.replace('_', '-')} / {prefix}{name.upper()}: {message}{shown}"
