"""A live service's /metrics after real calls: the request counter counts each call by status, the stage
histograms and the queue gauges are there."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest

from tests.images import png_bytes
from tools.stack import free_port, start_service
from trellisbox._domain.contract import REFINER_SERVICE
from trellisbox.v1 import common_pb2, refiner_pb2, refiner_pb2_grpc


@pytest.mark.integration
def test_calls_are_counted_by_status(tmp_path: Path) -> None:
    port = free_port()
    service = start_service("refiner", "refiner_service",
                            ["--backend", "classic", "--metrics-port", str(port)], tmp_path)
    try:
        service.wait_ready(REFINER_SERVICE, 60)
        good = refiner_pb2.RefineRequest(images=[common_pb2.Image(data=png_bytes(32))])
        bad = refiner_pb2.RefineRequest(images=[common_pb2.Image(data=b"not an image")])
        with grpc.insecure_channel(service.target) as channel:
            stub = refiner_pb2_grpc.RefinerServiceStub(channel)
            for _ in range(2):
                list(stub.Refine(good, timeout=30))
            with pytest.raises(grpc.RpcError):
                list(stub.Refine(bad, timeout=30))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        service.stop()
    assert 'trellisbox_requests_total{code="OK",method="Refine",service="RefinerService"} 2.0' in metrics
    assert 'trellisbox_requests_total{code="INVALID_ARGUMENT",method="Refine",service="RefinerService"} 1.0' in metrics
    assert 'trellisbox_stage_seconds_count{service="refiner",stage="refine"} 2.0' in metrics
    assert 'trellisbox_queue_depth{service="refiner"}' in metrics
    assert 'trellisbox_in_flight{service="refiner"}' in metrics
