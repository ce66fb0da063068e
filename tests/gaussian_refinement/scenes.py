"""A small synthetic Gaussian scene with a known answer: an object that looks different from every side."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from trellis_service.exporters import SH_C0
from trellis_service.gaussian_refinement.cameras import OrbitPose, camera_at
from trellis_service.gaussian_refinement.gaussians import GaussianSet
from trellis_service.gaussian_refinement.rasterizer import Rasterizer


def _box_surface(rng: np.random.Generator, low: tuple[float, float, float], high: tuple[float, float, float],
                 count: int) -> np.ndarray:
    """``count`` points on the surface of an axis-aligned box, spread by face area."""
    lo, hi = np.array(low), np.array(high)
    size = hi - lo
    areas = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]] * 2)
    faces = rng.choice(6, size=count, p=areas / areas.sum())
    points = lo + rng.random((count, 3)) * size
    axis = faces % 3
    points[np.arange(count), axis] = np.where(faces < 3, lo[axis], hi[axis])
    return points


def asymmetric_object(count: int = 700, seed: int = 0) -> GaussianSet:
    """A body, an arm out to one side and a nub on top towards the front, coloured by position (a smooth
    gradient plus a checker), so that silhouette and colours both tell the sides apart."""
    rng = np.random.default_rng(seed)
    parts = [((-0.35, -0.4, -0.2), (0.25, 0.4, 0.2), 0.55), ((0.25, -0.05, -0.12), (0.6, 0.12, 0.12), 0.2),
             ((-0.3, 0.4, 0.0), (-0.05, 0.6, 0.2), 0.25)]
    points = np.concatenate([_box_surface(rng, low, high, round(count * share)) for low, high, share in parts])
    n = len(points)
    checker = ((np.floor(points[:, 0] * 6) + np.floor(points[:, 1] * 6) + np.floor(points[:, 2] * 6)) % 2)
    colours = np.stack([0.2 + 0.6 * (points[:, 0] + 0.4), 0.3 + 0.5 * (points[:, 1] + 0.4) * 0.8,
                        0.25 + 0.5 * checker], axis=1).clip(0.05, 0.95)
    spacing = math.sqrt(2.2 / n)  # about the surface area per splat
    f32 = np.float32
    return GaussianSet(
        means=torch.as_tensor(points.astype(f32)),
        log_scales=torch.full((n, 3), math.log(0.7 * spacing)),
        quats=torch.as_tensor(np.tile([1.0, 0.0, 0.0, 0.0], (n, 1)).astype(f32)),
        opacity_logits=torch.full((n,), math.log(0.95 / 0.05)),
        f_dc=torch.as_tensor(((colours - 0.5) / SH_C0).astype(f32)),
        normals=torch.zeros(n, 3),
    )


def photo(gaussians: GaussianSet, pose: OrbitPose, size: int, rasterizer: Rasterizer) -> Image.Image:
    """An RGBA photo of the scene from ``pose`` (un-premultiplied colours, alpha from coverage)."""
    centre, _ = gaussians.centre_and_radius()
    with torch.no_grad():
        render = rasterizer.render(gaussians.activated(), camera_at(pose, centre, size), torch.zeros(3))
    alpha = render.alpha.clamp(0, 1)
    rgb = (render.colour / alpha.clamp_min(1e-3)[..., None]).clamp(0, 1)
    rgba = torch.cat([rgb, alpha[..., None]], dim=-1).numpy()
    return Image.fromarray(np.round(rgba * 255).astype(np.uint8), "RGBA")


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, torch's thread pool fighting other processes is many
    times slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
