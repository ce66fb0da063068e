"""`python -m bench.experiments` runs small: the experiments behind docs/benchmarks.md's figures still run and write
their results, so that a change to the services or to bench/ cannot leave them broken until someone re-runs one.

Timings are not asserted (2 shared cores): only that each figure is there and is a finite number.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(name: str, tmp_path: Path, *args: str) -> dict[str, object]:
    out = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.experiments", name, *args, "--out", str(out),
         "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    written: dict[str, object] = json.loads((out / f"experiment-{name}.json").read_text())
    assert written["machine"]
    return written


def _finite(values: object) -> bool:
    return isinstance(values, list) and bool(values) and all(
        isinstance(v, int | float) and math.isfinite(v) for v in values)


def test_worker_gap_runs_each_arm(tmp_path: Path) -> None:
    result = _run("worker-gap", tmp_path, "--rounds", "2", "--repeats", "1")
    rows = result["rows"]
    assert isinstance(rows, dict) and len(rows["rounds"]) == 2
    arms = ("this thread", "a thread", "model worker", "model worker, encoded on its thread",
            "model worker, progress at stage starts only")
    for row in rows["rounds"]:
        assert set(row) == {"round", *arms}
        for arm in arms:
            figures = row[arm]
            assert all(figures[f"{part} ms"] > 0 for part in ("generate", "export", "generate CPU", "export CPU"))
            assert figures["stages ms"] == pytest.approx(figures["generate ms"] + figures["export ms"], abs=5)
            assert figures["generate waiting ms"] > -1  # wall time is not less than CPU time (clock reads apart)
            assert figures["generate switches per call"] >= 0 and figures["caller switches per call"] >= 0
        # The caller waits for the other arms' threads; this thread's run has nothing to wait for.
        assert row["a thread"]["caller switches per call"] >= 1
    assert len(rows["summary"]) == 6 * (len(arms) - 1) + 2 * len(arms)
    assert all(_finite(values) and len(values) == 2 for values in rows["summary"].values())
    assert rows["malloc"].startswith("malloc (model)")


def test_grpc_costs_fits_per_call_message_and_mib(tmp_path: Path) -> None:
    result = _run("grpc-costs", tmp_path, "--rounds", "1", "--repeats", "2")
    rows = result["rows"]
    assert isinstance(rows, dict) and len(rows["rounds"]) == 1
    (row,) = rows["rounds"]
    assert len(row["median_ms"]) == 2 * len(rows["shapes"]) and all(ms > 0 for ms in row["median_ms"].values())
    for hops in ("1 hop", "2 hops"):
        assert set(row["fit"][hops]) == {"per_call_ms", "per_message_ms", "per_mib_ms"}
        assert all(math.isfinite(value) for value in row["fit"][hops].values())


def test_stage_gap_compares_direct_gateway_and_in_process(tmp_path: Path) -> None:
    result = _run("stage-gap", tmp_path, "--rounds", "1", "--repeats", "1")
    rows = result["rows"]
    assert isinstance(rows, dict) and len(rows["rounds"]) == 1
    assert all(_finite(values) for values in rows["summary"].values()) and len(rows["summary"]) == 4


def test_service_threads_splits_the_service_cpu_by_thread(tmp_path: Path) -> None:
    result = _run("service-threads", tmp_path, "--rounds", "1", "--repeats", "1")
    rows = result["rows"]
    assert isinstance(rows, dict) and len(rows["rounds"]) == 1
    (row,) = rows["rounds"]
    # The service names its threads, so that the model thread and the encoding thread are found and charged.
    assert row["model thread CPU ms"] > 10 and row["encoding threads CPU ms"] > 10 and row["event loop CPU ms"] > 1
    assert row["generate CPU ms"] > 10 and row["export CPU ms"] > 10
    assert all(_finite(values) and len(values) == 1 for values in rows["summary"].values())
