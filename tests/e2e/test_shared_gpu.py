"""Shared placement: refiner and TRELLIS time-share one (CPU-simulated) GPU under a flock lease.

The proof is read from the lease records by tools/check_lease_records.py, which knows only the
record format: no two GPU-active intervals overlap, the holders alternate, every request completes,
and a holder killed with SIGKILL mid-turn does not stop the other service.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tests.images import png_bytes
from tools.stack import LocalStack
from trellisbox.client import TrellisBoxClient, build_request
from trellisbox.v1 import common_pb2

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT / "tools" / "check_lease_records.py"


@pytest.fixture
def shared_stack(tmp_path: Path) -> Iterator[tuple[LocalStack, Path]]:
    record = tmp_path / "lease.jsonl"
    shared = ["--placement", "shared", "--lease-backend", "flock", "--lease-dir", str(tmp_path / "lease"),
              "--lease-record", str(record), "--max-hold-s", "0.5"]
    with LocalStack(
        tmp_path / "logs",
        refiner_args=["--backend", "sdxl", "--model", "tiny", "--device", "cpu", *shared],
        trellis_args=["--backend", "preview", *shared],
        gateway_args=["--max-concurrent", "8"],
        ready_timeout=240,
    ) as stack:
        yield stack, record


def check_records(record: Path) -> dict[str, object]:
    completed = subprocess.run([sys.executable, str(CHECKER), "--json", str(record)],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    summary: dict[str, object] = json.loads(completed.stdout)
    return summary


def test_concurrent_clients_never_overlap_on_the_gpu_and_all_complete(shared_stack: tuple[LocalStack, Path]) -> None:
    stack, record = shared_stack
    requests = 12

    def one(i: int) -> bytes | None:
        with TrellisBoxClient(stack.gateway_target, timeout=240) as client:
            return client.generate([png_bytes(96)], refine=True, refine_params={"seed": i}).glb

    with ThreadPoolExecutor(6) as pool:
        glbs = list(pool.map(one, range(requests)))
    assert all(glb and glb[:4] == b"glTF" for glb in glbs)

    summary = check_records(record)
    assert summary["overlaps"] == 0
    (gpu,) = summary["gpus"].values()  # type: ignore[attr-defined]
    holders = {name.split("@")[0] for name in gpu["holders"]}
    assert holders == {"refiner", "trellis"}
    assert gpu["alternations"] >= 2
    # Hand-off batching: far fewer turns than one per job per service (2 × requests + 2 warm-ups).
    assert gpu["turns"] < 2 * requests + 2


def test_kill_9_of_the_holder_mid_turn_lets_the_other_service_work(shared_stack: tuple[LocalStack, Path]) -> None:
    stack, record = shared_stack
    refining = threading.Event()
    outcome: list[BaseException | None] = []

    def long_refine() -> None:
        request = build_request([png_bytes(256)], refine=True,
                                refine_params={"num_inference_steps": 200, "strength": 1.0})
        try:
            with TrellisBoxClient(stack.gateway_target, timeout=240) as client:
                for response in client.stream(request):
                    if response.HasField("progress") and response.progress.stage == common_pb2.STAGE_REFINE:
                        refining.set()
            outcome.append(None)
        except grpc.RpcError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=long_refine)
    thread.start()
    assert refining.wait(120), "the refiner never started"
    stack.processes["refiner"].kill()  # SIGKILL while it holds the GPU lease
    thread.join(60)
    assert outcome and isinstance(outcome[0], grpc.RpcError)
    assert outcome[0].code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

    started = time.monotonic()
    with TrellisBoxClient(stack.gateway_target, timeout=120) as client:
        result = client.generate([png_bytes(96)])  # TRELLIS stage only: it needs the GPU the dead one held
    assert result.glb is not None and time.monotonic() - started < 120

    records = [json.loads(line) for line in record.read_text().splitlines()]
    last_refiner = [r for r in records if r["service"] == "refiner"][-1]
    assert last_refiner["event"] == "acquire"  # it died holding the lease: no release was written
    assert records[-1]["service"] == "trellis"
    check_records(record)
