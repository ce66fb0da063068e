"""Gaussians as tensors: the parameters the fit moves, and the conversions from and to the 3DGS PLY layout.

The stored (raw) parameters are those of the 3DGS file layout, so a fit moves exactly what is written back:
centres, log standard deviations, quaternions (w, x, y, z), opacity logits and degree-0 SH colour
coefficients. :meth:`GaussianSet.activated` turns them into what a rasteriser draws.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from trellis_service.exporters import SH_C0, SPLAT_PROPERTIES, ExportError, SplatArrays

#: The attributes a fit may move, by the names the request uses.
ATTRIBUTES: tuple[str, ...] = ("colours", "opacities", "positions", "scales")


@dataclass(frozen=True)
class DrawnGaussians:
    """What a rasteriser draws, every tensor on one device.

    Args:
        means: (N, 3) centres in world units.
        quats: (N, 4) rotations (w, x, y, z), not necessarily normalised.
        scales: (N, 3) standard deviations along the rotated axes.
        opacities: (N,) in [0, 1].
        colours: (N, 3) linear RGB, at least 0.
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colours: Tensor

    def __len__(self) -> int:
        return int(self.means.shape[0])

    def subset(self, index: Tensor, scale_factor: float = 1.0) -> DrawnGaussians:
        """The Gaussians at ``index``, their scales multiplied by ``scale_factor`` (a sparser stand-in that
        still covers the same silhouette)."""
        return DrawnGaussians(self.means[index], self.quats[index], self.scales[index] * scale_factor,
                              self.opacities[index], self.colours[index])


@dataclass(frozen=True)
class GaussianSet:
    """Gaussians in the 3DGS file parametrisation (degree-0 SH).

    Args:
        means: (N, 3) centres.
        log_scales: (N, 3) log standard deviations.
        quats: (N, 4) rotations (w, x, y, z).
        opacity_logits: (N,) opacity before the sigmoid.
        f_dc: (N, 3) SH DC coefficients: colour = 0.5 + SH_C0 · f_dc.
        normals: (N, 3) carried through to the file untouched (viewers ignore them).
    """

    means: Tensor
    log_scales: Tensor
    quats: Tensor
    opacity_logits: Tensor
    f_dc: Tensor
    normals: Tensor

    def __len__(self) -> int:
        return int(self.means.shape[0])

    def activated(self) -> DrawnGaussians:
        """The drawn quantities; colours are clamped at 0 as 3DGS does after adding the DC offset."""
        return DrawnGaussians(
            means=self.means, quats=self.quats, scales=torch.exp(self.log_scales),
            opacities=torch.sigmoid(self.opacity_logits), colours=torch.clamp_min(0.5 + SH_C0 * self.f_dc, 0.0))

    def detached(self) -> GaussianSet:
        """A copy that shares no autograd history (and no storage) with this one."""
        return GaussianSet(*(t.detach().clone() for t in self._tensors()))

    def to(self, device: torch.device | str) -> GaussianSet:
        return GaussianSet(*(t.to(device) for t in self._tensors()))

    def with_values(self, **tensors: Tensor) -> GaussianSet:
        return replace(self, **tensors)

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (self.means, self.log_scales, self.quats, self.opacity_logits, self.f_dc, self.normals)

    def centre_and_radius(self) -> tuple[Tensor, float]:
        """The opacity-weighted centre and the radius that holds 99% of the centres around it."""
        with torch.no_grad():
            weights = torch.sigmoid(self.opacity_logits)[:, None]
            centre = (self.means * weights).sum(0) / weights.sum().clamp_min(1e-12)
            distances = torch.linalg.vector_norm(self.means - centre, dim=1)
            radius = float(torch.quantile(distances, 0.99)) if len(distances) > 1 else 1.0
        return centre, max(radius, 1e-3)

    # -- files ------------------------------------------------------------------------------------------------

    @classmethod
    def from_splats(cls, splats: SplatArrays, device: torch.device | str = "cpu") -> GaussianSet:
        count = len(splats.xyz)

        def tensor(array: np.ndarray, columns: int) -> Tensor:  # type: ignore[type-arg]
            return torch.as_tensor(np.asarray(array, dtype=np.float32).reshape(count, columns), device=device)

        return cls(means=tensor(splats.xyz, 3), log_scales=tensor(splats.scale, 3), quats=tensor(splats.rotation, 4),
                   opacity_logits=tensor(splats.opacity, 1).reshape(count), f_dc=tensor(splats.f_dc, 3),
                   normals=tensor(splats.normals, 3))

    def to_splats(self) -> SplatArrays:
        def array(t: Tensor) -> np.ndarray:  # type: ignore[type-arg]
            return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))

        return SplatArrays(xyz=array(self.means), normals=array(self.normals), f_dc=array(self.f_dc),
                           opacity=array(self.opacity_logits), scale=array(self.log_scales),
                           rotation=array(self.quats))

    @classmethod
    def from_ply(cls, data: bytes, device: torch.device | str = "cpu") -> GaussianSet:
        """Parse a binary little-endian 3DGS PLY; extra properties (higher SH bands) are ignored.

        Raises:
            ExportError: not a binary little-endian PLY, or a column of the degree-0 layout is missing.
        """
        return cls.from_splats(read_splat_ply(data), device)


def read_splat_ply(data: bytes) -> SplatArrays:
    """The degree-0 columns of a binary little-endian 3DGS PLY (upstream ``Gaussian.save_ply`` and ours)."""
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply") or end < 0:
        raise ExportError("not a PLY file")
    header = data[:end].decode("ascii", errors="replace").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise ExportError("only binary little-endian PLY files of Gaussians can be refined")
    count = 0
    names: list[str] = []
    dtypes: list[str] = []
    sizes = {"float": "<f4", "float32": "<f4", "double": "<f8", "uchar": "u1", "int": "<i4", "uint": "<u4"}
    for line in header:
        words = line.split()
        if words[:2] == ["element", "vertex"]:
            count = int(words[2])
        elif words[:1] == ["property"] and len(words) == 3:
            if words[1] not in sizes:
                raise ExportError(f"unsupported PLY property type {words[1]!r}")
            names.append(words[2])
            dtypes.append(sizes[words[1]])
    missing = [name for name in SPLAT_PROPERTIES if name not in names and name not in ("nx", "ny", "nz")]
    if missing:
        raise ExportError(f"the PLY has no {', '.join(missing)}: not 3D Gaussian splats")
    table = np.frombuffer(data, dtype=np.dtype(list(zip(names, dtypes, strict=True))), count=count,
                          offset=end + len("end_header\n"))

    def columns(*wanted: str) -> np.ndarray:  # type: ignore[type-arg]
        return np.stack([np.asarray(table[name], dtype=np.float32) if name in names
                         else np.zeros(count, dtype=np.float32) for name in wanted], axis=1)

    return SplatArrays(xyz=columns("x", "y", "z"), normals=columns("nx", "ny", "nz"),
                       f_dc=columns("f_dc_0", "f_dc_1", "f_dc_2"), opacity=columns("opacity")[:, 0],
                       scale=columns("scale_0", "scale_1", "scale_2"),
                       rotation=columns("rot_0", "rot_1", "rot_2", "rot_3"))
