from __future__ import annotations

import asyncio
import json
from pathlib import Path

from trellisbox._runtime.lease import LeaseSettings
from trellisbox._runtime.model import NO_MODEL, build_model_runtime
from trellisbox._runtime.worker import Finished, JobContext


class FakeModel:
    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def load(self) -> None:
        self.calls.append("load")

    def unload(self) -> None:
        self.calls.append("unload")

    def to_gpu(self) -> None:
        self.calls.append("to_gpu")

    def to_host(self) -> None:
        self.calls.append("to_host")


def _run_one(runtime, model: FakeModel) -> None:  # type: ignore[no-untyped-def]
    def job(ctx: JobContext) -> str:
        model.calls.append("compute")
        return "ok"

    async def main() -> list[object]:
        return [item async for item in runtime.worker.run(job, request_id="r")]

    items = asyncio.run(main())
    assert isinstance(items[-1], Finished) and items[-1].value == "ok"


def test_dedicated_placement_has_no_lease_and_never_moves_the_model() -> None:
    model = FakeModel()
    runtime = build_model_runtime("svc", 4, LeaseSettings(), lambda: model)
    assert runtime.turns is None
    _run_one(runtime, model)
    assert model.calls == ["compute"]
    runtime.close()


def test_shared_placement_computes_only_inside_a_recorded_turn(tmp_path: Path) -> None:
    model = FakeModel()
    record = tmp_path / "lease.jsonl"
    settings = LeaseSettings(placement="shared", lease_dir=tmp_path / "lease", lease_record=record,
                             residency="offload", max_hold_s=0)
    runtime = build_model_runtime("svc", 4, settings, lambda: model)
    assert runtime.turns is not None
    assert runtime.run_in_turn(lambda: "warm") == "warm"
    _run_one(runtime, model)
    runtime.close()
    # offload: each turn moves the model in, computes, and parks it again.
    assert model.calls == ["to_gpu", "to_host", "to_gpu", "compute", "to_host"]
    events = [json.loads(line)["event"] for line in record.read_text().splitlines()]
    assert events == ["acquire", "release", "acquire", "release"]


def test_a_backend_chosen_during_warm_up_is_moved_from_the_next_turn_on(tmp_path: Path) -> None:
    # The TRELLIS service picks its backend inside the first turn; until then NO_MODEL stands in.
    model = FakeModel()
    slot: list[FakeModel] = []
    settings = LeaseSettings(placement="shared", lease_dir=tmp_path / "lease", lease_record=tmp_path / "lease.jsonl",
                             residency="offload", max_hold_s=0)
    runtime = build_model_runtime("svc", 4, settings, lambda: slot[0] if slot else NO_MODEL)

    def choose_backend() -> str:
        slot.append(model)
        return model.device

    assert runtime.run_in_turn(choose_backend) == "cpu"
    # The turn began with the placeholder: nothing was moved in, but the chosen model is parked at its end.
    assert model.calls == ["to_host"]
    _run_one(runtime, model)
    runtime.close()
    assert model.calls == ["to_host", "to_gpu", "compute", "to_host"]
