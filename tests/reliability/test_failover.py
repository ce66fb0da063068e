"""A refiner replica killed mid-refinement: the gateway retries the stage on the other replica, with the same
seeds, says so in a progress message, and the request completes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.images import png_bytes
from tools.stack import ServiceProcess, start_service
from trellisbox._domain.contract import GATEWAY_SERVICE, REFINER_SERVICE, TRELLIS_SERVICE
from trellisbox.client import TrellisBoxClient, build_request
from trellisbox.v1 import common_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
def two_refiners(tmp_path: Path) -> Iterator[dict[str, ServiceProcess]]:
    # 4 s per image in 6 slices: a refinement streams progress for seconds, time to kill its replica mid-way.
    refiner_args = ["--backend", "fixed-latency", "--fixed-latency-ms", "4000"]
    processes: dict[str, ServiceProcess] = {}
    try:
        for name in ("refiner-a", "refiner-b"):
            processes[name] = start_service(name, "refiner_service", refiner_args, tmp_path)
        processes["trellis"] = start_service("trellis", "trellis_service", ["--backend", "preview"], tmp_path)
        for name in ("refiner-a", "refiner-b"):
            processes[name].wait_ready(REFINER_SERVICE, 60)
        processes["trellis"].wait_ready(TRELLIS_SERVICE, 120)
        pool = "ipv4:" + ",".join(processes[n].target for n in ("refiner-a", "refiner-b"))
        processes["gateway"] = start_service("gateway", "gateway", [
            "--refiner-target", pool, "--trellis-target", processes["trellis"].target], tmp_path)
        processes["gateway"].wait_ready(GATEWAY_SERVICE, 60)
        yield processes
    finally:
        for process in processes.values():
            process.stop()


def test_a_replica_killed_mid_refinement_is_replaced(two_refiners: dict[str, ServiceProcess],
                                                     record: Callable[[str, Any], None]) -> None:
    request = build_request([png_bytes(64)], refine=True, refine_params={"seed": 77}, generation={"seed": 5},
                            formats=["glb", "refined"], request_id="failover-1")
    messages: list[str] = []
    killed = ""
    with grpc.insecure_channel(two_refiners["gateway"].target) as channel:
        responses = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(request, timeout=120)

        def watch() -> Iterator[object]:
            nonlocal killed
            for response in responses:
                if response.WhichOneof("event") == "progress":
                    messages.append(response.progress.message)
                    if not killed and response.progress.stage == common_pb2.STAGE_REFINE:
                        # The replica that took the request has it in its log: kill it mid-refinement.
                        killed = next(n for n in ("refiner-a", "refiner-b")
                                      if "failover-1" in two_refiners[n].log_tail(200))
                        two_refiners[killed].kill()
                yield response

        started = time.monotonic()
        result = TrellisBoxClient.collect(watch())  # type: ignore[arg-type]
    assert killed, "the refinement never reported progress"
    survivor = "refiner-b" if killed == "refiner-a" else "refiner-a"
    assert "failover-1" in two_refiners[survivor].log_tail(400)
    assert any("refiner: " in m and "retrying on another replica (attempt 2 of 3)" in m for m in messages), messages
    assert result.refine_seeds == [77] and result.generation_seed == 5  # the same seeds: the same result
    assert result.glb and result.refined_images, "the request completed with its artifacts"
    assert time.monotonic() - started < 60
    record("refiner replica killed mid-refinement", {"completed": True, "same_seeds": True,
                                                     "seconds": round(time.monotonic() - started, 1)})
