"""The Ray Serve comparison (``make bench-ray``): its table is rendered from the committed result files, and
docs/benchmarks.md shows exactly that table. Ray itself is not installed here (it has its own virtual environment),
so the comparison is not run; what is checked is what the docs claim against what was measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

from bench.ray_serve import BEGIN, END, MODES, footprint, result_path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def _table(docs: Path) -> str:
    return docs.read_text().split(BEGIN, 1)[1].split(END, 1)[0].strip()


def test_the_table_is_rendered_from_the_results_and_is_the_one_in_the_docs(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"Method text stays.\n\n{BEGIN}\nold table\n{END}\n\nTail stays.\n")
    subprocess.run([sys.executable, "-m", "bench.ray_serve", "--render", "--out", str(RESULTS), "--docs", str(docs)],
                   cwd=ROOT, check=True, timeout=60)
    text = docs.read_text()
    assert "Method text stays." in text and "Tail stays." in text and "old table" not in text
    table = _table(docs)
    for mode in MODES:
        run = json.loads(result_path(RESULTS, mode).read_text())
        assert run["3d_only"]["identical_glb"] and run["refine_and_3d"]["identical_glb"]
        for figure in (f"**{run['3d_only']['added_ms']['ours']['median']} ms**",
                       f"{run['refine_and_3d']['added_ms']['ray']['median']} ms",
                       f"**{run['streaming']['mib_s']['ours']['median']} MiB/s**",
                       f"{run['streaming']['mib_s']['ray']['median']} MiB/s",
                       f"{run['idle']['ray']['processes']} processes"):
            assert figure in table, figure
        assert f"**{run['concurrent']['ours']['requests_per_s']}**" in table
        assert f"{run['concurrent']['ray']['requests_per_s']}" in table
    stale = "docs/benchmarks.md is stale: python -m bench.ray_serve --render"
    assert table == _table(ROOT / "docs" / "benchmarks.md"), stale


def test_footprint_reads_memory_and_idle_cpu_of_live_processes() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        measured = footprint([psutil.Process(), psutil.Process(child.pid)], idle_s=0.2)
    finally:
        child.kill()
        child.wait()
    assert measured["processes"] == 2
    assert measured["pss_mib"] > 5  # two Python interpreters
    assert 0 <= measured["idle_cpu_percent_of_a_core"] < 200
