"""The one way to write 3D files: GLB from a textured trimesh, Gaussian-splat PLY from arrays or from
an upstream ``Gaussian.save_ply``. Both backends go through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import trimesh

from trellisbox._domain.errors import ServiceError

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


def splat_ply_bytes(xyz: FloatArray, normals: FloatArray, f_dc: FloatArray, opacity: FloatArray,
                    scale: FloatArray, rotation: FloatArray) -> bytes:
    """A binary little-endian PLY in the 3D-Gaussian-splatting layout (``SPLAT_PROPERTIES``).

    Args:
        xyz: (N, 3) centres.
        normals: (N, 3) normals (viewers ignore them; upstream writes zeros).
        f_dc: (N, 3) SH DC colour coefficients.
        opacity: (N,) or (N, 1) opacity before the sigmoid.
        scale: (N, 3) log of the per-axis standard deviations.
        rotation: (N, 4) quaternions (w, x, y, z).
    """
    count = len(xyz)
    columns = [xyz, normals, f_dc, np.reshape(opacity, (count, 1)), scale, rotation]
    table = np.concatenate([np.asarray(c, dtype=np.float32).reshape(count, -1) for c in columns], axis=1)
    if table.shape != (count, len(SPLAT_PROPERTIES)):
        raise ExportError(f"splat table has shape {table.shape}, expected ({count}, {len(SPLAT_PROPERTIES)})")
    header = "\n".join(
        ["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
        + [f"property float {name}" for name in SPLAT_PROPERTIES]
        + ["end_header", ""]
    )
    return header.encode("ascii") + table.astype("<f4").tobytes()


def ply_bytes_from(save_ply: Callable[[str], object]) -> bytes:
    """Bytes of a PLY written by a path-taking writer such as upstream ``Gaussian.save_ply``."""
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
    return data
