"""Differentiable rasterisation of 3D Gaussians, the model of 3D Gaussian splatting (Kerbl et al. 2023).

Each Gaussian is projected to a 2D Gaussian (EWA splatting: the camera-space covariance pushed through the
Jacobian of the perspective projection, plus a 0.3 px² low-pass), and the Gaussians covering a pixel are
composited front to back by depth: ``C = Σ c_i α_i Π_{j<i} (1 − α_j) + T · background`` with
``α_i = min(0.99, o_i · exp(−½ dᵀ Σ⁻¹ d))`` and contributions below 1/255 dropped.

Two implementations behind :class:`Rasterizer`:

- :class:`TorchRasterizer`: pure PyTorch, any device (the CPU path of the preview backend and the tests). It
  bins Gaussians into 16×16-pixel tiles as the CUDA rasterisers do, and composites each tile's depth-sorted
  list in a padded batch, so memory stays bounded by :attr:`TorchRasterizer.chunk_elements`.
- :class:`GsplatRasterizer`: ``gsplat.rasterization`` (nerfstudio-project/gsplat) on CUDA, the maintained
  kernels, chosen by :func:`choose_rasterizer` when gsplat imports and the tensors are on a GPU.

Both cut a Gaussian off beyond its 3σ box and stop a pixel below transmittance 1e-4, but at different
granularities (gsplat per pixel and per 16-pixel tile, the torch path per block of 64 Gaussians and per
8-pixel tile), so renders differ slightly: the stated tolerance is 2e-3 mean and 0.03 largest absolute
colour difference, which ``tests/gpu/test_rasterizer_agreement.py`` checks on a GPU host with gsplat (not yet
run: no GPU has been available to this project).
"""

from __future__ import annotations

import abc
import importlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trellis_service.gaussian_refinement.cameras import Camera
from trellis_service.gaussian_refinement.gaussians import DrawnGaussians

_log = logging.getLogger(__name__)

#: 3DGS's screen-space dilation (px²) so that every splat covers at least about a pixel.
LOW_PASS = 0.3
#: Contributions below this are dropped, as in 3DGS.
MIN_ALPHA = 1.0 / 255.0
MAX_ALPHA = 0.99
NEAR_PLANE = 0.01
#: A pixel this transparent is finished (3DGS stops there too).
MIN_TRANSMITTANCE = 1e-4
#: Gaussians per tile composited at once before checking whether the tile is finished.
DEPTH_BLOCK = 64


@dataclass(frozen=True)
class Render:
    """One rendered view.

    Args:
        colour: (H, W, 3) composited over the background.
        alpha: (H, W) accumulated opacity (1 − final transmittance).
    """

    colour: Tensor
    alpha: Tensor


class Rasterizer(abc.ABC):
    """Renders Gaussians from a camera; differentiable in the Gaussians and in the camera."""

    name: str = ""

    @abc.abstractmethod
    def render(self, gaussians: DrawnGaussians, camera: Camera, background: Tensor) -> Render:
        """Render ``gaussians`` seen by ``camera`` over ``background`` ((3,) colour)."""


def quaternion_matrices(quats: Tensor) -> Tensor:
    """(N, 3, 3) rotation matrices of (N, 4) quaternions (w, x, y, z), normalised first."""
    q = quats / torch.linalg.vector_norm(quats, dim=1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=1).reshape(-1, 3, 3)


@dataclass(frozen=True)
class Projected:
    """Gaussians on the image plane (only those in front of the camera and on screen)."""

    index: Tensor  # (M,) indices into the drawn Gaussians
    means2d: Tensor  # (M, 2) pixel coordinates
    conics: Tensor  # (M, 3) a, b, c of the inverse 2D covariance [[a, b], [b, c]]
    depths: Tensor  # (M,)
    radii: Tensor  # (M,) 3σ radius in pixels (no gradient)


