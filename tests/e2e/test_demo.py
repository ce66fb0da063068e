"""`make demo`'s program on this machine: it says which backends ran, and why when auto fell back."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.conftest import validate_glb
from trellisbox._runtime.devices import cuda_available

pytestmark = pytest.mark.integration


def test_demo_runs_refine_then_3d_and_writes_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ran = re.search(r"backends: refiner=(\S+) generator=(\S+)", completed.stderr)
    assert ran is not None, completed.stderr[-3000:]
    refiner, generator = ran.groups()
    # auto runs the real models only where a GPU and their weights are; whatever it chose, the demo says why.
    for chosen, real in ((refiner, "sdxl"), (generator, "trellis")):
        assert chosen == real or f"auto chose '{chosen}'" in completed.stderr, completed.stderr[-3000:]
    if not cuda_available():  # here the fallback is certain
        assert (refiner, generator) == ("classic", "preview")
    validate_glb(out / "example.glb")
    refined = Image.open(out / "example.refined.png")
    assert refined.mode == "RGBA" and refined.size == (512, 512)
    assert (out / "example.ply").read_bytes().startswith(b"ply")
    assert {p.name for p in (out / "logs").glob("*.log")} == {"gateway.log", "refiner.log", "trellis.log"}
