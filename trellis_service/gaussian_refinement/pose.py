"""Camera recovery: where was the photo taken from, relative to the generated object?

1. Coarse search: render the silhouette from a grid of yaws and pitches at one reference distance. For each,
   the distance that matches the photo's silhouette area and the principal-point shift that matches its
   centroid follow in closed form (the render is scaled and shifted accordingly, one batched resample for
   the whole grid), and the candidate is scored by silhouette IoU with the photo's mask. Silhouettes seen
   from opposite sides are near mirror images, so among candidates within :data:`TIE_IOU` of the best the
   one whose colours match the photo best wins.
2. Gradient refinement of yaw, pitch, distance and shift on a soft-IoU loss through the rasteriser.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from trellis_service.gaussian_refinement.cameras import OrbitPose, PoseParameters, camera_at, orbit_camera
from trellis_service.gaussian_refinement.gaussians import DrawnGaussians
from trellis_service.gaussian_refinement.rasterizer import Rasterizer
from trellis_service.gaussian_refinement.views import TargetView

#: Silhouette resolution of the search.
SEARCH_SIZE = 40
YAW_STEP_DEGREES = 20.0
PITCHES_DEGREES: tuple[float, ...] = (-30.0, -15.0, 0.0, 15.0, 30.0, 45.0, 60.0)
#: Gaussians drawn during the search and the pose refinement (a random subset, splats enlarged to keep the
#: silhouette closed); the reported IoU is measured with all of them.
SEARCH_GAUSSIANS = 2000
REFINE_GAUSSIANS = 6000
#: Candidates this close to the best IoU are told apart by colour.
TIE_IOU = 0.03
REFINE_STEPS = 30
REFINE_SIZE = 64


@dataclass(frozen=True)
class RecoveredPose:
    """The recovered camera of one photo, and how well the object's silhouette overlaps the photo's mask."""

    pose: OrbitPose
    iou: float


def soft_iou(alpha: Tensor, mask: Tensor) -> Tensor:
    """Σ min / Σ max over the last two dimensions: 1 for identical silhouettes."""
    inter = torch.minimum(alpha, mask).sum(dim=(-2, -1))
    union = torch.maximum(alpha, mask).sum(dim=(-2, -1)).clamp_min(1e-6)
    return inter / union


def recover_pose(gaussians: DrawnGaussians, centre: Tensor, radius: float, view: TargetView,
                 rasterizer: Rasterizer, *, check_stop: Callable[[], None] = lambda: None,
                 generator: torch.Generator | None = None) -> RecoveredPose:
    """The orbit pose from which ``gaussians`` look most like ``view`` (see the module doc).

    Args:
        gaussians: The generated object (drawn form).
        centre: (3,) the point the orbit camera looks at.
        radius: The object's radius around ``centre`` (sets the reference distance).
        view: The photo's target view.
        rasterizer: Renders the candidates.
        check_stop: Called before every render; it raises to abandon the search when the caller went away
            (``JobContext.raise_if_stopped``).
        generator: Chooses the search subset (seeded for repeatable results).
    """
    coarse = _coarse_search(gaussians, centre, radius, view, rasterizer, check_stop, generator)
    refined = _refine(_subset(gaussians, REFINE_GAUSSIANS, generator), centre, view, rasterizer, coarse, check_stop)
    check_stop()
    with torch.no_grad():
        camera = camera_at(refined, centre, REFINE_SIZE)
        alpha = rasterizer.render(gaussians, camera, torch.zeros_like(centre)).alpha
    return RecoveredPose(pose=refined, iou=float(soft_iou(alpha, view.resized(REFINE_SIZE).mask)))


def _subset(gaussians: DrawnGaussians, limit: int, generator: torch.Generator | None) -> DrawnGaussians:
    count = len(gaussians)
    if count <= limit:
        return gaussians
    index = torch.randperm(count, generator=generator, device="cpu")[:limit].to(gaussians.means.device)
    return gaussians.subset(index, scale_factor=math.sqrt(count / limit))


def _coarse_search(gaussians: DrawnGaussians, centre: Tensor, radius: float, view: TargetView,
                   rasterizer: Rasterizer, check_stop: Callable[[], None],
                   generator: torch.Generator | None) -> OrbitPose:
    size = SEARCH_SIZE
    target = view.resized(size)
    drawn = _subset(gaussians, SEARCH_GAUSSIANS, generator)
    device, dtype = centre.device, centre.dtype
    # Far enough that the whole object is in view from any side.
    reference = radius / math.sin(math.radians(20.0)) * 1.2
    black = torch.zeros(3, dtype=dtype, device=device)
    candidates: list[tuple[float, float]] = []
    alphas: list[Tensor] = []
    colours: list[Tensor] = []
    with torch.no_grad():
        for pitch in PITCHES_DEGREES:
            for step in range(round(360 / YAW_STEP_DEGREES)):
                check_stop()
                yaw = step * YAW_STEP_DEGREES
                camera = orbit_camera(torch.tensor(math.radians(yaw), dtype=dtype, device=device),
                                      torch.tensor(math.radians(pitch), dtype=dtype, device=device),
                                      torch.tensor(reference, dtype=dtype, device=device),
                                      torch.zeros(2, dtype=dtype, device=device), centre, size)
                render = rasterizer.render(drawn, camera, black)
                candidates.append((yaw, pitch))
                alphas.append(render.alpha)
                colours.append(render.colour)
        alpha = torch.stack(alphas)  # (C, S, S)
        colour = torch.stack(colours)  # (C, S, S, 3), premultiplied (black background)
        scale, shift = _alignment(alpha, target.mask)
        warped = _warp(torch.cat([alpha[:, None], colour.permute(0, 3, 1, 2)], dim=1), scale, shift)
        iou = soft_iou(warped[:, 0], target.mask)
        best = float(iou.max())
        tied = torch.nonzero(iou >= best - TIE_IOU).squeeze(1)
        premultiplied_target = (target.rgb * target.mask[..., None]).permute(2, 0, 1)
        weight = torch.maximum(warped[tied, 0], target.mask)[:, None]
        error = ((warped[tied, 1:] - premultiplied_target).abs() * weight).sum(dim=(1, 2, 3))
        chosen = int(tied[int(torch.argmin(error))])
    yaw, pitch = candidates[chosen]
    return OrbitPose(yaw_degrees=yaw, pitch_degrees=pitch, distance=reference / float(scale[chosen]),
                     offset=(float(shift[chosen, 0]), float(shift[chosen, 1])), size=size)


def _alignment(alpha: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per render, the zoom about the image centre and the shift (pixels) that give it the mask's area and
    centroid."""
    size = mask.shape[-1]
    coords = torch.arange(size, dtype=mask.dtype, device=mask.device) + 0.5

    def moments(image: Tensor) -> tuple[Tensor, Tensor]:
        area = image.sum(dim=(-2, -1)).clamp_min(1e-6)
        cx = (image.sum(dim=-2) * coords).sum(-1) / area
        cy = (image.sum(dim=-1) * coords).sum(-1) / area
        return area, torch.stack([cx, cy], dim=-1)

    area, centroid = moments(alpha)
    target_area, target_centroid = moments(mask)
    scale = torch.sqrt(target_area / area).clamp(0.2, 5.0)
    middle = size / 2
    shift = target_centroid - middle - scale[:, None] * (centroid - middle)
    return scale, shift


