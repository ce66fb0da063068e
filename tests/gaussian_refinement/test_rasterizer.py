"""The PyTorch rasteriser against a direct per-pixel evaluation of the 3DGS model, and its camera convention."""

from __future__ import annotations

import math

import torch

from trellis_service.gaussian_refinement.cameras import Camera, OrbitPose, camera_at, orbit_camera
from trellis_service.gaussian_refinement.gaussians import DrawnGaussians
from trellis_service.gaussian_refinement.rasterizer import (
    LOW_PASS,
    MAX_ALPHA,
    MIN_ALPHA,
    Render,
    TorchRasterizer,
    quaternion_matrices,
)


def direct_render(gaussians: DrawnGaussians, camera: Camera, background: torch.Tensor) -> Render:
    """Every Gaussian on every pixel, depth-sorted per image, in float64: the model with no binning at all."""
    g = DrawnGaussians(*(t.double() for t in (gaussians.means, gaussians.quats, gaussians.scales,
                                               gaussians.opacities, gaussians.colours)))
    rotation, translation = camera.rotation.double(), camera.translation.double()
    points = g.means @ rotation.T + translation
    order = torch.argsort(points[:, 2])
    fx, fy = camera.focal.double().tolist()
    cx, cy = camera.principal.double().tolist()
    colour = torch.zeros(camera.height, camera.width, 3, dtype=torch.float64)
    transmit = torch.ones(camera.height, camera.width, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(camera.height, dtype=torch.float64) + 0.5,
                            torch.arange(camera.width, dtype=torch.float64) + 0.5, indexing="ij")
    axes = quaternion_matrices(g.quats) * g.scales[:, None, :]
    for i in order.tolist():
        x, y, z = points[i].tolist()
        jacobian = torch.tensor([[fx / z, 0, -fx * x / z**2], [0, fy / z, -fy * y / z**2]], dtype=torch.float64)
        covariance = jacobian @ rotation @ axes[i] @ axes[i].T @ rotation.T @ jacobian.T + LOW_PASS * torch.eye(2)
        inverse = torch.linalg.inv(covariance)
        dx, dy = xs - (fx * x / z + cx), ys - (fy * y / z + cy)
        power = -0.5 * (inverse[0, 0] * dx * dx + 2 * inverse[0, 1] * dx * dy + inverse[1, 1] * dy * dy)
        alpha = torch.clamp(g.opacities[i] * torch.exp(power), max=MAX_ALPHA)
        alpha = torch.where(alpha >= MIN_ALPHA, alpha, torch.zeros_like(alpha))
        colour += (transmit * alpha)[..., None] * g.colours[i]
        transmit = transmit * (1 - alpha)
    return Render(colour + transmit[..., None] * background.double(), 1 - transmit)


def random_gaussians(count: int, seed: int) -> DrawnGaussians:
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    return DrawnGaussians(means=(uniform(count, 3) - 0.5) * 0.8, quats=torch.randn(count, 4, generator=generator),
                          scales=0.02 + 0.08 * uniform(count, 3), opacities=0.3 + 0.7 * uniform(count),
                          colours=uniform(count, 3))


def test_the_tiled_render_is_the_direct_evaluation_of_the_model() -> None:
    gaussians = random_gaussians(40, seed=3)
    # Not square and not a multiple of the tile: partial tiles at the right and bottom edges.
    orbit = orbit_camera(torch.tensor(0.4), torch.tensor(0.3), torch.tensor(2.0), torch.zeros(2), torch.zeros(3), 36)
    camera = Camera(orbit.rotation, orbit.translation, focal=torch.tensor([60.0, 60.0]),
                    principal=torch.tensor([21.0, 14.0]), width=42, height=30)
    background = torch.tensor([0.2, 0.4, 0.6])
    tiled = TorchRasterizer(tile=8).render(gaussians, camera, background)
    direct = direct_render(gaussians, camera, background)
    assert tiled.colour.shape == (30, 42, 3) and tiled.alpha.shape == (30, 42)
    assert 0.3 < float(direct.alpha.mean()) < 0.99, "the scene covers part of the image, with overlaps"
    # The only difference: like the CUDA rasterisers, tiles drop a Gaussian beyond its 3σ box (α < 1.1 % there).
    difference = (tiled.colour.double() - direct.colour).abs()
    assert float(difference.mean()) < 2e-3
    assert float(difference.max()) < 0.03
    assert float((tiled.alpha.double() - direct.alpha).abs().max()) < 0.03


def test_tile_size_and_chunking_do_not_change_the_image() -> None:
    gaussians = random_gaussians(60, seed=5)
    camera = camera_at(OrbitPose(20.0, 10.0, 2.0), torch.zeros(3), 40)
    background = torch.zeros(3)
    reference = TorchRasterizer(tile=8).render(gaussians, camera, background).colour
    for rasterizer in (TorchRasterizer(tile=16), TorchRasterizer(tile=8, chunk_elements=64 * 3)):
        assert torch.allclose(rasterizer.render(gaussians, camera, background).colour, reference, atol=0.03)


def test_the_camera_looks_at_the_front_with_x_right_and_y_up() -> None:
    """World y-up, the front facing +z: from yaw 0 a splat at +x is on the right, at +y near the top; from yaw
    90 (the camera on the +x side) the splat at +z is on the left."""
    def blob(position: tuple[float, float, float]) -> DrawnGaussians:
        return DrawnGaussians(torch.tensor([position]), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.05),
                              torch.tensor([0.9]), torch.ones(1, 3))

    def centroid(gaussians: DrawnGaussians, yaw: float) -> tuple[float, float]:
        alpha = TorchRasterizer().render(gaussians, camera_at(OrbitPose(yaw, 0.0, 3.0), torch.zeros(3), 64),
                                         torch.zeros(3)).alpha
        ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        return float((alpha * xs).sum() / alpha.sum()), float((alpha * ys).sum() / alpha.sum())

    x, y = centroid(blob((0.5, 0.0, 0.0)), 0.0)
    assert x > 40 and abs(y - 31.5) < 1
    x, y = centroid(blob((0.0, 0.5, 0.0)), 0.0)
    assert y < 24 and abs(x - 31.5) < 1
    x, _ = centroid(blob((0.0, 0.0, 0.5)), 90.0)
    assert x < 24


def test_gradients_reach_every_attribute() -> None:
    gaussians = random_gaussians(20, seed=7)
    leaves = [t.clone().requires_grad_(True) for t in (gaussians.means, gaussians.quats, gaussians.scales,
                                                        gaussians.opacities, gaussians.colours)]
    render = TorchRasterizer().render(DrawnGaussians(*leaves), camera_at(OrbitPose(0.0, 0.0, 2.0), torch.zeros(3), 32),
                                      torch.zeros(3))
    (render.colour.square().sum() + render.alpha.sum()).backward()  # type: ignore[no-untyped-call]
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and float(leaf.grad.abs().sum()) > 0
    assert math.isfinite(float(render.colour.detach().sum()))