def project(gaussians: DrawnGaussians, camera: Camera) -> Projected:
    """EWA projection of every Gaussian; those behind the near plane or off screen are dropped."""
    points = gaussians.means @ camera.rotation.T + camera.translation
    x, y, z = points.unbind(1)
    fx, fy = camera.focal.unbind(0)
    cx, cy = camera.principal.unbind(0)
    in_front = z > NEAR_PLANE
    z_safe = torch.where(in_front, z, torch.ones_like(z))
    # As 3DGS: clamp the direction used by the Jacobian to 1.3× the field of view (splats far off screen
    # would otherwise get huge, unstable footprints).
    margin_x, margin_y = 0.15 * camera.width, 0.15 * camera.height
    tx = torch.clamp(x / z_safe, (-cx - margin_x) / fx, (camera.width - cx + margin_x) / fx) * z_safe
    ty = torch.clamp(y / z_safe, (-cy - margin_y) / fy, (camera.height - cy + margin_y) / fy) * z_safe
    zeros = torch.zeros_like(z_safe)
    jacobian = torch.stack([
        torch.stack([fx / z_safe, zeros, -fx * tx / z_safe**2], dim=1),
        torch.stack([zeros, fy / z_safe, -fy * ty / z_safe**2], dim=1),
    ], dim=1)  # (N, 2, 3)
    axes = quaternion_matrices(gaussians.quats) * gaussians.scales[:, None, :]
    covariance = axes @ axes.transpose(1, 2)
    transform = jacobian @ camera.rotation
    cov2d = transform @ covariance @ transform.transpose(1, 2)
    a = cov2d[:, 0, 0] + LOW_PASS
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + LOW_PASS
    det = (a * c - b * b).clamp_min(1e-12)
    conics = torch.stack([c / det, -b / det, a / det], dim=1)
    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=1)
    with torch.no_grad():
        middle = 0.5 * (a + c)
        largest = middle + torch.sqrt((middle * middle - det).clamp_min(0.1))
        radii = torch.ceil(3.0 * torch.sqrt(largest))
        on_screen = ((means2d[:, 0] + radii > 0) & (means2d[:, 0] - radii < camera.width)
                     & (means2d[:, 1] + radii > 0) & (means2d[:, 1] - radii < camera.height))
        keep = torch.nonzero(in_front & on_screen & (gaussians.opacities > MIN_ALPHA)).squeeze(1)
    return Projected(index=keep, means2d=means2d[keep], conics=conics[keep], depths=z[keep], radii=radii[keep])


