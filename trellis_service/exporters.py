"""The one way to write 3D files: GLB from a textured trimesh, Gaussian-splat PLY from arrays or from
an upstream ``Gaussian.save_ply``. Backends build the CPU-side objects; :func:`encode_asset` (called by the
servicer, off the model thread) turns them into artifacts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import trimesh

from trellis_service.domain import GeneratedAsset, HandedOver
from trellisbox._domain.artifacts import Artifact
from trellisbox._domain.errors import ServiceError
from trellisbox._domain.imaging import encode_png
from trellisbox._domain.kinds import ArtifactKind

#: DC term of degree-0 spherical harmonics: colour = 0.5 + SH_C0 * f_dc (3DGS convention).
SH_C0 = 0.28209479177387814

#: Vertex properties of a 3D-Gaussian-splatting PLY with degree-0 SH, in file order.
SPLAT_PROPERTIES: tuple[str, ...] = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)

FloatArray = npt.NDArray[np.float32]


class ExportError(ServiceError):
    """A generated asset could not be written (empty mesh, writer failure)."""


def glb_bytes(mesh: trimesh.Trimesh | trimesh.Scene) -> bytes:
    """Binary glTF 2.0 of ``mesh`` with its material and texture.

    Vertex normals are written when the mesh has computed them (smooth shading).
    """
    if isinstance(mesh, trimesh.Trimesh) and (len(mesh.faces) == 0 or len(mesh.vertices) == 0):
        raise ExportError("the generated mesh is empty; nothing to export")
    data = mesh.export(file_type="glb")
    if not isinstance(data, bytes | bytearray) or not data:
        raise ExportError("GLB export produced no bytes")
    return bytes(data)


@dataclass(frozen=True)
class SplatArrays:
    """Gaussian splats as arrays (degree-0 spherical harmonics), written in the 3DGS PLY layout.

    Args:
        xyz: (N, 3) centres.
        normals: (N, 3) normals (viewers ignore them; upstream writes zeros).
        f_dc: (N, 3) SH DC colour coefficients.
        opacity: (N,) or (N, 1) opacity before the sigmoid.
        scale: (N, 3) log of the per-axis standard deviations.
        rotation: (N, 4) quaternions (w, x, y, z).
    """

    xyz: FloatArray
    normals: FloatArray
    f_dc: FloatArray
    opacity: FloatArray
    scale: FloatArray
    rotation: FloatArray

    def ply_bytes(self) -> bytes:
        """A binary little-endian PLY with the ``SPLAT_PROPERTIES`` columns."""
        count = len(self.xyz)
        columns = [self.xyz, self.normals, self.f_dc, np.reshape(self.opacity, (count, 1)), self.scale, self.rotation]
        table = np.concatenate([np.asarray(c, dtype=np.float32).reshape(count, -1) for c in columns], axis=1)
        if table.shape != (count, len(SPLAT_PROPERTIES)):
            raise ExportError(f"splat table has shape {table.shape}, expected ({count}, {len(SPLAT_PROPERTIES)})")
        header = "\n".join(
            ["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
            + [f"property float {name}" for name in SPLAT_PROPERTIES]
            + ["end_header", ""]
        )
        return header.encode("ascii") + table.astype("<f4").tobytes()


@dataclass(frozen=True)
class PlyDocument:
    """Splats already written as a PLY by upstream's own writer (``Gaussian.save_ply``): its tensors live on
    the GPU, so it must run inside the job's GPU turn, not later in the servicer."""

    data: bytes

    def ply_bytes(self) -> bytes:
        return self.data


def written_ply(save_ply: Callable[[str], object]) -> PlyDocument:
    """The PLY a path-taking writer such as upstream ``Gaussian.save_ply`` writes."""
    with tempfile.TemporaryDirectory(prefix="trellisbox-ply-") as folder:
        path = os.path.join(folder, "gaussian.ply")
        save_ply(path)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise ExportError("save_ply wrote no file") from None
    if not data.startswith(b"ply"):
        raise ExportError("save_ply wrote something that is not a PLY file")
    return PlyDocument(data)


def encode_result(result: GeneratedAsset | HandedOver) -> list[Artifact]:
    """An asset's artifacts (:func:`encode_asset`), or a hand-over's: the novel views as PNG (alpha: the object's
    coverage), then the generation state."""
    if isinstance(result, GeneratedAsset):
        return encode_asset(result)
    views = [Artifact(ArtifactKind.NOVEL_VIEW, encode_png(render), index=index)
             for index, render in enumerate(result.plan.renders)]
    return [*views, Artifact(ArtifactKind.GENERATION_STATE, result.state.to_bytes())]


def encode_asset(asset: GeneratedAsset) -> list[Artifact]:
    """The asset's artifacts: the GLB (when it has a mesh), then the Gaussian PLY (when it has splats)."""
    artifacts: list[Artifact] = []
    if asset.mesh is not None:
        artifacts.append(Artifact(ArtifactKind.GLB, glb_bytes(asset.mesh)))
    if asset.splats is not None:
        artifacts.append(Artifact(ArtifactKind.GAUSSIAN_PLY, asset.splats.ply_bytes()))
    return artifacts
