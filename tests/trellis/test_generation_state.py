"""The novel-view hand-over's state: what the TRELLIS service writes, it reads back; anything else is refused as the
caller's mistake (INVALID_ARGUMENT), never inflated or unpickled."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from tests.images import png_bytes, truncated_png
from trellis_service.domain import GenerationState
from trellis_service.servicer import read_state
from trellisbox._domain.convert import decode_images
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.imaging import ImageLimits
from trellisbox.v1 import common_pb2

VERTICES = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
FACES = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], dtype=np.int32)


def zipped(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:  # type: ignore[type-arg]
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def test_a_state_reads_back_as_it_was_written() -> None:
    state = GenerationState(splats=b"ply\n...", mesh_vertices=VERTICES, mesh_faces=FACES,
                            representation={"aabb": [-0.5, -0.5, -0.5, 1.0, 1.0, 1.0], "sh_degree": 0})
    back = GenerationState.from_bytes(state.to_bytes())
    assert back.splats == state.splats and back.representation == state.representation
    assert back.mesh_vertices is not None and back.mesh_faces is not None
    np.testing.assert_array_equal(back.mesh_vertices, VERTICES)
    np.testing.assert_array_equal(back.mesh_faces, FACES)
    plain = GenerationState.from_bytes(GenerationState(splats=b"ply").to_bytes())
    assert plain.mesh_vertices is None and plain.mesh_faces is None and plain.representation == {}


@pytest.mark.parametrize(("data", "why"), [
    (b"", "not a generation state"),
    (b"PK\x03\x04" + bytes(60), "not a generation state"),
    (zipped({"gaussians.ply": bytes(100_000)}, zipfile.ZIP_DEFLATED), "compressed or oversized member"),
    (zipped({"other.bin": b"x"}), "no gaussians.ply"),
    (zipped({"gaussians.ply": b"ply", "representation.json": b"[1, 2]"}), "representation.json is not an object"),
    (zipped({"gaussians.ply": b"ply", "representation.json": b"{"}), "not a generation state"),
    (zipped({"gaussians.ply": b"ply", "mesh_vertices.npy": npy(VERTICES)}), "needs both its vertices and its faces"),
    (zipped({"gaussians.ply": b"ply", "mesh_vertices.npy": npy(VERTICES), "mesh_faces.npy": npy(FACES + 4)}),
     "integer faces indexing them"),
    (zipped({"gaussians.ply": b"ply", "mesh_vertices.npy": npy(VERTICES[:, :2]), "mesh_faces.npy": npy(FACES)}),
     "(V, 3) float vertices"),
    (zipped({"gaussians.ply": b"ply", "mesh_vertices.npy": npy(np.array([[{}, {}, {}]], dtype=object),
                                                               allow_pickle=True),
             "mesh_faces.npy": npy(FACES)}), "not a generation state"),
])
def test_anything_else_is_refused_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(InvalidInput, match=r"^state: .*send the GENERATION_STATE artifact") as caught:
        GenerationState.from_bytes(data)
    assert why in str(caught.value)


def test_the_service_also_refuses_a_state_whose_ply_is_not_gaussians() -> None:
    with pytest.raises(InvalidInput, match=r"^state: gaussians\.ply: .*not a PLY file"):
        read_state(GenerationState(splats=b"not a ply").to_bytes())
    cut = ("ply\nformat binary_little_endian 1.0\nelement vertex 1000\n"
           + "".join(f"property float {name}\n" for name in ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                                                               "scale_0", "scale_1", "scale_2", "rot_0", "rot_1",
                                                               "rot_2", "rot_3"))
           + "end_header\n").encode() + bytes(40)
    with pytest.raises(InvalidInput, match=r"^state: gaussians\.ply: "):
        read_state(GenerationState(splats=cut).to_bytes())


def test_a_broken_novel_view_is_named_as_such() -> None:
    """RefineGaussians decodes its refined views with the images' rules, and names the field they came in."""
    views = [common_pb2.Image(data=png_bytes(32)), common_pb2.Image(data=truncated_png(32))]
    with pytest.raises(InvalidInput, match=r"^novel_views\[1\] is truncated or corrupt"):
        decode_images(views, ImageLimits(), 8, handoff=True, field="novel_views")
    with pytest.raises(InvalidInput, match=r"^no novel_views: "):
        decode_images([], ImageLimits(), 8, field="novel_views")
