"""A call longer than the server's connection age finishes: the aging connection is closed for new calls only."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.refiner.refiner_helpers import png_bytes, scene
from tools.stack import start_service
from trellisbox._domain.contract import REFINER_SERVICE
from trellisbox._runtime.config import ServiceSettings
from trellisbox._runtime.server import server_options
from trellisbox.v1 import common_pb2, refiner_pb2, refiner_pb2_grpc


def test_the_connection_age_grace_is_the_longest_call() -> None:
    options = dict(server_options(ServiceSettings(max_connection_age_s=300, longest_call_s=1800, grace_s=10)))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 1_800_000  # not the drain grace


@pytest.mark.integration
def test_a_call_outlives_its_connection_age(tmp_path: Path, record: Callable[[str, Any], None]) -> None:
    # 3 s per image, connections aged out after 1 s: the call runs three times the age.
    service = start_service("refiner", "refiner_service",
                            ["--backend", "fixed-latency", "--fixed-latency-ms", "3000",
                             "--max-connection-age-s", "1"], tmp_path)
    try:
        service.wait_ready(REFINER_SERVICE, 60)
        request = refiner_pb2.RefineRequest(images=[common_pb2.Image(data=png_bytes(scene(32)))],
                                            parameters=common_pb2.RefineParameters(seed=4))
        with grpc.insecure_channel(service.target) as channel:
            stub = refiner_pb2_grpc.RefinerServiceStub(channel)
            started = time.monotonic()
            events = [r.WhichOneof("event") for r in stub.Refine(request, timeout=30)]
            took = time.monotonic() - started
            assert events[-1] == "done" and "chunk" in events
            assert took > 2.5, took  # it really ran past the connection's age
            # The next call on the same channel goes over a new connection and works too.
            again = [r.WhichOneof("event") for r in stub.Refine(request, timeout=30)]
            assert again[-1] == "done"
            record("call past its connection's age", {"connection_age_s": 1, "call_s": round(took, 1),
                                                      "completed": True})
    finally:
        service.stop()