def _warp(images: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """(C, K, S, S) images zoomed by ``scale`` about the centre, then shifted by ``shift`` pixels."""
    size = images.shape[-1]
    theta = torch.zeros(len(images), 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = -(2.0 * shift / size) / scale[:, None]
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def _refine(gaussians: DrawnGaussians, centre: Tensor, view: TargetView, rasterizer: Rasterizer,
            start: OrbitPose, check_stop: Callable[[], None]) -> OrbitPose:
    target = view.resized(REFINE_SIZE)
    drawn = DrawnGaussians(*(t.detach() for t in (gaussians.means, gaussians.quats, gaussians.scales,
                                                  gaussians.opacities, gaussians.colours)))
    parameters = PoseParameters(start, REFINE_SIZE, centre)
    optimiser = torch.optim.Adam(parameters.groups())  # type: ignore[arg-type]
    black = torch.zeros_like(centre)
    best = (-1.0, start)
    for _ in range(REFINE_STEPS + 1):
        check_stop()
        iou = soft_iou(rasterizer.render(drawn, parameters.camera(centre), black).alpha, target.mask)
        if float(iou.detach()) > best[0]:
            best = (float(iou.detach()), parameters.pose())
        optimiser.zero_grad()
        (1.0 - iou).backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    return best[1]
