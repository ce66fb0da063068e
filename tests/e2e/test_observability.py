"""What an operator sees of one request through the three real services: traces, metrics and JSON logs.

One stack (classic refiner, preview TRELLIS, both time-sharing a simulated GPU under a flock lease) runs with
tracing on, exporting over OTLP/gRPC to a collector this test serves on loopback, with /metrics on every
service and JSON logs. One client call (refine, then 3D) goes through it; then:

- traces: the spans of the three processes form one trace, gateway → refiner and gateway → TRELLIS, each
  server span the child of the gateway's client span for that call, the request id on every server span;
- metrics: each service's /metrics, scraped over loopback, counts the call by status, its stage latencies, and
  (model services) the lease waits and holds;
- logs: every line of every service is one JSON object with the service, request id and stage; the lines
  about the request carry its trace id, the others none (the stage of a job's lines: tests/unit/test_json_logs.py).
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.images import encode, rgba_object
from tools.stack import LocalStack, free_port
from trellisbox.client import TrellisBoxClient

pytestmark = pytest.mark.integration

REQUEST_ID = "observe-1"
SERVICES = ("gateway", "refiner", "trellis")


@dataclass
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                    with self._lock:
                        self.spans.append(Span(resource["service.name"], span.name, span.kind, span.trace_id.hex(),
                                               span.span_id.hex(), span.parent_span_id.hex(), attributes))
        return trace_service_pb2.ExportTraceServiceResponse()


@dataclass
class Observed:
    spans: list[Span]
    metrics: dict[str, str]
    logs: dict[str, list[dict[str, Any]]]
    request_id: str = field(default=REQUEST_ID)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("observability")
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    metrics_ports = {name: free_port() for name in SERVICES}
    shared = ["--placement", "shared", "--lease-backend", "flock", "--lease-dir", str(tmp / "lease")]

    def args(name: str) -> list[str]:
        return ["--otlp-endpoint", f"http://127.0.0.1:{otlp_port}", "--log-format", "json",
                "--metrics-port", str(metrics_ports[name])]

    stack = LocalStack(tmp / "logs", refiner_args=["--backend", "classic", *shared, *args("refiner")],
                       trellis_args=["--backend", "preview", *shared, *args("trellis")],
                       gateway_args=args("gateway"), ready_timeout=120)
    try:
        with stack:
            with TrellisBoxClient(stack.gateway_target, timeout=120) as client:
                result = client.generate([encode(rgba_object(96))], refine=True, request_id=REQUEST_ID,
                                         formats=["glb"])
            assert result.request_id == REQUEST_ID
            metrics = {name: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
                       for name, port in metrics_ports.items()}
        # The services flush their spans when they stop; the stack has stopped them all by now.
        logs = {name: [json.loads(line) for line in (tmp / "logs" / f"{name}.log").read_text().splitlines()
                       if line.strip()] for name in SERVICES}
        yield Observed(list(collector.spans), metrics, logs)
    finally:
        server.stop(None)


def _span(spans: list[Span], service: str, name: str, kind: int) -> Span:
    found = [span for span in spans if span.service == f"trellisbox-{service}" and span.name == name
             and span.kind == kind]
    assert len(found) == 1, (service, name, [(s.service, s.name, s.kind) for s in spans])
    return found[0]


SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


def test_one_request_is_one_trace_across_the_three_services(observed: Observed) -> None:
    spans = observed.spans
    assert len({span.trace_id for span in spans}) == 1, "more than one trace (or none)"
    generate = _span(spans, "gateway", "/trellisbox.v1.GatewayService/Generate", SERVER)
    refine_call = _span(spans, "gateway", "/trellisbox.v1.RefinerService/Refine", CLIENT)
    image_to_3d_call = _span(spans, "gateway", "/trellisbox.v1.TrellisService/ImageTo3D", CLIENT)
    refine = _span(spans, "refiner", "/trellisbox.v1.RefinerService/Refine", SERVER)
    image_to_3d = _span(spans, "trellis", "/trellisbox.v1.TrellisService/ImageTo3D", SERVER)
    assert len(spans) == 5, [(s.service, s.name) for s in spans]  # probes and health checks make none
    assert generate.parent_id == ""  # the client sent no trace context: the trace starts at the gateway
    assert refine_call.parent_id == image_to_3d_call.parent_id == generate.span_id
    assert refine.parent_id == refine_call.span_id  # propagated in the gRPC metadata
    assert image_to_3d.parent_id == image_to_3d_call.span_id
    for span in (generate, refine, image_to_3d):
        assert span.attributes["trellisbox.request_id"] == REQUEST_ID
        assert span.attributes["rpc.grpc.status_code"] == 0


def _sample(metrics: str, line_start: str) -> float:
    found = [line for line in metrics.splitlines() if line.startswith(line_start + " ")]
    assert len(found) == 1, f"no sample {line_start}"
    return float(found[0].rpartition(" ")[2])


def test_metrics_count_the_call_its_stages_and_the_lease(observed: Observed) -> None:
    gateway, refiner, trellis = (observed.metrics[name] for name in SERVICES)
    assert _sample(gateway, 'trellisbox_requests_total{code="OK",method="Generate",service="GatewayService"}') == 1
    assert _sample(refiner, 'trellisbox_requests_total{code="OK",method="Refine",service="RefinerService"}') == 1
    assert _sample(trellis, 'trellisbox_requests_total{code="OK",method="ImageTo3D",service="TrellisService"}') == 1
    for stage in ("queued", "refine", "preprocess", "export"):
        assert _sample(gateway, f'trellisbox_stage_seconds_count{{service="gateway",stage="{stage}"}}') == 1
    assert _sample(refiner, 'trellisbox_stage_seconds_count{service="refiner",stage="refine"}') == 1
    assert _sample(trellis, 'trellisbox_stage_seconds_count{service="trellis",stage="export"}') == 1
    # Idle again: nothing waiting or running, at the gateway or in the model services.
    assert _sample(gateway, 'trellisbox_queue_depth{service="gateway"}') == 0
    assert _sample(gateway, 'trellisbox_in_flight{service="gateway"}') == 0
    for name, text in (("refiner", refiner), ("trellis", trellis)):
        assert _sample(text, f'trellisbox_queue_depth{{service="{name}"}}') == 0
        assert _sample(text, f'trellisbox_in_flight{{service="{name}"}}') == 0
        assert _sample(text, f'trellisbox_requests_outstanding{{service="{name}"}}') == 0
        # Two GPU turns each: the warm-up's and the request's (each released once its queue was empty).
        assert _sample(text, f'trellisbox_gpu_lease_wait_seconds_count{{service="{name}"}}') == 2
        assert _sample(text, f'trellisbox_gpu_lease_hold_seconds_count{{service="{name}"}}') == 2
        assert _sample(text, f'trellisbox_gpu_lease_held{{gpu="gpu-0",service="{name}"}}') == 0


def test_json_logs_carry_service_request_stage_and_the_trace_id(observed: Observed) -> None:
    trace_id = observed.spans[0].trace_id
    for name, entries in observed.logs.items():
        assert entries, f"{name} wrote no log"
        assert all(entry["service"] == name and {"time", "level", "request_id", "stage", "message"} <= entry.keys()
                   for entry in entries)
        about = [entry for entry in entries if entry["request_id"] == REQUEST_ID]
        assert about, f"{name} logged nothing about {REQUEST_ID}"
        assert {entry.get("trace_id") for entry in about} == {trace_id}, about
        outside = [entry for entry in entries if entry["request_id"] == "-"]
        assert outside and all("trace_id" not in entry for entry in outside)  # startup, shutdown
