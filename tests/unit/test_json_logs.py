"""``--log-format json``: one JSON object per line, with the service and the request id, for log pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from tests.images import png_bytes
from tools.stack import start_service
from trellisbox._domain.contract import REFINER_SERVICE
from trellisbox.v1 import common_pb2, refiner_pb2, refiner_pb2_grpc


@pytest.mark.integration
def test_every_log_line_is_a_json_object_naming_service_and_request(tmp_path: Path) -> None:
    service = start_service("refiner", "refiner_service", ["--backend", "classic", "--log-format", "json"], tmp_path)
    try:
        service.wait_ready(REFINER_SERVICE, 60)
        with grpc.insecure_channel(service.target) as channel:
            request = refiner_pb2.RefineRequest(request_id="json-1", images=[common_pb2.Image(data=png_bytes(32))])
            list(refiner_pb2_grpc.RefinerServiceStub(channel).Refine(request, timeout=30))
    finally:
        service.stop()
    lines = [line for line in service.log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line parses
    assert all(entry["service"] == "refiner" and entry["level"] and entry["message"] for entry in entries)
    assert any(entry["request_id"] == "json-1" and "refine" in entry["message"] for entry in entries), lines
