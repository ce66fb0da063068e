"""Known answers on a synthetic scene: the camera a photo was taken from is recovered, and a perturbed copy of
the scene fitted to the photo gets its input view back without spoiling the views nobody photographed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

from tests.gaussian_refinement.scenes import asymmetric_object, photo
from trellis_service.exporters import SH_C0, SplatArrays
from trellis_service.gaussian_refinement import plan_novel_views, refine_splats
from trellis_service.gaussian_refinement.cameras import OrbitPose, camera_at
from trellis_service.gaussian_refinement.fit import (
    NOVEL_VIEW_WEIGHT,
    REGULARISER_VIEWS_PER_STEP,
    FitSettings,
    FitTarget,
    fit_gaussians,
    novel_view_poses,
    object_region,
    render_target,
    scores,
)
from trellis_service.gaussian_refinement.gaussians import GaussianSet
from trellis_service.gaussian_refinement.pose import recover_pose
from trellis_service.gaussian_refinement.rasterizer import TorchRasterizer
from trellis_service.gaussian_refinement.views import target_view
from trellisbox._domain.params import GaussianRefinementParams
from trellisbox._runtime.worker import JobContext

RASTERIZER = TorchRasterizer()


def angle_error(found: float, truth: float) -> float:
    return abs((found - truth + 180.0) % 360.0 - 180.0)


@pytest.mark.parametrize(("yaw", "pitch"), [(35.0, 20.0), (200.0, 10.0)])
def test_camera_recovery_finds_yaw_and_pitch_within_5_degrees(yaw: float, pitch: float) -> None:
    scene = asymmetric_object()
    centre, radius = scene.centre_and_radius()
    # Off-centre in a larger frame: the crop and the principal-point shift have to find it.
    image = photo(scene, OrbitPose(yaw, pitch, 2.6, (6.0, -4.0), 128), 128, RASTERIZER)
    recovered = recover_pose(scene.activated(), centre, radius, target_view(image, 96), RASTERIZER,
                             generator=torch.Generator().manual_seed(0))
    assert angle_error(recovered.pose.yaw_degrees, yaw) <= 5.0, recovered
    assert abs(recovered.pose.pitch_degrees - pitch) <= 5.0, recovered
    assert recovered.iou > 0.9


def perturbed(scene: GaussianSet, seed: int) -> GaussianSet:
    """Colours off by about 0.22 (per channel, standard deviation), opacities lowered, centres moved."""
    generator = torch.Generator().manual_seed(seed)
    count = len(scene)
    return scene.with_values(
        f_dc=scene.f_dc + torch.randn(count, 3, generator=generator) * 0.22 / SH_C0,
        opacity_logits=scene.opacity_logits - 3.0 * torch.rand(count, generator=generator),
        means=scene.means + torch.randn(count, 3, generator=generator) * 0.01,
    )


def test_refinement_recovers_the_input_view_and_keeps_held_out_views() -> None:
    truth = asymmetric_object()
    start = perturbed(truth, seed=1)
    centre, radius = truth.centre_and_radius()
    view = target_view(photo(truth, OrbitPose(35.0, 20.0, 2.6, (6.0, -4.0), 128), 128, RASTERIZER), 96)
    recovered = recover_pose(start.activated(), centre, radius, view, RASTERIZER,
                             generator=torch.Generator().manual_seed(0))
    settings = FitSettings(steps=150, attributes=frozenset({"colours", "opacities", "positions"}),
                           regularisation=GaussianRefinementParams().regularisation, resolution=64)
    result = fit_gaussians(start, [FitTarget(view, recovered.pose)], settings, RASTERIZER, centre)

    gain = result.after[0].psnr - result.before[0].psnr
    assert gain >= 10.0, (result.before, result.after)
    assert result.after[0].ssim > result.before[0].ssim
    assert 0 < result.steps <= 150
    # Views from the sides and the back, against the ground truth: no worse than before the fit.
    for yaw in (125.0, 215.0, 305.0):
        camera = camera_at(OrbitPose(yaw, 10.0, 2.6), centre, 64)
        with torch.no_grad():
            expected = RASTERIZER.render(truth.activated(), camera, torch.zeros(3))
            before = RASTERIZER.render(start.activated(), camera, torch.zeros(3)).colour
            after = RASTERIZER.render(result.gaussians.activated(), camera, torch.zeros(3)).colour
        region = object_region(expected.alpha, grow=1)
        loss = scores(before, expected.colour, region).psnr - scores(after, expected.colour, region).psnr
        assert loss <= 0.5, f"held-out view at yaw {yaw} lost {loss:.2f} dB"
    assert result.held_out and all(math.isfinite(h.scores.psnr) for h in result.held_out)


def test_only_the_chosen_attributes_move() -> None:
    truth = asymmetric_object(count=300)
    start = perturbed(truth, seed=2)
    centre, _ = truth.centre_and_radius()
    view = target_view(photo(truth, OrbitPose(0.0, 0.0, 2.6), 64, RASTERIZER), 48)
    settings = FitSettings(steps=5, attributes=frozenset({"colours"}), regularisation=1.0, resolution=48)
    result = fit_gaussians(start, [FitTarget(view, OrbitPose(0.0, 0.0, 2.1))], settings, RASTERIZER, centre)
    assert not torch.equal(result.gaussians.f_dc, start.f_dc)
    for name in ("means", "log_scales", "quats", "opacity_logits", "normals"):
        assert torch.equal(getattr(result.gaussians, name), getattr(start, name)), name


def test_lower_weight_novel_view_targets_correct_the_unseen_side() -> None:
    """The fit half of novel-view refinement: renders from around the object, as the refiner tier would return
    them (here the ground truth stands in for the refined views), added at NOVEL_VIEW_WEIGHT, correct the side
    no photo shows, which the photo alone cannot."""
    truth = asymmetric_object(count=300)
    start = perturbed(truth, seed=3)
    centre, _ = truth.centre_and_radius()
    photo_pose = OrbitPose(0.0, 10.0, 2.4)
    photo_target = FitTarget(render_target(truth, photo_pose, centre, 40, RASTERIZER), photo_pose)
    novel = [FitTarget(render_target(truth, pose, centre, 40, RASTERIZER), pose, NOVEL_VIEW_WEIGHT)
             for pose in novel_view_poses(photo_pose, 3)]  # yaw 90, 180, 270
    settings = FitSettings(steps=40, attributes=frozenset({"colours"}), regularisation=1.0, resolution=40)
    alone = fit_gaussians(start, [photo_target], settings, RASTERIZER, centre)
    helped = fit_gaussians(start, [photo_target, *novel], settings, RASTERIZER, centre)

    back = camera_at(OrbitPose(170.0, 10.0, 2.4), centre, 40)  # 10° off the nearest novel view
    with torch.no_grad():
        expected = RASTERIZER.render(truth.activated(), back, torch.zeros(3))
        region = object_region(expected.alpha, grow=1)

        def psnr(gaussians: GaussianSet) -> float:
            return scores(RASTERIZER.render(gaussians.activated(), back, torch.zeros(3)).colour, expected.colour,
                          region).psnr

        assert psnr(helped.gaussians) >= psnr(alone.gaussians) + 3.0
    assert helped.after[0].psnr > helped.before[0].psnr, "the photo is still fitted"


def test_the_stage_with_novel_views_corrects_the_side_no_photo_shows() -> None:
    """The two halves of a novel-view refinement as the TRELLIS service runs them (plan_novel_views, then
    refine_splats with the plan), with a perfect refiner standing in for the refiner tier (the ground truth rendered
    from the planned cameras): the back of the object comes out closer to the truth than with the photo alone, the
    photo is still fitted, and held-out views are reported."""
    truth = asymmetric_object(count=300)
    start = perturbed(truth, seed=3)
    centre, _ = truth.centre_and_radius()
    image = photo(truth, OrbitPose(0.0, 10.0, 2.4), 96, RASTERIZER)
    params = GaussianRefinementParams(enabled=True, steps=40, resolution=40, novel_views=True, opacities=False)
    context = JobContext("known-answer", None, lambda _: None)
    splats = start.to_splats()
    plan = plan_novel_views(splats, [image], params, context, seed=0)
    assert [round((pose.yaw_degrees - plan.cameras[0].pose.yaw_degrees) % 360) for pose in plan.poses] == [90, 180, 270]
    perfect = [photo(truth, pose, pose.size, RASTERIZER) for pose in plan.poses]
    helped = refine_splats(splats, [image], params, context, plan=replace(plan, renders=perfect))
    alone = refine_splats(splats, [image], params.model_copy(update={"novel_views": False}), context, seed=0)

    assert helped.report.novel_views == 3 and alone.report.novel_views == 0
    assert helped.report.views[0].after.psnr > helped.report.views[0].before.psnr
    assert helped.report.held_out, "two held-out views stay clear of the photo and the novel views"
    back = camera_at(OrbitPose(plan.cameras[0].pose.yaw_degrees + 170.0, 10.0, 2.4), centre, 40)
    with torch.no_grad():
        expected = RASTERIZER.render(truth.activated(), back, torch.zeros(3))
        region = object_region(expected.alpha, grow=1)

        def psnr(refined: SplatArrays) -> float:
            drawn = GaussianSet.from_splats(refined).activated()
            return scores(RASTERIZER.render(drawn, back, torch.zeros(3)).colour, expected.colour, region).psnr

        assert psnr(helped.splats) >= psnr(alone.splats) + 3.0


class _Stopped(Exception):
    pass


class _CountingRasterizer(TorchRasterizer):
    """Counts renders; once ``stop_after`` have run, the caller is gone (``check_stop`` raises)."""

    def __init__(self, stop_after: int | None) -> None:
        super().__init__()
        self.renders = 0
        self.stop_after = stop_after

    def render(self, *args: Any, **kwargs: Any) -> Any:
        self.renders += 1
        return super().render(*args, **kwargs)

    def check_stop(self) -> None:
        if self.stop_after is not None and self.renders >= self.stop_after:
            raise _Stopped


def _renders_after_a_stop(run: Callable[[_CountingRasterizer], object], first: int) -> list[int]:
    """Run once whole, then stopped at renders ``first``, 1, half-way and one before the end: how many renders
    each stopped run made after its stop."""
    whole = _CountingRasterizer(stop_after=None)
    run(whole)
    late = []
    for stop_after in sorted({first, 1, whole.renders // 2, whole.renders - 1}):
        stopped = _CountingRasterizer(stop_after)
        with pytest.raises(_Stopped):
            run(stopped)
        late.append(stopped.renders - stop_after)
    return late


def test_a_fit_stops_before_its_next_render_whatever_phase_it_is_in() -> None:
    """The reference renders before the first step and the scores after the last take as long as many steps at a
    high resolution: a caller that left is let go before the next render there too, not only between steps."""
    scene = asymmetric_object()
    centre, _ = scene.centre_and_radius()
    view = target_view(photo(scene, OrbitPose(35.0, 20.0, 2.6, (0.0, 0.0), 64), 64, RASTERIZER), 32)
    settings = FitSettings(steps=3, attributes=frozenset({"colours"}), regularisation=0.1, resolution=32)

    def fit(rasterizer: _CountingRasterizer) -> None:
        fit_gaussians(scene, [FitTarget(view, OrbitPose(35.0, 20.0, 2.6))], settings, rasterizer, centre,
                      check_stop=rasterizer.check_stop)

    # At the first render, in the reference renders, in a step, and in the scoring at the very end. Outside the
    # steps, no render after the stop; within one, at most the rest of that step (its views are one backward pass).
    assert max(_renders_after_a_stop(fit, first=3)) <= REGULARISER_VIEWS_PER_STEP


def test_a_camera_search_stops_before_its_next_render() -> None:
    """The search, its refinement and its last render each let a caller that left go at once (it used to need a
    first candidate, and finished its refinement and its last render first)."""
    scene = asymmetric_object()
    centre, radius = scene.centre_and_radius()
    view = target_view(photo(scene, OrbitPose(35.0, 20.0, 2.6, (0.0, 0.0), 64), 64, RASTERIZER), 32)

    def search(rasterizer: _CountingRasterizer) -> None:
        recover_pose(scene.activated(), centre, radius, view, rasterizer, check_stop=rasterizer.check_stop,
                     generator=torch.Generator().manual_seed(0))

    assert set(_renders_after_a_stop(search, first=0)) == {0}
