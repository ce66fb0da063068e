"""The gateway spreads refinement over a pool and skips replicas whose readiness is not SERVING."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images import png_bytes
from tools.stack import ServiceProcess, health_status, start_service
from trellisbox._domain.contract import GATEWAY_SERVICE, REFINER_SERVICE, TRELLIS_SERVICE
from trellisbox.client import TrellisBoxClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    logs = tmp_path_factory.mktemp("pool")
    empty_model = logs / "no-model-here"
    empty_model.mkdir()
    processes: dict[str, ServiceProcess] = {}
    try:
        processes["healthy"] = start_service("refiner-a", "refiner_service", ["--backend", "classic"], logs)
        # Live but never ready: its model folder is empty, so warm-up fails and readiness stays NOT_SERVING.
        processes["broken"] = start_service(
            "refiner-b", "refiner_service", ["--backend", "sdxl", "--model", str(empty_model), "--device", "cpu"], logs
        )
        processes["trellis"] = start_service("trellis", "trellis_service", ["--backend", "preview"], logs)
        processes["healthy"].wait_ready(REFINER_SERVICE, 120)
        processes["trellis"].wait_ready(TRELLIS_SERVICE, 120)
        pool_target = f"ipv4:{processes['healthy'].target},{processes['broken'].target}"
        processes["gateway"] = start_service(
            "gateway", "gateway", ["--refiner-target", pool_target, "--trellis-target", processes["trellis"].target],
            logs,
        )
        processes["gateway"].wait_ready(GATEWAY_SERVICE, 60)
        yield processes
    finally:
        for process in processes.values():
            process.stop()


def test_requests_only_reach_ready_replicas(pool: dict[str, ServiceProcess]) -> None:
    assert health_status(pool["broken"].target, "") == 1  # alive ...
    assert health_status(pool["broken"].target, REFINER_SERVICE) == 2  # ... but NOT_SERVING
    with TrellisBoxClient(pool["gateway"].target, timeout=120) as client:
        results = [client.generate([png_bytes(64)], refine=True) for _ in range(6)]
    assert all(r.refiner_backend == "classic" and r.glb for r in results)
    assert Path(pool["healthy"].log_path).read_text().count("refine 1 image") >= 6
    assert "refine 1 image" not in Path(pool["broken"].log_path).read_text()
