"""The model-service skeleton's host: placement, the GPU turns around every job, the late-chosen backend."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from trellisbox._domain.errors import Unavailable
from trellisbox._runtime import model
from trellisbox._runtime.lease import LeaseSettings
from trellisbox._runtime.model import ModelHost, WeightFreeBackend
from trellisbox._runtime.worker import Finished, JobContext


class FakeModel(WeightFreeBackend):
    name = "fake"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def load(self) -> None:
        super().load()
        self.calls.append("load")

    def unload(self) -> None:
        super().unload()
        self.calls.append("unload")

    def warm_up(self) -> None:
        self.calls.append("warm_up")

    def to_gpu(self) -> None:
        self.calls.append("to_gpu")

    def to_host(self) -> None:
        self.calls.append("to_host")


def _run_one(host: ModelHost[FakeModel], model: FakeModel) -> None:
    def job(ctx: JobContext) -> str:
        model.calls.append("compute")
        return "ok"

    async def main() -> list[object]:
        return [item async for item in host.worker.run(job, request_id="r")]

    items = asyncio.run(main())
    assert isinstance(items[-1], Finished) and items[-1].value == "ok"


def _shared(tmp_path: Path) -> LeaseSettings:
    return LeaseSettings(placement="shared", lease_dir=tmp_path / "lease", lease_record=tmp_path / "lease.jsonl",
                         residency="offload", max_hold_s=0)


def test_dedicated_placement_has_no_lease_and_never_moves_the_model() -> None:
    model = FakeModel()
    host: ModelHost[FakeModel] = ModelHost("svc", 4, LeaseSettings())
    assert host.turns is None
    assert host.start(lambda: model) is model and host.require() is model
    _run_one(host, model)
    assert model.calls == ["load", "warm_up", "compute"]
    host.close()
    assert model.calls[-1] == "unload"  # idle at shutdown: freed on its own thread


def test_shared_placement_computes_only_inside_a_recorded_turn(tmp_path: Path) -> None:
    model = FakeModel()
    host: ModelHost[FakeModel] = ModelHost("svc", 4, _shared(tmp_path))
    assert host.turns is not None
    host.start(lambda: model)
    _run_one(host, model)
    host.close()
    # The first turn chose, loaded and warmed the backend, then parked it; offload: each later turn moves the
    # model in, computes, and parks it again.
    assert model.calls == ["load", "warm_up", "to_host", "to_gpu", "compute", "to_host", "unload"]
    events = [json.loads(line)["event"] for line in (tmp_path / "lease.jsonl").read_text().splitlines()]
    assert events == ["acquire", "release", "acquire", "release"]


def test_requests_before_the_backend_is_ready_are_unavailable() -> None:
    host: ModelHost[FakeModel] = ModelHost("svc", 4, LeaseSettings())
    with pytest.raises(Unavailable, match="svc service is not ready"):
        host.require()
    host.close()


def test_readiness_follows_whether_the_lease_can_be_reached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    host: ModelHost[FakeModel] = ModelHost("svc", 4, _shared(tmp_path))
    assert host.turns is not None
    answers = iter([None, "GPU lease ml/gpu-0 cannot be read: 403 Forbidden", None])
    monkeypatch.setattr(host.turns.lease, "access_problem", lambda: next(answers))
    monkeypatch.setattr(model, "LEASE_CHECK_S", 0)

    async def first_three() -> list[bool]:
        readiness = host.lease_readiness()
        return [await anext(readiness) for _ in range(3)]

    assert asyncio.run(first_three()) == [True, False, True]
    assert "svc cannot take GPU turns: GPU lease ml/gpu-0 cannot be read: 403 Forbidden" in caplog.text
    host.close()