class TorchRasterizer(Rasterizer):
    """Tile-binned, front-to-back compositing in plain PyTorch (autograd gives the gradients).

    Args:
        tile: Tile edge in pixels. Every Gaussian is evaluated on every pixel of every tile its 3σ box
            touches, so smaller tiles waste less work on splats a few pixels wide (8 is about twice as fast
            as the CUDA rasterisers' 16 here).
        chunk_elements: Upper bound on pixels × Gaussians evaluated at once (memory; about 40 bytes each
            with the autograd graph).
    """

    name = "torch"

    def __init__(self, tile: int = 8, chunk_elements: int = 2_000_000) -> None:
        self.tile = tile
        self.chunk_elements = chunk_elements

    def render(self, gaussians: DrawnGaussians, camera: Camera, background: Tensor) -> Render:
        width, height, tile = camera.width, camera.height, self.tile
        device, dtype = gaussians.means.device, gaussians.means.dtype
        projected = project(gaussians, camera)
        tiles_x, tiles_y = -(-width // tile), -(-height // tile)
        lists, tile_ids, lengths = _tile_lists(projected, tiles_x, tiles_y, tile)
        opacities = gaussians.opacities[projected.index]
        colours = gaussians.colours[projected.index]
        colour_tiles = background.to(dtype).expand(tiles_y * tiles_x, tile * tile, 3).clone()
        alpha_tiles = torch.zeros(tiles_y * tiles_x, tile * tile, dtype=dtype, device=device)
        rows, cols = torch.meshgrid(torch.arange(tile, device=device), torch.arange(tile, device=device),
                                    indexing="ij")
        x, y = cols.reshape(-1).to(dtype) + 0.5, rows.reshape(-1).to(dtype) + 0.5  # pixel centres in a tile
        features = torch.stack([x * x, x * y, y * y, x, y, torch.ones_like(x)], dim=1)
        for start, stop in _chunks(lengths, self.chunk_elements // (tile * tile)):
            members = lists[start:stop, :max(1, lengths[start])]  # rows are longest first: a bound for all
            ids = tile_ids[start:stop]
            origin = torch.stack([ids % tiles_x, ids // tiles_x], dim=1).to(dtype) * tile
            colour, alpha = _composite(origin, features, members, projected, opacities, colours,
                                       background.to(dtype))
            colour_tiles = colour_tiles.index_put((ids,), colour)
            alpha_tiles = alpha_tiles.index_put((ids,), alpha)
        colour_image = (colour_tiles.reshape(tiles_y, tiles_x, tile, tile, 3).permute(0, 2, 1, 3, 4)
                        .reshape(tiles_y * tile, tiles_x * tile, 3)[:height, :width])
        alpha_image = (alpha_tiles.reshape(tiles_y, tiles_x, tile, tile).permute(0, 2, 1, 3)
                       .reshape(tiles_y * tile, tiles_x * tile)[:height, :width])
        return Render(colour=colour_image, alpha=alpha_image)


def _chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of a longest-first list to composite together: each padded to its first row's
    length, within ``budget`` list entries, and ending where rows get less than half as long (padding waste)."""
    ranges: list[tuple[int, int]] = []
    start = 0
    while start < len(lengths):
        longest = max(1, lengths[start])
        stop = start + 1
        while stop < len(lengths) and (stop - start + 1) * longest <= budget and 2 * lengths[stop] >= longest:
            stop += 1
        ranges.append((start, stop))
        start = stop
    return ranges


def _tile_lists(projected: Projected, tiles_x: int, tiles_y: int, tile_size: int
                ) -> tuple[Tensor, Tensor, list[int]]:
    """Per non-empty tile, the indices (into ``projected``) of the Gaussians touching it, nearest first,
    padded with −1; rows ordered longest first. Returns (lists (T, K), tile ids (T,), list lengths)."""
    device = projected.means2d.device
    with torch.no_grad():
        centre = projected.means2d
        low = torch.floor((centre - projected.radii[:, None]) / tile_size).clamp(min=0)
        high = torch.floor((centre + projected.radii[:, None]) / tile_size)
        high = torch.minimum(high, torch.tensor([tiles_x - 1, tiles_y - 1], dtype=high.dtype, device=device))
        spans = (high - low + 1).clamp_min(0).long()  # (M, 2) tiles across x and y
        counts = spans[:, 0] * spans[:, 1]
        if int(counts.sum()) == 0:
            return (torch.full((0, 1), -1, dtype=torch.long, device=device),
                    torch.zeros(0, dtype=torch.long, device=device), [])
        owner = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(len(owner), device=device) - first[owner]
        tx = low[owner, 0].long() + local % spans[owner, 0]
        ty = low[owner, 1].long() + local // spans[owner, 0]
        tile = ty * tiles_x + tx
        depth_rank = torch.argsort(torch.argsort(projected.depths))
        order = torch.argsort(tile * len(counts) + depth_rank[owner])
        tile, owner = tile[order], owner[order]
        tile_ids, per_tile = torch.unique_consecutive(tile, return_counts=True)
        tile_first = torch.cumsum(per_tile, 0) - per_tile
        slot = torch.arange(len(tile), device=device) - torch.repeat_interleave(tile_first, per_tile)
        row = torch.repeat_interleave(torch.arange(len(tile_ids), device=device), per_tile)
        lists = torch.full((len(tile_ids), int(per_tile.max())), -1, dtype=torch.long, device=device)
        lists[row, slot] = owner
        longest_first = torch.argsort(per_tile, descending=True, stable=True)
    return lists[longest_first], tile_ids[longest_first], per_tile[longest_first].tolist()


def _composite(origin: Tensor, features: Tensor, members: Tensor, projected: Projected, opacities: Tensor,
               colours: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """Front-to-back compositing of each tile's list: ``origin`` (B, 2) tile corners, ``features`` (P, 6) pixel
    monomials, ``members`` (B, K) → colour (B, P, 3), alpha (B, P).

    The Gaussian's exponent −½ dᵀ Σ⁻¹ d is a quadratic in the pixel position, so it is evaluated for every
    pixel and Gaussian of a tile as one batched product of the pixels' monomials (x², xy, y², x, y, 1) with
    per-Gaussian coefficients, in tile-local coordinates to keep float32 cancellation small. Lists are walked
    in depth blocks of :data:`DEPTH_BLOCK`; a tile whose pixels are all opaque (transmittance below
    :data:`MIN_TRANSMITTANCE`, 3DGS's early stop) leaves the walk, so hidden surfaces cost nothing.
    """
    count, pixels = len(members), features.shape[0]
    colour = torch.zeros(count, pixels, 3, dtype=features.dtype, device=features.device)
    log_transmit = torch.zeros(count, pixels, dtype=features.dtype, device=features.device)
    active = torch.arange(count, device=features.device)
    for first in range(0, members.shape[1], DEPTH_BLOCK):
        block = members[active, first:first + DEPTH_BLOCK]
        safe = block.clamp_min(0)
        mx, my = (projected.means2d[safe] - origin[active, None, :]).unbind(-1)  # (b, k)
        a, b, c = projected.conics[safe].unbind(-1)
        coefficients = torch.stack([
            -0.5 * a, -b, -0.5 * c, a * mx + b * my, c * my + b * mx,
            -0.5 * (a * mx * mx + 2 * b * mx * my + c * my * my),
        ], dim=1)  # (b, 6, k)
        power = features @ coefficients  # (b, P, k)
        opacity = torch.where(block >= 0, opacities[safe], torch.zeros_like(opacities[safe]))
        alpha = torch.clamp_max(opacity[:, None, :] * torch.exp(torch.clamp_max(power, 0.0)), MAX_ALPHA)
        alpha = alpha * (alpha >= MIN_ALPHA)
        carried = log_transmit[active]
        running = carried[..., None] + torch.cumsum(torch.log1p(-alpha), dim=2)
        before = torch.exp(torch.cat([carried[..., None], running[..., :-1]], dim=2))
        colour = colour.index_add(0, active, (alpha * before) @ colours[safe])
        log_transmit = log_transmit.index_put((active,), running[..., -1])
        with torch.no_grad():
            still_open = running[..., -1].max(dim=1).values > math.log(MIN_TRANSMITTANCE)
        active = active[still_open]
        if len(active) == 0:
            break
    remaining = torch.exp(log_transmit)
    return colour + remaining[..., None] * background, 1.0 - remaining


class GsplatRasterizer(Rasterizer):
    """``gsplat.rasterization`` (CUDA). Same model: 0.3 px² dilation (``eps2d``), classic mode, colours
    given directly (degree-0 SH already evaluated), front-to-back alpha compositing with the background.

    Not exercised on CPU-only hosts: gsplat's kernels need a GPU. ``tests/gpu/test_rasterizer_agreement.py``
    compares it with :class:`TorchRasterizer` where one is present.
    """

    name = "gsplat"

    def __init__(self) -> None:
        self._rasterization: Any = importlib.import_module("gsplat").rasterization

    def render(self, gaussians: DrawnGaussians, camera: Camera, background: Tensor) -> Render:
        colours, alphas, _meta = self._rasterization(
            means=gaussians.means, quats=gaussians.quats, scales=gaussians.scales, opacities=gaussians.opacities,
            colors=gaussians.colours, viewmats=camera.view_matrix()[None], Ks=camera.intrinsics()[None],
            width=camera.width, height=camera.height, near_plane=NEAR_PLANE, eps2d=LOW_PASS,
            backgrounds=background[None], render_mode="RGB", rasterize_mode="classic", packed=False,
        )
        return Render(colour=colours[0], alpha=alphas[0, ..., 0])


def choose_rasterizer(device: torch.device | str) -> Rasterizer:
    """gsplat's CUDA kernels on a GPU when gsplat imports; the PyTorch rasteriser otherwise (and on CPU)."""
    if torch.device(device).type == "cuda":
        try:
            return GsplatRasterizer()
        except ImportError:
            _log.warning("gsplat is not installed: Gaussian refinement uses the (slower) PyTorch rasteriser on %s",
                         device)
    return TorchRasterizer()
