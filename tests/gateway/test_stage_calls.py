"""How the gateway ends a stage call: at the stage's ``done``, without waiting for its trailing status, and without
cancelling it. A scripted TRELLIS stage (a real gRPC server on loopback) holds its call open after ``done`` until the
test lets it go."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.images import png_bytes
from tools.stack import ServiceProcess, free_port, start_service
from trellisbox._domain.artifacts import Artifact
from trellisbox._domain.contract import GATEWAY_SERVICE, TRELLIS_SERVICE
from trellisbox.client import TrellisBoxClient
from trellisbox.v1 import common_pb2, trellis_pb2, trellis_pb2_grpc

pytestmark = pytest.mark.integration

GLB = b"glTF" + bytes(range(256)) * 40


@dataclass
class HeldStage(trellis_pb2_grpc.TrellisServiceServicer):
    """Sends progress, a GLB and ``done``, then holds the call until ``release`` is set (at most 30 s), and ends it
    with ``final_code``."""

    final_code: grpc.StatusCode = grpc.StatusCode.OK
    release: threading.Event = field(default_factory=threading.Event)
    done_sent: threading.Event = field(default_factory=threading.Event)
    active_after_done: list[bool] = field(default_factory=list)

    def ImageTo3D(self, request: trellis_pb2.ImageTo3DRequest, context: grpc.ServicerContext
                  ) -> Iterator[trellis_pb2.ImageTo3DResponse]:
        yield trellis_pb2.ImageTo3DResponse(progress=common_pb2.Progress(stage=common_pb2.STAGE_EXPORT, step=1,
                                                                         total=1))
        for frame in Artifact(common_pb2.ARTIFACT_KIND_GLB, GLB).frames():
            yield trellis_pb2.ImageTo3DResponse.FromString(frame)
        yield trellis_pb2.ImageTo3DResponse(done=trellis_pb2.ImageTo3DDone(seed=5, backend="held", device="none"))
        self.done_sent.set()
        self.release.wait(30)
        self.active_after_done.append(context.is_active())  # False: the gateway cancelled the call
        if self.final_code != grpc.StatusCode.OK:
            context.abort(self.final_code, "failed after done")

    def RefineGaussians(self, request: trellis_pb2.RefineGaussiansRequest, context: grpc.ServicerContext
                        ) -> Iterator[trellis_pb2.RefineGaussiansResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        yield from ()


def _serve(stage: HeldStage) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trellis_pb2_grpc.add_TrellisServiceServicer_to_server(stage, server)
    health_servicer = health.HealthServicer()
    health_servicer.set(TRELLIS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _gateway(trellis: str, log_dir: Path, metrics_port: int = 0) -> ServiceProcess:
    process = start_service("gateway", "gateway", [
        "--trellis-target", trellis, "--refiner-target", f"127.0.0.1:{free_port()}", "--stage-retries", "1",
        "--metrics-port", str(metrics_port),
    ], log_dir)
    process.wait_ready(GATEWAY_SERVICE, 60)
    return process


def _held_bytes(metrics_port: int) -> float:
    """The gateway's byte budget in use (``trellisbox_gateway_held_request_bytes``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:  # nosec B310
        text = response.read().decode()
    (line,) = [line for line in text.splitlines() if line.startswith("trellisbox_gateway_held_request_bytes ")]
    return float(line.split()[1])


def _generate(target: str) -> Any:
    with TrellisBoxClient(target, timeout=30) as client:
        return client.generate([png_bytes()], formats=["glb"])


def test_the_caller_gets_its_result_while_the_stage_call_is_still_ending(tmp_path: Path) -> None:
    stage = HeldStage()
    server, target = _serve(stage)
    metrics_port = free_port()
    gateway = _gateway(target, tmp_path, metrics_port)
    try:
        result = _generate(gateway.target)  # would wait out the stage's 30 s hold if the gateway waited for its end
        still_held = not stage.release.is_set() and stage.done_sent.is_set() and not stage.active_after_done
        # The stage request is still in memory while its call ends: the request's bytes stay in the byte budget.
        held_meanwhile = _held_bytes(metrics_port)
        stage.release.set()
        assert result.glb == GLB and result.generation_seed == 5
        assert still_held, "the gateway's call ended only after the stage's"
        assert held_meanwhile > 0, "the byte budget let the request go while its stage call had not ended"
        for _ in range(100):  # the stage's handler returns once released, then the budget is given back (bounded)
            if stage.active_after_done and _held_bytes(metrics_port) == 0:
                break
            time.sleep(0.05)
        assert stage.active_after_done == [True], "the gateway cancelled a stage call that had sent done"
        assert _held_bytes(metrics_port) == 0
    finally:
        stage.release.set()
        gateway.stop()
        server.stop(0)


def test_a_stage_that_fails_after_done_is_logged_and_the_result_stands(tmp_path: Path) -> None:
    stage = HeldStage(final_code=grpc.StatusCode.INTERNAL)
    stage.release.set()
    server, target = _serve(stage)
    gateway = _gateway(target, tmp_path)
    try:
        result = _generate(gateway.target)
        assert result.glb == GLB
        line = "the trellis call ended with INTERNAL after its done event: failed after done"
        for _ in range(100):  # the warning comes from the background task that awaits the status (bounded)
            if line in gateway.log_tail(50):
                break
            time.sleep(0.05)
        assert line in gateway.log_tail(50)
    finally:
        gateway.stop()
        server.stop(0)
