"""`python -m bench --quick` runs every section and writes the JSON results and the Markdown table.

Timings are not asserted (2 shared cores): only that each figure is there and is a number.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import BEGIN, END

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_bench_writes_results_and_table(tmp_path: Path) -> None:
    out, docs = tmp_path / "results", tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nHand-written method text stays.\n\n{BEGIN}\nold table\n{END}\n\nTail.\n")
    out.mkdir()
    (out / "lease.json").write_text(json.dumps({
        "handoff": {"handoffs": 3, "p50_ms": 0.2, "p99_ms": 0.5, "max_ms": 0.6},
        "swaps": [{"batching": True, "max_hold_s": 1.0, "jobs": 8, "swaps": 2, "swaps_per_job": 0.25,
                   "wall_s": 0.1}],
    }))
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--docs", str(docs),
         "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    overhead = json.loads((out / "overhead.json").read_text())
    for case in ("refine_and_3d", "3d_only"):
        figures = overhead["cases"][case]
        assert _number(figures["ratio"]["median"]) and math.isfinite(figures["added_ms"]["median"])
        assert figures["identical_glb"] is True  # served and in-process give the same bytes
    floor = overhead["cases"]["3d_only"]
    assert _number(floor["grpc_floor_ms"]["median"]) and floor["floor_progress_events"] >= 1
    assert math.isfinite(floor["outside_stages_over_floor_ms"]["median"])
    transport = json.loads((out / "transport.json").read_text())
    assert _number(transport["ratio_to_bare"])
    assert _number(transport["served"]["mib_s"]["median"]) and _number(transport["bare"]["mib_s"]["median"])
    assert _number(transport["ratio_to_relay_floor"]) and _number(transport["floor_ratio_to_bare"])
    assert set(transport["relay_floor"]["cpu_ms_per_mib"]) == {"bare server", "raw relay", "client"}
    bound = transport["cpu_bound"]  # cores / the served processes' CPU per MiB, together
    served_cpu = sum(transport["served"]["cpu_ms_per_mib"].values())
    assert bound["served_cpu_ms_per_mib"] == pytest.approx(served_cpu, abs=0.02)
    assert bound["served_max_mib_s"] == pytest.approx(bound["cores"] * 1000 / bound["served_cpu_ms_per_mib"], rel=0.01)
    fresh = transport["fresh_client"]  # both streams read by a client in a fresh process, per allocator setting
    assert set(fresh) == {"glibc defaults", "receiving profile"}
    for streams in fresh.values():
        assert set(streams["served"]["cpu_ms_per_mib"]) == {"trellis", "gateway", "client"}
        assert set(streams["bare"]["cpu_ms_per_mib"]) == {"bare server", "client"}
        assert all(_number(streams[which]["mib_s"]["median"]) for which in ("served", "bare"))
    scaling = json.loads((out / "scaling.json").read_text())
    assert [row["replicas"] for row in scaling["rows"]] == [1, 2, 4]
    assert all(_number(row["ratio_to_one"]) for row in scaling["rows"])
    coldstart = json.loads((out / "coldstart.json").read_text())
    assert all(_number(s["median"]) for s in coldstart["services"].values())
    memory = json.loads((out / "memory.json").read_text())
    assert all(_number(case["peak_rss_mib"]["median"]) for case in memory["cases"].values())
    for name in ("overhead", "transport", "scaling", "coldstart", "memory"):
        machine = json.loads((out / f"{name}.json").read_text())["machine"]
        assert machine["cpus"] and machine["python"] and machine["grpcio"]

    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written method text stays.") and text.endswith("Tail.\n")
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert "old table" not in table
    for label in ("served / in-process", "served / bare", "served / raw-relay floor", "gRPC floor of this call",
                  "most the served stream can reach", "client in a fresh process, receiving profile",
                  "refiner scaling, 4 replicas",
                  "cold start, gateway", "gateway memory", "GPU lease hand-off"):
        assert label in table, label
