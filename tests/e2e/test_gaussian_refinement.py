"""Gaussian refinement end to end: gateway → TRELLIS service (preview backend, CPU), client and CLI.

Its own stack (the classic refiner: these requests never refine images), with one torch thread per service:
on a shared 2-core machine torch's default thread pool makes the refinement many times slower."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import validate_glb
from tests.images import png_bytes, rgba_object
from tools.stack import LocalStack
from trellis_service.gaussian_refinement.gaussians import read_splat_ply
from trellisbox.client import ProgressUpdate, TrellisBoxClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("gaussian-refinement-stack"), refiner_args=["--backend", "classic"],
                    trellis_args=["--backend", "preview"], env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                    ready_timeout=120) as running:
        yield running

#: Small enough for a CPU test: about 4 000 preview splats, 48-pixel renders, a few steps.
FAST = {"enabled": True, "steps": 6, "resolution": 48}


def test_refinement_returns_refined_splats_a_glb_and_the_figures(stack: LocalStack, tmp_path: Path) -> None:
    image = rgba_object(128)
    updates: list[ProgressUpdate] = []
    with TrellisBoxClient(stack.gateway_target, timeout=240) as client:
        plain = client.generate([image], generation={"seed": 4, "mesh_simplify": 0.99}, formats=["glb", "ply"])
        refined = client.generate([image], generation={"seed": 4, "mesh_simplify": 0.99, "gaussian_refinement": FAST},
                                  formats=["glb", "ply"], on_progress=updates.append)

    assert plain.gaussian_refinement is None
    report = refined.gaussian_refinement
    assert report is not None
    assert report.steps == 6 and report.resolution == 48 and report.rasterizer == "torch"
    (view,) = report.views
    assert view.image_index == 0 and 0.5 < view.silhouette_iou <= 1.0
    assert view.distance > 0.0 and -90.0 <= view.pitch_degrees <= 90.0 and 0.0 <= view.yaw_degrees < 360.0
    assert all(math.isfinite(v) for v in (view.psnr_before, view.psnr_after, view.ssim_before, view.ssim_after))
    assert view.psnr_after > view.psnr_before, "the fit brought the render closer to the image"
    assert report.held_out and all(math.isfinite(h.psnr) for h in report.held_out)

    stages = [u.stage for u in updates]
    assert "GAUSSIAN_REFINEMENT" in stages
    assert stages.index("GAUSSIAN_REFINEMENT") > stages.index("PREPROCESS")
    assert "GAUSSIAN_REFINEMENT" in refined.timings
    assert refined.glb is not None and plain.gaussian_ply is not None and refined.gaussian_ply is not None
    path = tmp_path / "refined.glb"
    path.write_bytes(refined.glb)
    validate_glb(path)
    before, after = read_splat_ply(plain.gaussian_ply), read_splat_ply(refined.gaussian_ply)
    assert len(before.xyz) == len(after.xyz) == report.gaussians
    assert (before.f_dc != after.f_dc).any(), "the PLY carries the refined colours"
    assert (before.xyz == after.xyz).all(), "positions were not asked to move"
    assert any("only TRELLIS re-bakes the GLB" in note for note in refined.notes)


def test_novel_views_go_through_the_refiner_tier_and_back_into_the_fit(stack: LocalStack, tmp_path: Path) -> None:
    """The gateway's three calls: TRELLIS hands over (cameras, novel views, the generated Gaussians), the refiner
    pool refines the novel views in one call, TRELLIS fits to the image and them, and exports."""
    image = rgba_object(128)
    updates: list[ProgressUpdate] = []
    request = {"seed": 4, "mesh_simplify": 0.99,
               "gaussian_refinement": {**FAST, "novel_views": True, "novel_view_strength": 0.5}}
    with TrellisBoxClient(stack.gateway_target, timeout=300) as client:
        result = client.generate([image], generation=request, formats=["glb", "ply", "novel_views"],
                                 on_progress=updates.append)
        plain = client.generate([image], generation={"seed": 4, "mesh_simplify": 0.99}, formats=["ply"])
        with pytest.raises(grpc.RpcError) as caught:  # novel views only come with a novel-view refinement
            client.generate([image], generation={"gaussian_refinement": FAST}, formats=["novel_views"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "ARTIFACT_KIND_NOVEL_VIEW was requested but there are no novel views" in str(
        caught.value.details())  # type: ignore[attr-defined]

    report = result.gaussian_refinement
    assert report is not None and report.novel_views == 3 and report.steps == 6
    (view,) = report.views
    assert 0.5 < view.silhouette_iou <= 1.0 and view.psnr_after > view.psnr_before
    assert report.held_out and all(math.isfinite(h.psnr) and math.isfinite(h.ssim) for h in report.held_out)

    assert len(result.novel_views) == 3
    for data in result.novel_views:
        novel = Image.open(io.BytesIO(data))
        assert novel.format == "PNG" and novel.mode == "RGBA" and novel.size == (256, 256)
        coverage = np.asarray(novel.getchannel("A"))
        assert 0.02 < (coverage > 127).mean() < 0.9, "the object, seen from around it"

    stages = [u.stage for u in updates]
    first_fit = stages.index("GAUSSIAN_REFINEMENT")
    refined_views = [i for i, u in enumerate(updates) if u.stage == "REFINE"]
    assert refined_views and first_fit < refined_views[0], "the novel views are refined after the cameras are found"
    assert any(i > refined_views[-1] for i, stage in enumerate(stages) if stage == "GAUSSIAN_REFINEMENT")
    assert "GAUSSIAN_REFINEMENT" in result.timings and "REFINE" not in result.timings

    assert result.glb is not None and result.gaussian_ply is not None and plain.gaussian_ply is not None
    path = tmp_path / "novel.glb"
    path.write_bytes(result.glb)
    validate_glb(path)
    before, after = read_splat_ply(plain.gaussian_ply), read_splat_ply(result.gaussian_ply)
    assert len(before.xyz) == len(after.xyz) == report.gaussians
    assert (before.f_dc != after.f_dc).any()
    trellis_log = stack.processes["trellis"].log_path.read_text(errors="replace")
    assert trellis_log.count("refine Gaussians: 1 image(s) and 3 refined novel view(s)") == 1


def test_cli_flags_ask_for_refinement_and_print_the_figures(stack: LocalStack, tmp_path: Path) -> None:
    source = tmp_path / "ball.png"
    source.write_bytes(png_bytes(96))
    completed = subprocess.run(
        [sys.executable, "-m", "trellisbox.cli", "generate", str(source), "-o", str(tmp_path / "ball.glb"),
         "--target", stack.gateway_target, "--ply", str(tmp_path / "ball.ply"), "--simplify", "0.99",
         "--gs-enabled", "--gs-steps", "3", "--gs-resolution", "32", "--no-gs-opacities"],
        capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, completed.stderr
    assert "gaussian refinement: 3 steps" in completed.stderr
    assert "silhouette IoU" in completed.stderr and "PSNR" in completed.stderr
    assert "gaussian_refinement" in completed.stderr
    assert (tmp_path / "ball.ply").read_bytes().startswith(b"ply")


def test_a_hand_over_too_large_for_one_stage_message_is_refused_with_the_reason(tmp_path: Path) -> None:
    """The state goes back to TRELLIS in one message: a gateway whose messages are capped below it says so (and what
    to change) instead of failing the stage call."""
    small = LocalStack(tmp_path, refiner_args=["--backend", "classic"], trellis_args=["--backend", "preview"],
                       gateway_args=["--max-request-bytes", str(2**20)],
                       env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, ready_timeout=120)
    with small, TrellisBoxClient(small.gateway_target, timeout=240) as client, \
            pytest.raises(grpc.RpcError) as caught:
        # The preview's default 20 000 splats: a 1.4 MB state.
        client.generate([rgba_object(96)], generation={"gaussian_refinement": {**FAST, "novel_views": True}},
                        formats=["ply"])
    assert "refine 3 image(s)" not in small.processes["refiner"].log_path.read_text(), "refused before refining"
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    details = str(caught.value.details())  # type: ignore[attr-defined]
    assert details.startswith("generation.gaussian_refinement.novel_views: this object's Gaussians and mesh")
    assert "(1 MiB); refine without novel_views, or raise max_request_bytes" in details
