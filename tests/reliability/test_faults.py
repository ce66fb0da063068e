"""Load and faults against a live stack: a burst of ten times the gateway's capacity loses no admitted
request, and a TRELLIS service killed mid-job fails its caller cleanly."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.images import png_bytes
from tools.stack import LocalStack, free_port, start_service
from trellisbox._domain.contract import GATEWAY_SERVICE, TRELLIS_SERVICE
from trellisbox.client import TrellisBoxClient, build_request
from trellisbox.v1 import common_pb2, gateway_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_CONCURRENT, MAX_QUEUE = 2, 4
CAPACITY = MAX_CONCURRENT + MAX_QUEUE


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("faults"), refiner_args=["--backend", "classic"],
                    trellis_args=["--backend", "preview"],
                    gateway_args=["--max-concurrent", str(MAX_CONCURRENT), "--max-queue", str(MAX_QUEUE)],
                    ready_timeout=180) as running:
        yield running


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("refine", [False, True], ids=["3d-only", "refine-and-3d"])
def test_a_burst_of_ten_times_capacity_loses_nothing_admitted(stack: LocalStack, refine: bool,
                                                             record: Callable[[str, Any], None]) -> None:
    burst = 10 * CAPACITY
    request = build_request([png_bytes(96)], refine=refine, generation={"seed": 1, "texture_size": 256})
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    gateway_pid = stack.processes["gateway"].process.pid
    peak = [rss_mib(gateway_pid)]

    def one() -> None:
        with grpc.insecure_channel(stack.gateway_target) as channel:
            events: list[str] = []
            try:
                for response in gateway_pb2_grpc.GatewayServiceStub(channel).Generate(request, timeout=120):
                    events.append(response.WhichOneof("event") or "")
                outcome = "done" if events and events[-1] == "done" else "incomplete"
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                # A refused request hears nothing else: it may be retried blindly.
                outcome = code.name if not events else f"{code.name} after {len(events)} events"
        with lock:
            outcomes[outcome] += 1

    threads = [threading.Thread(target=one) for _ in range(burst)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak.append(rss_mib(gateway_pid))
        time.sleep(0.05)
    record(f"burst {'refine and 3D' if refine else '3D only'}", {
        "sent": burst, "capacity": CAPACITY, "completed": outcomes["done"], "refused": outcomes["RESOURCE_EXHAUSTED"],
        "lost": burst - outcomes["done"] - outcomes["RESOURCE_EXHAUSTED"], "gateway_peak_rss_mib": round(max(peak))})
    assert set(outcomes) <= {"done", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes["done"] >= CAPACITY and sum(outcomes.values()) == burst, outcomes
    assert max(peak) < 400, f"gateway RSS peaked at {max(peak):.0f} MiB"
    assert stack.processes["gateway"].process.poll() is None


def test_a_trellis_service_killed_mid_job_fails_its_caller_cleanly(tmp_path_factory: pytest.TempPathFactory,
                                                                    record: Callable[[str, Any], None]) -> None:
    # Its own stack: the kill would take the module's TRELLIS service away from the other tests.
    with LocalStack(tmp_path_factory.mktemp("kill-trellis"), refiner_args=["--backend", "classic"],
                    trellis_args=["--backend", "preview"], gateway_args=["--stage-retries", "2"]) as stack:
        request = build_request([png_bytes(512)], generation={"seed": 2, "texture_size": 4096}, formats=["glb", "ply"])
        killed = False
        started = time.monotonic()
        with TrellisBoxClient(stack.gateway_target, timeout=120) as client, pytest.raises(grpc.RpcError) as failure:
            for response in client.stream(request):
                if not killed and response.WhichOneof("event") == "progress" and \
                        response.progress.stage in (common_pb2.STAGE_PREPROCESS, common_pb2.STAGE_EXPORT):
                    stack.processes["trellis"].kill()
                    killed = True
        assert killed
        error = failure.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert (error.details() or "").startswith("trellis:")  # type: ignore[attr-defined]
        assert time.monotonic() - started < 60
        assert stack.processes["gateway"].process.poll() is None, "the gateway outlives its stage"
        record("TRELLIS killed mid-job", {"status": error.code().name,  # type: ignore[attr-defined]
                                          "seconds_to_fail": round(time.monotonic() - started, 1)})


def test_a_stage_back_after_an_outage_is_served_again_within_seconds(tmp_path: Path) -> None:
    """After 45 s without its TRELLIS service, the gateway serves within a few seconds of the service being ready
    again: gRPC's default reconnect backoff grows toward 120 s (served 20 s late here before, later the longer the
    outage); the stage channels cap it at 2 s."""
    trellis_port = free_port()
    trellis = start_service("trellis", "trellis_service", ["--backend", "preview"], tmp_path, port=trellis_port)
    gateway = start_service("gateway", "gateway", ["--refiner-target", f"127.0.0.1:{free_port()}",
                                                   "--trellis-target", trellis.target], tmp_path)
    try:
        trellis.wait_ready(TRELLIS_SERVICE, 120)
        gateway.wait_ready(GATEWAY_SERVICE, 60)
        request = build_request([png_bytes(96)], generation={"texture_size": 256})
        with TrellisBoxClient(gateway.target, timeout=60) as client:
            client.collect(client.stream(request))
            trellis.kill()
            time.sleep(45)  # the channel's reconnect attempts back off meanwhile
            trellis = start_service("trellis-again", "trellis_service", ["--backend", "preview"], tmp_path,
                                    port=trellis_port)
            trellis.wait_ready(TRELLIS_SERVICE, 120)
            back = time.monotonic()
            while True:
                try:
                    client.collect(client.stream(request))
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # type: ignore[attr-defined]
                    time.sleep(0.2)
            waited = time.monotonic() - back
    finally:
        gateway.stop()
        trellis.stop()
    assert waited < 4.0, f"served {waited:.1f} s after TRELLIS was ready again"
