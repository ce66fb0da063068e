"""The gateway process on its own: validation happens before any stage is called."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from tests.images import huge_png_header, png_bytes, truncated_png
from tools.stack import ServiceProcess, free_port, health_status, start_service
from trellisbox._domain.contract import GATEWAY_SERVICE, REFINER_SERVICE
from trellisbox.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, refiner_pb2, refiner_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    process = start_service(
        "gateway", "gateway", ["--refiner-target", dead, "--trellis-target", dead, "--stage-retries", "1",
                               "--log-format", "json"],
        tmp_path_factory.mktemp("gateway"),
    )
    try:
        process.wait_ready("", 60)  # alive; never ready: no stage can be reached
        yield process
    finally:
        process.stop()


def _call(target: str, request: gateway_pb2.GenerateRequest) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, timeout=30))
    return info.value


def _image(data: bytes, media_type: str = "") -> common_pb2.Image:
    return common_pb2.Image(data=data, media_type=media_type)


@pytest.mark.parametrize(
    "request_fields,message",
    [
        ({"images": [_image(b"this is not an image")]}, "images[0] is not a PNG, JPEG or WebP image"),
        ({"images": [_image(png_bytes()), _image(truncated_png())]}, "images[1] is truncated or corrupt"),
        ({"images": [_image(huge_png_header())]},
         "images[0] is 30000×30000 = 900,000,000 pixels; the limit is 16,777,216 (4096×4096)"),
        ({"images": []}, "no images: send at least one PNG, JPEG or WebP image"),
        ({"images": [_image(png_bytes())], "refine": True,
          "refine_parameters": common_pb2.RefineParameters(strength=7)}, "strength must be in (0.0, 1.0], got 7"),
        # Checked with refinement off too: the value is a mistake whether or not it is used.
        ({"images": [_image(png_bytes())], "refine_parameters": common_pb2.RefineParameters(strength=float("nan"))},
         "refine_parameters.strength must be in (0.0, 1.0], got nan"),
        ({"images": [_image(png_bytes())], "generation": common_pb2.GenerationParameters(texture_size=10)},
         "texture_size must be in [256, 4096], got 10"),
        ({"images": [_image(png_bytes())], "formats": [common_pb2.ARTIFACT_KIND_REFINED_IMAGE]},
         "ARTIFACT_KIND_REFINED_IMAGE was requested but refine is false"),
        ({"images": [_image(png_bytes())] * 9}, "9 images sent; at most 8 per request"),
    ],
)
def test_bad_input_is_invalid_argument_and_the_gateway_stays_up(
    gateway: ServiceProcess, request_fields: dict[str, object], message: str
) -> None:
    error = _call(gateway.target, gateway_pb2.GenerateRequest(**request_fields))  # type: ignore[arg-type]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert message in (error.details() or "")  # type: ignore[attr-defined]
    assert health_status(gateway.target, "") == health_pb2.HealthCheckResponse.SERVING  # still up


def test_readiness_says_the_stages_cannot_be_reached(gateway: ServiceProcess) -> None:
    assert health_status(gateway.target, GATEWAY_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "no ready replica of refiner and trellis" in gateway.log_tail(200)


def test_a_target_that_cannot_work_stops_the_gateway_at_start(tmp_path: Path) -> None:
    process = start_service("gateway-misconfigured", "gateway",
                            ["--refiner-target", "dns:///127.0.0.1:50052,127.0.0.1:50062"], tmp_path)
    try:
        assert process.process.wait(60) != 0
        log = process.log_tail(40)
        assert "--refiner-target / TRELLISBOX_GATEWAY_REFINER_TARGET" in log, log
        assert "for several fixed addresses use ipv4:" in log and "Traceback" not in log, log
    finally:
        process.stop()


def test_unreachable_stage_is_unavailable_and_named(gateway: ServiceProcess) -> None:
    error = _call(gateway.target, gateway_pb2.GenerateRequest(images=[_image(png_bytes())], refine=True))
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert error.details().startswith("refiner:")  # type: ignore[attr-defined]
    error = _call(gateway.target, gateway_pb2.GenerateRequest(images=[_image(png_bytes())]))
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert error.details().startswith("trellis:")  # type: ignore[attr-defined]
    # The JSON log line of each failure names the stage the request failed in.
    entries = [json.loads(line) for line in gateway.log_tail(400).splitlines() if line.strip()]
    stages = [(entry["message"].partition(": ")[2].partition(":")[0], entry["stage"]) for entry in entries
              if "ended with UNAVAILABLE" in entry["message"]]
    assert stages[-2:] == [("refiner", "refine"), ("trellis", "image_to_3d")], entries


def test_oversized_request_message_is_refused_by_the_transport(tmp_path: Path, gateway: ServiceProcess) -> None:
    big = _image(b"\x89PNG" + bytes(70 * 2**20))
    with grpc.insecure_channel(gateway.target, options=[("grpc.max_send_message_length", 80 * 2**20)]) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(gateway_pb2.GenerateRequest(images=[big]), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


class _AlwaysUnavailable(refiner_pb2_grpc.RefinerServiceServicer):
    """A refiner replica that is ready by its health check and answers every call UNAVAILABLE; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def Refine(self, request: refiner_pb2.RefineRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self.calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        yield from ()


def test_a_stage_call_is_tried_stage_retries_times_in_all(tmp_path: Path) -> None:
    """The router is the only layer that retries a stage call: --stage-retries 3 is 3 calls, not 3 × the channel's
    own retry policy (which made it 9)."""
    refiner = _AlwaysUnavailable()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    refiner_pb2_grpc.add_RefinerServiceServicer_to_server(refiner, server)
    health = HealthServicer()
    health.set(REFINER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    process = start_service("gateway-retries", "gateway", ["--refiner-target", f"127.0.0.1:{port}",
                                                           "--trellis-target", f"127.0.0.1:{free_port()}",
                                                           "--stage-retries", "3"], tmp_path)
    try:
        process.wait_ready("", 60)
        error = _call(process.target, gateway_pb2.GenerateRequest(images=[_image(png_bytes())], refine=True))
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert error.details().startswith("refiner: ")  # type: ignore[attr-defined]
        assert refiner.calls == 3
    finally:
        process.stop()
        server.stop(None)
