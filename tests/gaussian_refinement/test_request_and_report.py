"""The refinement's request block through every front end (client, form, CLI text), what is refused, and how the
report is shown (CLI lines, web page)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.servicer import requested_formats
from tests.images import png_bytes
from trellis_service.exporters import SplatArrays
from trellis_service.gaussian_refinement import refine_splats
from trellis_service.gaussian_refinement.novel_views import novel_view_size
from trellis_service.servicer import require_novel_views
from trellisbox._domain.artifacts import Artifact
from trellisbox._domain.convert import params_from_proto, params_message
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.kinds import ArtifactKind
from trellisbox._domain.params import GaussianRefinementParams, GenerationParams, build, from_text
from trellisbox._runtime.worker import JobContext
from trellisbox.client import GenerationResult, refinement_lines
from trellisbox.v1 import common_pb2, gateway_pb2
from webui.app import WebApp
from webui.form import ProgressPanel, request_options


def test_switches_travel_from_the_client_mapping_to_the_domain() -> None:
    message = params_message(GenerationParams, common_pb2.GenerationParameters(),
                             {"gaussian_refinement": {"enabled": True, "opacities": False, "steps": 40}}, "generation")
    params = params_from_proto(GenerationParams, message, "generation").gaussian_refinement
    assert params.enabled and params.steps == 40
    assert params.attributes == {"colours"}, "opacities switched off, positions and scales off by default"
    assert params_from_proto(GenerationParams, common_pb2.GenerationParameters(), "g").gaussian_refinement == \
        GaussianRefinementParams()


def test_yes_no_values_typed_as_text() -> None:
    typed = from_text(GaussianRefinementParams, {"enabled": "on", "positions": "False", "scales": True}, "gs")
    assert typed == {"enabled": True, "positions": False, "scales": True}
    with pytest.raises(ValueError, match=r"gs\.enabled must be true or false, got 'maybe'"):
        from_text(GaussianRefinementParams, {"enabled": "maybe"}, "gs")


def test_the_web_form_sends_its_checkboxes() -> None:
    options = request_options({"generation.gaussian_refinement.enabled": True,
                               "generation.gaussian_refinement.steps": 25.0,
                               "generation.gaussian_refinement.colours": False}, refine=False)
    assert options["generation"] == {"gaussian_refinement": {"enabled": True, "steps": 25, "colours": False}}


def test_novel_view_artifacts_only_with_novel_views_and_the_hand_over_never() -> None:
    novel = build(GenerationParams, {"gaussian_refinement": {"enabled": True, "novel_views": True}}, "generation")
    asked = gateway_pb2.GenerateRequest(formats=[common_pb2.ARTIFACT_KIND_NOVEL_VIEW])
    assert requested_formats(asked, novel) == {ArtifactKind.NOVEL_VIEW, ArtifactKind.GLB}
    with pytest.raises(InvalidInput, match=r"^ARTIFACT_KIND_NOVEL_VIEW was requested but there are no novel views; "
                                           r"set generation\.gaussian_refinement\.enabled and .*novel_views$"):
        requested_formats(asked, GenerationParams())
    internal = gateway_pb2.GenerateRequest(formats=[common_pb2.ARTIFACT_KIND_GENERATION_STATE])
    with pytest.raises(InvalidInput, match=r"formats: ARTIFACT_KIND_GENERATION_STATE is not an artifact this service "
                                           r"produces; it is internal to a novel-view Gaussian refinement"):
        requested_formats(internal, novel)
    with pytest.raises(InvalidInput, match=r"^hand_over_novel_views needs parameters\.gaussian_refinement\.enabled"):
        require_novel_views(GenerationParams(), "hand_over_novel_views")


def test_a_fit_that_may_move_nothing_is_refused() -> None:
    params = GaussianRefinementParams(enabled=True, colours=False, opacities=False)
    empty = SplatArrays(*(np.zeros((0, n), dtype=np.float32) for n in (3, 3, 3, 1, 3, 4)))
    with pytest.raises(InvalidInput, match="no attribute may move"):
        refine_splats(empty, [], params, JobContext("t", None, lambda _: None))


def test_the_web_page_and_the_cli_show_the_figures(tmp_path: Path) -> None:
    report = common_pb2.GaussianRefinementReport(
        views=[common_pb2.GaussianRefinementView(image_index=0, yaw_degrees=12.5, pitch_degrees=-3.0, distance=1.8,
                                                 silhouette_iou=0.93, psnr_before=18.6, psnr_after=21.2,
                                                 ssim_before=0.69, ssim_after=0.89)],
        held_out=[common_pb2.HeldOutView(yaw_degrees=90.0, pitch_degrees=13.0, psnr=31.8, ssim=0.92)],
        steps=10, stopped_early=True, gaussians=20000, resolution=128, rasterizer="torch")
    lines = refinement_lines(report)
    assert lines[0] == "gaussian refinement: 10 steps (stopped early), 20000 Gaussians at 128 px, rasteriser torch"
    assert "yaw 12.5° pitch -3.0°" in lines[1] and "IoU 0.930" in lines[1] and "PSNR 18.60 → 21.20 dB" in lines[1]
    assert "held-out view yaw 90° pitch 13°: 31.80 dB PSNR" in lines[2]
    assert refinement_lines(None) == []
    result = GenerationResult(generator_backend="preview", gaussian_refinement=report)
    page, _ = WebApp("127.0.0.1:1", tmp_path)._show(result, ProgressPanel("sending"), ["mug.png"])
    assert '<div class="tb-refinement">gaussian refinement: 10 steps' in page
    assert "PSNR 18.60 → 21.20 dB" in page


def test_the_web_page_shows_the_refined_novel_views(tmp_path: Path) -> None:
    report = common_pb2.GaussianRefinementReport(steps=4, gaussians=300, resolution=48, rasterizer="torch",
                                                 novel_views=3)
    assert refinement_lines(report)[0].endswith(", 3 refined novel views as extra targets")
    views = [Artifact(ArtifactKind.NOVEL_VIEW, png_bytes(32 + i), index=i) for i in (2, 0, 1)]
    result = GenerationResult(generator_backend="preview", gaussian_refinement=report, artifacts=views)
    assert [len(data) for data in result.novel_views] == [len(png_bytes(32 + i)) for i in range(3)], "by index"
    _, shown = WebApp("127.0.0.1:1", tmp_path)._show(result, ProgressPanel("sending"), ["mug.png"])
    assert [caption for _, caption in shown["refined"]] == [f"novel view {i} (refined)" for i in (1, 2, 3)]
    assert [Path(path).read_bytes() for path, _ in shown["refined"]] == result.novel_views
    assert all(path in shown["downloads"] for path, _ in shown["refined"])


@pytest.mark.parametrize(("resolution", "size"), [(32, 256), (128, 256), (150, 296), (256, 512), (1024, 512)])
def test_novel_views_are_rendered_at_a_size_the_refiner_takes_as_it_is(resolution: int, size: int) -> None:
    assert novel_view_size(resolution) == size
