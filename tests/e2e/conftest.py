"""A real stack for end-to-end tests: tiny SDXL-refiner (real diffusers path, random weights) + preview."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = ROOT / "tools" / "gltf-validator" / "validate.mjs"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    log_dir = tmp_path_factory.mktemp("stack-logs")
    with LocalStack(
        log_dir,
        refiner_args=["--backend", "sdxl", "--model", "tiny", "--device", "cpu"],
        trellis_args=["--backend", "preview"],
        ready_timeout=240,
    ) as running:
        yield running


def validate_glb(path: Path) -> dict[str, object]:
    """Run the Khronos glTF validator; returns its summary (fails the test on errors)."""
    completed = subprocess.run(["node", str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120)
    summary: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    assert completed.returncode == 0 and summary["numErrors"] == 0, summary
    return summary
