"""The refinement stage as the backends run it: splats and the input images in, refined splats and the report
out, with progress, cancellation and timing through the job's context."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from trellis_service.exporters import SplatArrays
from trellis_service.gaussian_refinement.cameras import OrbitPose
from trellis_service.gaussian_refinement.fit import FitSettings, FitTarget, HeldOutScores, ImageScores, fit_gaussians
from trellis_service.gaussian_refinement.gaussians import GaussianSet
from trellis_service.gaussian_refinement.novel_views import (
    NOVEL_VIEW_COUNT,
    NovelViewPlan,
    novel_view_size,
    novel_view_targets,
    plan_poses,
    render_novel_views,
)
from trellis_service.gaussian_refinement.pose import RecoveredPose, recover_pose
from trellis_service.gaussian_refinement.rasterizer import Rasterizer, choose_rasterizer
from trellis_service.gaussian_refinement.views import TargetView, target_view
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.kinds import Stage
from trellisbox._domain.params import GaussianRefinementParams
from trellisbox._runtime.worker import JobContext

_log = logging.getLogger(__name__)

#: Progress events during the fit: about this many, whatever the step budget.
PROGRESS_EVENTS = 30


@dataclass(frozen=True)
class ViewReport:
    """One input image: its camera (recovered, then refined with the fit), the silhouette overlap at recovery,
    and the fit's figures ("before" at the recovered camera, "after" at the refined one)."""

    image_index: int
    pose: OrbitPose
    silhouette_iou: float
    before: ImageScores
    after: ImageScores


@dataclass(frozen=True)
class RefinementReport:
    """What the refinement did (the done message carries it)."""

    views: list[ViewReport]
    held_out: list[HeldOutScores]
    steps: int
    stopped_early: bool
    gaussians: int
    resolution: int
    rasterizer: str
    novel_views: int = 0


@dataclass(frozen=True)
class RefinedSplats:
    splats: SplatArrays
    report: RefinementReport


def plan_novel_views(splats: SplatArrays, images: list[Image.Image], params: GaussianRefinementParams,
                     ctx: JobContext, *, seed: int = 0, device: str = "cpu") -> NovelViewPlan:
    """The first half of a novel-view refinement: recover each image's camera, then render the novel views around
    the first one (what the refiner tier refines). Same arguments and errors as :func:`refine_splats`."""
    gaussians = _checked(splats, params, device)
    rasterizer = choose_rasterizer(device)
    centre, radius = gaussians.centre_and_radius()
    total = len(images) + 1
    views = [target_view(image, params.resolution, device) for image in images]
    cameras = _recover_cameras(gaussians, centre, radius, views, ctx, rasterizer, seed, total)
    ctx.report(Stage.GAUSSIAN_REFINEMENT, len(images), total, f"rendering {NOVEL_VIEW_COUNT} novel views")
    poses = plan_poses(cameras[0].pose, novel_view_size(params.resolution))
    renders = render_novel_views(gaussians, centre, poses, rasterizer, ctx.raise_if_stopped)
    ctx.raise_if_stopped()
    return NovelViewPlan(cameras=cameras, poses=poses, renders=renders)


