"""The refinement stage as the backends run it: splats and the input images in, refined splats and the report
out, with progress, cancellation and timing through the job's context."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image

from trellis_service.exporters import SplatArrays
from trellis_service.gaussian_refinement.cameras import OrbitPose
from trellis_service.gaussian_refinement.fit import FitSettings, FitTarget, HeldOutScores, ImageScores, fit_gaussians
from trellis_service.gaussian_refinement.gaussians import GaussianSet
from trellis_service.gaussian_refinement.pose import recover_pose
from trellis_service.gaussian_refinement.rasterizer import choose_rasterizer
from trellis_service.gaussian_refinement.views import target_view
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


@dataclass(frozen=True)
class RefinedSplats:
    splats: SplatArrays
    report: RefinementReport


def refine_splats(splats: SplatArrays, images: list[Image.Image], params: GaussianRefinementParams, ctx: JobContext,
                  *, seed: int = 0, device: str = "cpu") -> RefinedSplats:
    """Recover each image's camera, then fit the splats to the images (docs/gaussian-refinement.md).

    Args:
        splats: The generated Gaussians, in the y-up PLY frame.
        images: The images generation used (refined ones when refinement ran).
        params: The request's refinement parameters (``enabled`` is the caller's to check).
        ctx: Progress (stage ``GAUSSIAN_REFINEMENT``) and cancellation.
        seed: Makes the camera search's Gaussian subset repeatable.
        device: Where to compute (``cuda`` picks gsplat when it is installed).

    Raises:
        InvalidInput: no attribute may move, or there are no Gaussians.
        Cancelled / DeadlineExceeded: from ``ctx`` when the caller went away.
    """
    if not params.attributes:
        raise InvalidInput("generation.gaussian_refinement: no attribute may move; allow at least one of "
                           "colours, opacities, positions, scales")
    if len(splats.xyz) == 0:
        raise InvalidInput("generation.gaussian_refinement: the generated asset has no Gaussians to refine")
    gaussians = GaussianSet.from_splats(splats, device)
    rasterizer = choose_rasterizer(device)
    centre, radius = gaussians.centre_and_radius()
    total = len(images) + params.steps
    generator = torch.Generator().manual_seed(seed)
    targets: list[FitTarget] = []
    ious: list[float] = []
    for index, image in enumerate(images):
        ctx.report(Stage.GAUSSIAN_REFINEMENT, index, total, f"recovering the camera of image {index + 1}")
        view = target_view(image, params.resolution, device)
        recovered = recover_pose(gaussians.activated(), centre, radius, view, rasterizer,
                                 should_stop=lambda: ctx.should_stop, generator=generator)
        ctx.raise_if_stopped()
        _log.info("image %d: yaw %.1f° pitch %.1f° distance %.3f, silhouette IoU %.3f", index,
                  recovered.pose.yaw_degrees, recovered.pose.pitch_degrees, recovered.pose.distance, recovered.iou)
        targets.append(FitTarget(view, recovered.pose))
        ious.append(recovered.iou)
    every = max(1, params.steps // PROGRESS_EVENTS)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0:
            ctx.report(Stage.GAUSSIAN_REFINEMENT, len(images) + step, total, f"fitting: step {step}, loss {loss:.4f}")

    settings = FitSettings(steps=params.steps, attributes=params.attributes, regularisation=params.regularisation,
                           resolution=params.resolution)
    result = fit_gaussians(gaussians, targets, settings, rasterizer, centre, should_stop=lambda: ctx.should_stop,
                           on_step=on_step)
    ctx.raise_if_stopped()
    ctx.report(Stage.GAUSSIAN_REFINEMENT, total, total, f"fitted in {result.steps} steps"
               + (" (the loss stopped improving)" if result.stopped_early else ""))
    views = [ViewReport(index, pose, iou, before, after) for index, (pose, iou, before, after)
             in enumerate(zip(result.poses, ious, result.before, result.after, strict=True))]
    report = RefinementReport(views=views, held_out=result.held_out, steps=result.steps,
                              stopped_early=result.stopped_early, gaussians=len(gaussians),
                              resolution=params.resolution, rasterizer=rasterizer.name)
    return RefinedSplats(splats=result.gaussians.to_splats(), report=report)
