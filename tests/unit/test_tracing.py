"""Tracing in one process, with an in-memory exporter: a front server whose call makes two calls to a back server,
both with the bootstrap's interceptors (tracing's, then the error interceptor) and the tracing client interceptors,
as the gateway calls its stages. One call must give one connected trace: the front's server span, a client span
per downstream call under it, the back's server spans under those; the request id on the server spans, the
status on the span of a failed call, no spans for health checks, and the trace id in the log lines.

Across the three real services, with the OTLP exporter: tests/e2e/test_observability.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from trellisbox._domain.errors import InvalidInput
from trellisbox._runtime import tracing
from trellisbox._runtime.config import ServiceSettings
from trellisbox._runtime.interceptor import ErrorInterceptor
from trellisbox._runtime.observability import LogFormat, configure_logging
from trellisbox._runtime.servicing import bind_request_id

_log = logging.getLogger("tracing-test")
FRONT, BACK = "test.Front", "test.Back"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.start(ServiceSettings(tracing=True), "test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.stop()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    active = tracing.active()
    assert active is not None
    active.provider.force_flush()
    return list(exporter.get_finished_spans())


async def _server(register: Any) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[*tracing.server_interceptors(), ErrorInterceptor()])
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _run_chain(front_request: bytes) -> list[bytes]:
    """Start back and front; call the front once (untraced caller); return its replies."""

    async def work(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        bind_request_id(request.decode().partition(":")[0])
        _log.info("back works on %s", request.decode())
        if request.endswith(b":fail"):
            raise InvalidInput("the back refuses this one")
        return b"done " + request

    back_health = health_aio.HealthServicer()

    def register_back(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            BACK, {"Work": grpc.unary_unary_rpc_method_handler(work)}),))
        health_pb2_grpc.add_HealthServicer_to_server(back_health, server)

    back, back_target = await _server(register_back)
    channel = grpc.aio.insecure_channel(back_target, interceptors=tracing.client_interceptors())

    async def call(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        request_id = bind_request_id(request.decode())
        _log.info("front calls the back twice")
        stub = channel.unary_unary(f"/{BACK}/Work", None, None)
        yield await stub(f"{request_id}:first".encode(), timeout=10)
        try:
            await stub(f"{request_id}:fail".encode(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            yield exc.code().name.encode()

    def register_front(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            FRONT, {"Call": grpc.unary_stream_rpc_method_handler(call)}),))

    front, front_target = await _server(register_front)
    try:
        async with grpc.aio.insecure_channel(front_target) as client:
            front_call = client.unary_stream(f"/{FRONT}/Call", None, None)
            replies = [reply async for reply in front_call(front_request, timeout=10)]
            await health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(back_target)).Check(
                health_pb2.HealthCheckRequest(), timeout=10)  # a probe: no span
        return replies
    finally:
        await channel.close(None)
        await front.stop(None)
        await back.stop(None)


def _one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name and span.kind == kind]


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_one_call_is_one_connected_trace(exporter: InMemorySpanExporter, log_stream: io.StringIO,
                                         fmt: LogFormat) -> None:
    configure_logging("test", "INFO", fmt, trace_ids=tracing.current_ids)
    logging.getLogger().handlers[0].setStream(log_stream)  # type: ignore[attr-defined]
    replies = asyncio.run(_run_chain(b"req-7"))
    assert replies == [b"done req-7:first", b"INVALID_ARGUMENT"]

    spans = _finished(exporter)
    assert len(spans) == 5, [(span.name, span.kind) for span in spans]  # no span for the health check
    assert len({span.context.trace_id for span in spans}) == 1
    (front,) = _one(spans, f"/{FRONT}/Call", SpanKind.SERVER)
    assert front.parent is None  # the caller sent no trace context: the trace starts here
    clients = _one(spans, f"/{BACK}/Work", SpanKind.CLIENT)
    backs = _one(spans, f"/{BACK}/Work", SpanKind.SERVER)
    assert len(clients) == len(backs) == 2
    assert all(client.parent is not None and client.parent.span_id == front.context.span_id for client in clients)
    # Each back span is the child of its own client span (propagated in the call's metadata).
    assert sorted(back.parent.span_id for back in backs if back.parent) == sorted(c.context.span_id for c in clients)
    for span in (front, *backs):
        assert span.attributes is not None and span.attributes[tracing.REQUEST_ID_ATTRIBUTE] == "req-7"
    # The failed call: its code on the server span (a caller's error, so not an error of the server's, as the
    # semantic conventions have it), an error with the message on the caller's span.
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert sorted(int(str((back.attributes or {})["rpc.grpc.status_code"])) for back in backs) == [0, invalid]
    (failed,) = [client for client in clients if client.status.status_code == StatusCode.ERROR]
    assert failed.attributes is not None and failed.attributes["rpc.grpc.status_code"] == invalid
    assert failed.status.description == "the back refuses this one"

    trace_id = f"{front.context.trace_id:032x}"
    lines = [line for line in log_stream.getvalue().splitlines() if "works on" in line or "calls the back" in line]
    assert len(lines) == 3, log_stream.getvalue()
    if fmt == "plain":
        assert all(f"[req-7 trace={trace_id}]" in line for line in lines), lines
    else:
        entries = [json.loads(line) for line in lines]
        assert {entry["trace_id"] for entry in entries} == {trace_id}
        # The span id is the span the line was written in: the front's call, or the back's.
        assert {entry["span_id"] for entry in entries} == {
            f"{span.context.span_id:016x}" for span in (front, *backs)}
        assert all(entry["request_id"] == "req-7" and entry["stage"] == "-" for entry in entries)


def test_lines_outside_a_call_carry_no_trace_id(exporter: InMemorySpanExporter, log_stream: io.StringIO) -> None:
    configure_logging("test", "INFO", "json", trace_ids=tracing.current_ids)
    logging.getLogger().handlers[0].setStream(log_stream)  # type: ignore[attr-defined]
    _log.info("starting")
    entry = json.loads(log_stream.getvalue())
    assert "trace_id" not in entry and entry["request_id"] == "-"


def test_tracing_off_installs_and_imports_nothing() -> None:
    """Off (the default): no interceptor on the servers or the stage channels, OpenTelemetry never imported, so a
    call costs what it cost before tracing existed."""
    probe = (
        "import sys\n"
        "from gateway.config import GatewaySettings\n"
        "from gateway.stages import StageClients\n"
        "import refiner_service.__main__, trellis_service.__main__\n"
        "from trellisbox._runtime import tracing\n"
        "settings = GatewaySettings()\n"
        "assert not settings.traced\n"
        "assert tracing.server_interceptors() == [] and tracing.client_interceptors() is None\n"
        "loaded = sorted(name for name in sys.modules if name.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_otlp_endpoint_turns_tracing_on() -> None:
    assert not ServiceSettings().traced
    assert ServiceSettings(tracing=True).traced
    assert ServiceSettings(otlp_endpoint="http://collector:4317").traced


def test_the_service_name_defaults_to_the_service_and_yields_to_otel_variables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert tracing.service_resource("refiner").attributes["service.name"] == "trellisbox-refiner"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging")
    resource = tracing.service_resource("refiner")
    assert resource.attributes["service.name"] == "trellisbox-refiner"
    assert resource.attributes["deployment.environment"] == "staging"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "refiner-eu")
    assert tracing.service_resource("refiner").attributes["service.name"] == "refiner-eu"