def refine_splats(splats: SplatArrays, images: list[Image.Image], params: GaussianRefinementParams, ctx: JobContext,
                  *, seed: int = 0, device: str = "cpu", plan: NovelViewPlan | None = None) -> RefinedSplats:
    """Recover each image's camera, then fit the splats to the images (docs/gaussian-refinement.md).

    Args:
        splats: The generated Gaussians, in the y-up PLY frame.
        images: The images generation used (refined ones when refinement ran).
        params: The request's refinement parameters (``enabled`` is the caller's to check).
        ctx: Progress (stage ``GAUSSIAN_REFINEMENT``) and cancellation.
        seed: Makes the camera search's Gaussian subset repeatable.
        device: Where to compute (``cuda`` picks gsplat when it is installed).
        plan: The second half of a novel-view refinement: the cameras :func:`plan_novel_views` recovered (not
            searched again) and, as its ``renders``, the novel views as the refiner tier returned them, fitted
            at :data:`~trellis_service.gaussian_refinement.fit.NOVEL_VIEW_WEIGHT`.

    Raises:
        InvalidInput: no attribute may move, there are no Gaussians, or ``plan`` does not fit the request.
        Cancelled / DeadlineExceeded: from ``ctx`` when the caller went away.
    """
    gaussians = _checked(splats, params, device)
    rasterizer = choose_rasterizer(device)
    centre, radius = gaussians.centre_and_radius()
    total = len(images) + params.steps
    views = [target_view(image, params.resolution, device) for image in images]
    if plan is None:
        cameras = _recover_cameras(gaussians, centre, radius, views, ctx, rasterizer, seed, total)
        extra: list[FitTarget] = []
    else:
        if len(plan.cameras) != len(images):
            raise InvalidInput(f"hand_over: {len(plan.cameras)} camera(s) for {len(images)} image(s)")
        cameras = plan.cameras
        ctx.report(Stage.GAUSSIAN_REFINEMENT, len(images), total, f"{len(plan.renders)} refined novel views")
        extra = novel_view_targets(gaussians, centre, plan.poses, plan.renders, rasterizer, params.resolution,
                                   ctx.raise_if_stopped)
    targets = [FitTarget(view, camera.pose) for view, camera in zip(views, cameras, strict=True)]
    every = max(1, params.steps // PROGRESS_EVENTS)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0:
            ctx.report(Stage.GAUSSIAN_REFINEMENT, len(images) + step, total, f"fitting: step {step}, loss {loss:.4f}")

    settings = FitSettings(steps=params.steps, attributes=params.attributes, regularisation=params.regularisation,
                           resolution=params.resolution)
    result = fit_gaussians(gaussians, [*targets, *extra], settings, rasterizer, centre,
                           check_stop=ctx.raise_if_stopped, on_step=on_step)
    ctx.raise_if_stopped()
    ctx.report(Stage.GAUSSIAN_REFINEMENT, total, total, f"fitted in {result.steps} steps"
               + (" (the loss stopped improving)" if result.stopped_early else ""))
    # The report covers the input images; the novel views' figures are not the user's (they follow the targets).
    reports = [ViewReport(index, pose, camera.iou, before, after) for index, (pose, camera, before, after)
               in enumerate(zip(result.poses, cameras, result.before, result.after, strict=False))]
    report = RefinementReport(views=reports, held_out=result.held_out, steps=result.steps,
                              stopped_early=result.stopped_early, gaussians=len(gaussians),
                              resolution=params.resolution, rasterizer=rasterizer.name, novel_views=len(extra))
    return RefinedSplats(splats=result.gaussians.to_splats(), report=report)


def _checked(splats: SplatArrays, params: GaussianRefinementParams, device: str) -> GaussianSet:
    if not params.attributes:
        raise InvalidInput("generation.gaussian_refinement: no attribute may move; allow at least one of "
                           "colours, opacities, positions, scales")
    if len(splats.xyz) == 0:
        raise InvalidInput("generation.gaussian_refinement: the generated asset has no Gaussians to refine")
    return GaussianSet.from_splats(splats, device)


def _recover_cameras(gaussians: GaussianSet, centre: Tensor, radius: float, views: list[TargetView],
                     ctx: JobContext, rasterizer: Rasterizer, seed: int, total: int) -> list[RecoveredPose]:
    """Each image's camera, by silhouette search then gradient refinement (``pose.recover_pose``)."""
    generator = torch.Generator().manual_seed(seed)
    cameras = []
    for index, view in enumerate(views):
        ctx.report(Stage.GAUSSIAN_REFINEMENT, index, total, f"recovering the camera of image {index + 1}")
        recovered = recover_pose(gaussians.activated(), centre, radius, view, rasterizer,
                                 check_stop=ctx.raise_if_stopped, generator=generator)
        ctx.raise_if_stopped()
        _log.info("image %d: yaw %.1f° pitch %.1f° distance %.3f, silhouette IoU %.3f", index,
                  recovered.pose.yaw_degrees, recovered.pose.pitch_degrees, recovered.pose.distance, recovered.iou)
        cameras.append(recovered)
    return cameras
