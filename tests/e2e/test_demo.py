"""`make demo`'s program on this machine: auto backends fall back to classic + preview and say so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.conftest import validate_glb

pytestmark = pytest.mark.integration


def test_demo_runs_refine_then_3d_and_writes_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "refiner=classic generator=preview" in completed.stderr
    assert "auto chose 'classic'" in completed.stderr and "auto chose 'preview'" in completed.stderr
    validate_glb(out / "example.glb")
    refined = Image.open(out / "example.refined.png")
    assert refined.mode == "RGBA" and refined.size == (512, 512)
    assert (out / "example.ply").read_bytes().startswith(b"ply")
    assert {p.name for p in (out / "logs").iterdir()} == {"gateway.log", "refiner.log", "trellis.log"}
