"""Photometric fit: move the chosen Gaussian attributes so that the renders from the recovered cameras match
the photos, while renders from other views stay close to the unrefined ones.

Loss per step: for each target view, 0.8 · L1 + 0.2 · (1 − SSIM) on the object (the photo's mask dilated by
two pixels), over a black or a white background in turn (so that colour and coverage cannot trade off), weighted
per view; plus ``regularisation`` × the L1 distance of renders from a ring of other views to the unrefined
renders (premultiplied colour and coverage). Adam, one learning rate per attribute, a fixed step budget, and
an early stop once the loss has not improved by :data:`EARLY_STOP_TOLERANCE` over :data:`EARLY_STOP_WINDOW`
steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from torch import Tensor

from trellis_service.gaussian_refinement.cameras import Camera, OrbitPose, PoseParameters, camera_at
from trellis_service.gaussian_refinement.gaussians import ATTRIBUTES, DrawnGaussians, GaussianSet
from trellis_service.gaussian_refinement.rasterizer import Rasterizer
from trellis_service.gaussian_refinement.views import TargetView

R = TypeVar("R")

SSIM_WEIGHT = 0.2
EARLY_STOP_WINDOW = 25
EARLY_STOP_TOLERANCE = 1e-3
#: Yaw offsets (from the first photo's camera) of the regularising ring and of the held-out views; they
#: interleave, so a held-out view is never one the regulariser saw.
REGULARISER_YAWS: tuple[float, ...] = (60.0, 120.0, 180.0, 240.0, 300.0)
HELD_OUT_YAWS: tuple[float, ...] = (90.0, 150.0, 210.0, 270.0)
HELD_OUT_PITCH_OFFSET = 15.0
#: Ring views closer than this (degrees of yaw) to a photo's camera are left to the photo, and closer than
#: :data:`NEAR_NOVEL_VIEW_DEGREES` to a novel view's (a lower-weight target) to the novel view.
NEAR_PHOTO_DEGREES = 40.0
NEAR_NOVEL_VIEW_DEGREES = 20.0
#: Step size of a photo's camera during the fit, relative to the camera recovery's.
CAMERA_RATE = 0.5
#: Regulariser views rendered per step (round robin).
REGULARISER_VIEWS_PER_STEP = 2


@dataclass(frozen=True)
class FitTarget:
    """One image the fit pulls towards: a photo (weight 1) or a refined novel view (lower weight)."""

    view: TargetView
    pose: OrbitPose
    weight: float = 1.0


@dataclass(frozen=True)
class ImageScores:
    """PSNR (dB) and SSIM of a render against a reference, on the object."""

    psnr: float
    ssim: float


@dataclass(frozen=True)
class HeldOutScores:
    """A view no target and no regulariser saw: the refined render against the unrefined one."""

    yaw_degrees: float
    pitch_degrees: float
    scores: ImageScores


@dataclass(frozen=True)
class FitResult:
    """The refined Gaussians and the figures before and after.

    Args:
        gaussians: The refined Gaussians (detached).
        steps: Optimiser steps taken.
        stopped_early: The loss stopped improving before the budget was spent.
        before: Per target, the unrefined render against the target.
        after: Per target, the refined render against the target.
        held_out: Per held-out view, refined against unrefined renders.
        poses: Per target, its camera at the end (a photo's moves with the fit).
    """

    gaussians: GaussianSet
    steps: int
    stopped_early: bool
    before: list[ImageScores]
    after: list[ImageScores]
    held_out: list[HeldOutScores]
    poses: list[OrbitPose]


@dataclass(frozen=True)
class FitSettings:
    """What the fit may move and how hard it may try.

    Args:
        steps: Optimiser step budget.
        attributes: Any of :data:`~trellis_service.gaussian_refinement.gaussians.ATTRIBUTES`.
        regularisation: Weight of the other-views term.
        resolution: Edge of the square renders the photos are compared at.
        refine_cameras: Let the photos' cameras move with the fit.
    """

    steps: int
    attributes: frozenset[str]
    regularisation: float
    resolution: int
    refine_cameras: bool = True


def learning_rates(gaussians: GaussianSet) -> dict[str, float]:
    """Adam step sizes per attribute. Positions move in units of the typical splat size."""
    typical_size = float(torch.exp(gaussians.log_scales.detach()).max(dim=1).values.median())
    return {"colours": 0.08, "opacities": 0.08, "positions": 0.075 * typical_size, "scales": 0.015}


_FIELDS = {"colours": "f_dc", "opacities": "opacity_logits", "positions": "means", "scales": "log_scales"}


# -- novel views -------------------------------------------------------------------------------------------

#: Weight of a refined novel view against a photo's 1 (docs/gaussian-refinement.md, "Novel views").
NOVEL_VIEW_WEIGHT = 0.3


def novel_view_poses(anchor: OrbitPose, count: int) -> list[OrbitPose]:
    """``count`` views evenly around the object from ``anchor`` (the first photo's camera), the photo's own
    direction left out: the sides nobody photographed."""
    step = 360.0 / (count + 1)
    return [OrbitPose((anchor.yaw_degrees + step * (k + 1)) % 360.0, anchor.pitch_degrees, anchor.distance)
            for k in range(count)]


def render_target(gaussians: GaussianSet, pose: OrbitPose, centre: Tensor, size: int, rasterizer: Rasterizer
                  ) -> TargetView:
    """The render from ``pose`` as a target view (colour un-premultiplied, coverage as the mask): what goes to
    the refiner tier, and, with the refined colours put back, what the fit pulls towards."""
    with torch.no_grad():
        render = rasterizer.render(gaussians.activated(), camera_at(pose, centre, size), torch.zeros_like(centre))
    alpha = render.alpha.clamp(0.0, 1.0)
    rgb = (render.colour / alpha.clamp_min(1e-3)[..., None]).clamp(0.0, 1.0)
    return TargetView(rgb=rgb, mask=alpha, source="render")


# -- image measures -----------------------------------------------------------------------------------------


def _window(size: int = 11, sigma: float = 1.5, *, like: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    return (kernel[:, None] * kernel[None, :]).expand(3, 1, size, size).contiguous()


def ssim_map(first: Tensor, second: Tensor) -> Tensor:
    """(H, W) SSIM (Wang et al. 2004; 11×11 Gaussian window, σ 1.5) of two (H, W, 3) images in [0, 1],
    averaged over the channels."""
    window = _window(like=first)
    x, y = first.permute(2, 0, 1)[None], second.permute(2, 0, 1)[None]

    def blur(image: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(image, window, padding=5, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value[0].mean(0)


def scores(render: Tensor, reference: Tensor, region: Tensor) -> ImageScores:
    """PSNR and SSIM of (H, W, 3) images on ``region`` ((H, W) weights)."""
    with torch.no_grad():
        total = region.sum().clamp_min(1e-6)
        mse = float((((render - reference) ** 2).mean(-1) * region).sum() / total)
        ssim = float((ssim_map(render, reference) * region).sum() / total)
    return ImageScores(psnr=10 * math.log10(1.0 / max(mse, 1e-10)), ssim=ssim)


def object_region(mask: Tensor, grow: int = 2) -> Tensor:
    """Where the object is, grown by ``grow`` pixels (silhouette errors count too)."""
    grown = torch.nn.functional.max_pool2d(mask[None, None], 2 * grow + 1, stride=1, padding=grow)[0, 0]
    return (grown > 0.01).to(mask.dtype)


# -- the fit ------------------------------------------------------------------------------------------------


def ring_poses(anchor: OrbitPose, yaw_offsets: Sequence[float], pitch_offset: float, seen: Sequence[FitTarget],
               size: int) -> list[OrbitPose]:
    """Orbit poses at ``yaw_offsets`` from ``anchor``, leaving out those near a target's camera."""
    poses = []
    for offset in yaw_offsets:
        yaw = (anchor.yaw_degrees + offset) % 360.0
        if any(abs((yaw - target.pose.yaw_degrees + 180.0) % 360.0 - 180.0)
               < (NEAR_PHOTO_DEGREES if target.weight >= 1.0 else NEAR_NOVEL_VIEW_DEGREES) for target in seen):
            continue
        pitch = max(-60.0, min(70.0, anchor.pitch_degrees + pitch_offset))
        poses.append(OrbitPose(yaw, pitch, anchor.distance, (0.0, 0.0), size))
    return poses


def fit_gaussians(gaussians: GaussianSet, targets: Sequence[FitTarget], settings: FitSettings,
                  rasterizer: Rasterizer, centre: Tensor, *, check_stop: Callable[[], None] = lambda: None,
                  on_step: Callable[[int, float], None] = lambda step, loss: None) -> FitResult:
    """Fit ``gaussians`` to ``targets`` (see the module doc).

    Args:
        gaussians: The unrefined Gaussians (not modified).
        targets: The photos (and refined novel views) with their recovered poses.
        settings: Step budget, attributes, regularisation weight and resolution.
        rasterizer: Renders every view.
        centre: (3,) the point the orbit cameras look at.
        check_stop: Called before every render, outside the steps too (the reference renders before the first
            step and the scores after the last take as long as many steps at a high resolution); it raises to
            abandon the fit when the caller went away (``JobContext.raise_if_stopped``).
        on_step: Called after each step with the step number and the loss.
    """
    unknown = set(settings.attributes) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {', '.join(ATTRIBUTES)}")
    size = settings.resolution
    original = gaussians.detached()
    views = [target.view.resized(size) for target in targets]
    cameras = [camera_at(target.pose, centre, size) for target in targets]
    regions = [object_region(view.mask) for view in views]
    weights = [target.weight for target in targets]
    # The ring turns around the first photo; views near any target (photo or novel view) are the target's.
    anchor = next((target.pose for target in targets if target.weight >= 1.0), targets[0].pose)
    seen = list(targets)
    small = max(16, size // 2)
    ring = [camera_at(pose, centre, small) for pose in ring_poses(anchor, REGULARISER_YAWS, 0.0, seen, small)]
    held_out_poses = ring_poses(anchor, HELD_OUT_YAWS, HELD_OUT_PITCH_OFFSET, seen, small)
    held_out = [camera_at(pose, centre, small) for pose in held_out_poses]
    black = torch.zeros(3, dtype=centre.dtype, device=centre.device)
    white = torch.ones_like(black)

    def checked(renders: Iterable[Callable[[], R]]) -> list[R]:
        results = []
        for render in renders:
            check_stop()
            results.append(render())
        return results

    with torch.no_grad():
        drawn = original.activated()
        ring_reference = checked(partial(_premultiplied, rasterizer, drawn, camera, black) for camera in ring)
        held_out_reference = checked(partial(_premultiplied, rasterizer, drawn, camera, black) for camera in held_out)
        before = checked(partial(_target_scores, rasterizer, drawn, camera, view, region, black)
                         for camera, view, region in zip(cameras, views, regions, strict=True))

    moving = {name: getattr(original, _FIELDS[name]).clone().requires_grad_(True)
              for name in ATTRIBUTES if name in settings.attributes}
    rates = learning_rates(original)
    groups: list[dict[str, Any]] = [{"params": [tensor], "lr": rates[name]} for name, tensor in moving.items()]
    # A photo's recovered camera keeps moving with the fit (its silhouette left it a degree or two off); a
    # novel view's camera is exact.
    posed = {index: PoseParameters(target.pose, size, centre) for index, target in enumerate(targets)
             if settings.refine_cameras and target.weight >= 1.0}
    for parameters in posed.values():
        groups.extend(parameters.groups(CAMERA_RATE))
    optimiser = torch.optim.Adam(groups)
    step = 0
    best_loss = math.inf
    best_step = 0
    previous = math.inf
    stopped_early = False
    while step < settings.steps and moving:
        check_stop()
        current = original.with_values(**{_FIELDS[name]: tensor for name, tensor in moving.items()})
        drawn = current.activated()
        background = black if step % 2 == 0 else white
        loss = torch.zeros((), dtype=centre.dtype, device=centre.device)
        for index, (camera, view, region, weight) in enumerate(zip(cameras, views, regions, weights, strict=True)):
            if index in posed:
                camera = posed[index].camera(centre)
            render = rasterizer.render(drawn, camera, background).colour
            target = view.rgb * view.mask[..., None] + background * (1.0 - view.mask[..., None])
            loss = loss + weight * _photometric(render, target, region)
        loss = loss / sum(weights)
        if ring and settings.regularisation > 0:
            picks = [(step * REGULARISER_VIEWS_PER_STEP + k) % len(ring)
                     for k in range(min(REGULARISER_VIEWS_PER_STEP, len(ring)))]
            drift = torch.stack([_drift(rasterizer, drawn, ring[k], ring_reference[k], black) for k in picks])
            loss = loss + settings.regularisation * drift.mean()
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        step += 1
        value = float(loss.detach())
        on_step(step, value)
        # Judge the mean of the last two steps: the background alternates, and so does the loss.
        pair = 0.5 * (value + previous) if step > 1 else value
        previous = value
        if pair < best_loss * (1.0 - EARLY_STOP_TOLERANCE):
            best_loss, best_step = pair, step
        elif step - best_step >= EARLY_STOP_WINDOW:
            stopped_early = True
            break

    refined = original.with_values(**{_FIELDS[name]: tensor.detach() for name, tensor in moving.items()})
    poses = [posed[index].pose() if index in posed else target.pose for index, target in enumerate(targets)]
    cameras = [camera_at(pose, centre, size) for pose in poses]
    with torch.no_grad():
        drawn = refined.activated()
        after = checked(partial(_target_scores, rasterizer, drawn, camera, view, region, black)
                        for camera, view, region in zip(cameras, views, regions, strict=True))
        held = []
        for pose, camera, (colour, alpha) in zip(held_out_poses, held_out, held_out_reference, strict=True):
            check_stop()
            render_colour, render_alpha = _premultiplied(rasterizer, drawn, camera, black)
            region = object_region(torch.maximum(alpha, render_alpha), grow=0)
            held.append(HeldOutScores(pose.yaw_degrees, pose.pitch_degrees, scores(render_colour, colour, region)))
    return FitResult(gaussians=refined, steps=step, stopped_early=stopped_early, before=before, after=after,
                     held_out=held, poses=poses)


def _photometric(render: Tensor, target: Tensor, region: Tensor) -> Tensor:
    total = region.sum().clamp_min(1.0)
    l1 = ((render - target).abs().mean(-1) * region).sum() / total
    dssim = 1.0 - (ssim_map(render, target) * region).sum() / total
    return (1.0 - SSIM_WEIGHT) * l1 + SSIM_WEIGHT * dssim


def _premultiplied(rasterizer: Rasterizer, drawn: DrawnGaussians, camera: Camera, black: Tensor
                   ) -> tuple[Tensor, Tensor]:
    render = rasterizer.render(drawn, camera, black)
    return render.colour, render.alpha


def _drift(rasterizer: Rasterizer, drawn: DrawnGaussians, camera: Camera, reference: tuple[Tensor, Tensor],
           black: Tensor) -> Tensor:
    colour, alpha = _premultiplied(rasterizer, drawn, camera, black)
    ref_colour, ref_alpha = reference
    region = object_region(torch.maximum(alpha.detach(), ref_alpha), grow=0)
    total = region.sum().clamp_min(1.0)
    return (((colour - ref_colour).abs().mean(-1) + (alpha - ref_alpha).abs()) * region).sum() / total


def _target_scores(rasterizer: Rasterizer, drawn: DrawnGaussians, camera: Camera, view: TargetView, region: Tensor,
                   black: Tensor) -> ImageScores:
    colour, _ = _premultiplied(rasterizer, drawn, camera, black)
    return scores(colour, view.rgb * view.mask[..., None], region)

