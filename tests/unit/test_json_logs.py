"""``--log-format json``: one JSON object per line, with the service, the request id and the stage, for log
pipelines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.images import png_bytes
from tools.stack import start_service
from trellisbox._domain.contract import REFINER_SERVICE
from trellisbox._domain.kinds import Stage
from trellisbox._runtime.observability import REQUEST_ID, STAGE, configure_logging
from trellisbox._runtime.worker import Finished, JobContext, ModelWorker
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


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("stage-test", "INFO", "json")
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_jobs_lines_name_the_stage_it_is_in(json_log: io.StringIO) -> None:
    """Queued until the job reports a stage, then that stage; the caller's own lines and the model thread's later
    work (a warm-up that reported stages included) are outside any stage."""
    log = logging.getLogger("stage-test")
    worker = ModelWorker("stage-test", max_queue=2)

    def job(ctx: JobContext) -> None:
        log.info("waiting for the GPU")
        ctx.report(Stage.SLAT, 1, 2)
        log.info("sampling")

    async def run() -> None:
        REQUEST_ID.set("stages-1")
        async for event in worker.run(job, request_id="stages-1"):
            if isinstance(event, Finished):
                log.info("done")

    def warm_up() -> None:
        JobContext("warm-up", None, lambda event: None).report(Stage.EXPORT, 1, 1)

    try:
        worker.call_blocking(warm_up)
        asyncio.run(run())
        worker.call_blocking(lambda: log.info("after the jobs"))
    finally:
        worker.shutdown()
    entries = {entry["message"]: entry for entry in map(json.loads, json_log.getvalue().splitlines())}
    assert entries["waiting for the GPU"]["stage"] == Stage.QUEUED.label == "queued"
    assert entries["sampling"]["stage"] == "slat"
    assert entries["sampling"]["request_id"] == entries["done"]["request_id"] == "stages-1"
    assert entries["done"]["stage"] == "-"  # the caller's context: the job's stages stay in the job
    assert entries["after the jobs"]["stage"] == "-"
    assert STAGE.get() == "-"
