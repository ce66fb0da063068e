"""The refiner benchmarks keep working: both run in their quickest CPU mode and write their JSON.

Timings are not asserted (2 shared cores): only that each figure is there, is a number, and that what
must hold whatever the speed does hold (batch 1 is the unbatched path bit for bit, a batched image stays
within the tolerance, the full-size architecture has the published parameter counts).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 2  # grey levels; the same bound as tests/refiner/test_refiner_batching.py

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _run(module: str, out: Path, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cache), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", module, "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| batch |" in done.stdout or "| variant |" in done.stdout, done.stdout  # the Markdown table
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_refiner_batching_quick(tmp_path: Path) -> None:
    data = _run("bench.refiner_batching", tmp_path / "refiner_batching.json", tmp_path / "cache")
    assert data["quick"] and data["machine"]["device"] == "cpu" and data["machine"]["device_name"]
    assert [row["batch"] for row in data["calls"]] == [1, 2, 4]
    for row in data["calls"]:
        assert _positive(row["images_per_s"]) and _positive(row["seconds_per_call"]["median"])
    tolerance = data["tolerance"]
    assert tolerance["per_batch"]["1"]["bit_identical_to_unbatched"] is True
    assert 0 <= tolerance["max_abs_grey_levels"] <= TOLERANCE
    off, on = data["service_path"]
    assert not off["batching"] and on["batching"]
    assert off["model_calls"] == off["requests"] and on["model_calls"] < on["requests"]
    assert _positive(off["images_per_s"]) and _positive(on["images_per_s"])


def test_refiner_gpu_quick_on_a_cpu(tmp_path: Path) -> None:
    data = _run("bench.refiner_gpu", tmp_path / "refiner_gpu.json", tmp_path / "cache")
    assert data["machine"]["device"] == "cpu" and data["machine"]["device_name"]
    assert data["config"]["scale"] < 1 and data["config"]["unet_steps"] == 6
    rows = {row["variant"]: row for row in data["variants"]}
    for name in ("fp32", "fp32-sliced", "fp32-eager", "fp32-channels-last"):
        assert "error" not in rows[name], rows[name]
        assert _positive(rows[name]["seconds_per_image"]["median"])
    for name in ("fp16-sdpa", "fp16-sdpa-compile", "fp16-sdpa-offload", "fp16-sliced-offload"):
        assert rows[name]["skipped"]  # CUDA only, with the reason
    assert data["moves"]["skipped"]


def test_full_size_architecture_matches_the_published_weights() -> None:
    from bench.refiner_gpu import PUBLISHED_PARAMETERS, architecture_parameters

    assert architecture_parameters(1.0) == PUBLISHED_PARAMETERS  # built on the meta device: no memory


def test_the_gpu_host_recipe_names_real_variants_and_pins_what_the_tests_ran_against() -> None:
    import importlib.metadata
    import re

    from bench.refiner_gpu import VARIANTS
    from tools.device_wheels import MISSING_ON_DEVICE, pinned

    doc = (ROOT / "docs" / "refiner-performance.md").read_text()
    recipe = doc.split("### On a GPU host without this project installed", 1)[1].split("\n### ", 1)[0]
    commands = recipe.replace("\\\n", " ")  # shell line continuations
    named = {name for args in re.findall(r"--only ([^\n]*)", commands)
             for name in args.split("--out")[0].split()}
    assert named and named <= {v.name for v in VARIANTS}, named - {v.name for v in VARIANTS}
    assert pinned(("diffusers", "protobuf")) == [f"diffusers=={importlib.metadata.version('diffusers')}",
                                                 f"protobuf=={importlib.metadata.version('protobuf')}"]
    assert {"diffusers", "pydantic-settings", "grpcio-health-checking", "protobuf"} <= set(MISSING_ON_DEVICE)
    with pytest.raises(SystemExit, match="not installed"):
        pinned(("no-such-distribution-here",))


def test_gaussian_refinement_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "gaussian_refinement.json"
    done = subprocess.run([sys.executable, "-m", "bench.gaussian_refinement", "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| Gaussians | render px |" in done.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["rasterizer"] == "torch" and data["agreement"] is None  # no GPU: nothing to compare with
    (row,) = data["fit"]
    assert row["gaussians"] == 2000 and row["size"] == 48
    assert all(_positive(row[key]) for key in ("pose_s", "step_s", "iou"))
    (hand_over,) = data["hand_over"]
    assert hand_over["gaussians"] == 2000 and hand_over["mesh_faces"] == 1280
    splats, mesh = 2000 * 17 * 4, 642 * 3 * 4 + 1280 * 3 * 4  # 17 float columns per Gaussian; the icosphere
    assert splats + mesh < hand_over["state_bytes"] < splats + mesh + 4096, "the PLY and the mesh, zip and headers"
    assert all(_positive(hand_over[key]) for key in ("encode_s", "decode_s", "kept_for_s", "kept_host_mib"))
    assert hand_over["sent_s"] is None or hand_over["sent_s"] >= hand_over["encode_s"] + hand_over["decode_s"]
