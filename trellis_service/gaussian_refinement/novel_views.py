"""Novel views: renders from around the object that the refiner tier improves, fitted as lower-weight targets.

The TRELLIS service renders them (:func:`render_novel_views`) at the end of the first call of a novel-view
refinement; the gateway has the refiner tier refine them; the second call turns each refined view into a target
(:func:`novel_view_targets`). See docs/gaussian-refinement.md, "Novel views".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from trellis_service.gaussian_refinement.cameras import OrbitPose
from trellis_service.gaussian_refinement.fit import NOVEL_VIEW_WEIGHT, FitTarget, novel_view_poses, render_target
from trellis_service.gaussian_refinement.gaussians import GaussianSet
from trellis_service.gaussian_refinement.pose import RecoveredPose
from trellis_service.gaussian_refinement.rasterizer import Rasterizer
from trellis_service.gaussian_refinement.views import TargetView
from trellisbox._domain.errors import InvalidInput

#: Views rendered around the object: every 90° of yaw from the first image's camera, its own direction left out.
#: Three leave the fit's held-out views (150° and 210°, fit.HELD_OUT_YAWS) 30° from the nearest novel view.
NOVEL_VIEW_COUNT = 3
#: Edge of the novel views in pixels: what an image refiner works well at, and still cheap to render on a CPU.
NOVEL_VIEW_MIN_SIZE = 256
NOVEL_VIEW_MAX_SIZE = 512


@dataclass(frozen=True)
class NovelViewPlan:
    """What the first call found and rendered.

    Args:
        cameras: Per input image, its recovered camera and silhouette overlap.
        poses: Per novel view, the camera it is rendered from.
        renders: Per novel view, the render (RGBA: the object's coverage in alpha).
    """

    cameras: list[RecoveredPose]
    poses: list[OrbitPose]
    renders: list[Image.Image]


def novel_view_size(resolution: int) -> int:
    """The novel views' edge for a fit at ``resolution``: twice it, within what a refiner works well at, and a
    multiple of 8 (the SDXL VAE's scale: the refiner then works at exactly this size)."""
    return min(NOVEL_VIEW_MAX_SIZE, max(NOVEL_VIEW_MIN_SIZE, 2 * resolution)) // 8 * 8


def plan_poses(anchor: OrbitPose, size: int) -> list[OrbitPose]:
    """The novel views' cameras around ``anchor`` (the first image's), centred, at ``size`` pixels."""
    return [OrbitPose(pose.yaw_degrees, pose.pitch_degrees, pose.distance, (0.0, 0.0), size)
            for pose in novel_view_poses(anchor, NOVEL_VIEW_COUNT)]


def render_novel_views(gaussians: GaussianSet, centre: Tensor, poses: Sequence[OrbitPose], rasterizer: Rasterizer,
                       check_stop: Callable[[], None] = lambda: None) -> list[Image.Image]:
    """The unrefined renders the refiner tier gets, as RGBA images at each pose's size; ``check_stop`` is called
    before each render and raises to abandon them (a caller gone)."""
    images = []
    for pose in poses:
        check_stop()
        view = render_target(gaussians, pose, centre, pose.size, rasterizer)
        rgba = torch.cat([view.rgb, view.mask[..., None]], dim=-1).clamp(0.0, 1.0)
        pixels = np.round(rgba.detach().cpu().numpy() * 255.0).astype(np.uint8)
        images.append(Image.fromarray(pixels, mode="RGBA"))
    return images


def novel_view_targets(gaussians: GaussianSet, centre: Tensor, poses: Sequence[OrbitPose],
                       refined: Sequence[Image.Image], rasterizer: Rasterizer, size: int,
                       check_stop: Callable[[], None] = lambda: None) -> list[FitTarget]:
    """The refined views as fit targets at :data:`NOVEL_VIEW_WEIGHT`, at ``size`` pixels (the fit's resolution):
    their colours, on the coverage of the unrefined Gaussians from the same camera (rendered here, so a refiner that
    drops or alters alpha, or paints outside the object, changes nothing but the colours on it). ``check_stop`` as
    in :func:`render_novel_views`.

    Raises:
        InvalidInput: a refined view does not have its render's size.
    """
    if len(refined) != len(poses):
        raise InvalidInput(f"novel_views: {len(refined)} image(s) for {len(poses)} novel-view camera(s)")
    targets = []
    for index, (pose, image) in enumerate(zip(poses, refined, strict=True)):
        if image.size != (pose.size, pose.size):
            raise InvalidInput(f"novel_views[{index}]: {image.width}x{image.height}, but it was rendered at "
                               f"{pose.size}x{pose.size}")
        check_stop()
        coverage = render_target(gaussians, pose, centre, size, rasterizer).mask
        colours = image.convert("RGB").resize((size, size), Image.Resampling.BOX)
        rgb = torch.as_tensor(np.asarray(colours, dtype=np.float32) / 255.0, device=centre.device)
        targets.append(FitTarget(TargetView(rgb, coverage, "novel view"), pose, NOVEL_VIEW_WEIGHT))
    return targets
