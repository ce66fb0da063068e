"""Domain types of the TRELLIS service: what a backend produces, and how its stage time is measured.

Backends never see protobuf and never encode files: a backend returns a :class:`GeneratedAsset` holding the
textured mesh and the Gaussian splats on the CPU; the servicer encodes them into GLB and PLY
(:func:`trellis_service.exporters.encode_asset`) off the model thread, as the refiner's servicer encodes
its PNGs.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import trimesh

from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.kinds import Stage

if TYPE_CHECKING:
    from trellis_service.gaussian_refinement import NovelViewPlan, RefinementReport


class Splats(Protocol):
    """3D Gaussian splats, ready to be written as a PLY in the 3DGS layout."""

    def ply_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class GeneratedAsset:
    """One generated 3D asset.

    Args:
        seed: The seed that was used (echoed to the caller so a run can be repeated).
        mesh: The textured mesh for the GLB; None when no GLB was asked for.
        splats: The Gaussians for the PLY; None when no PLY was asked for.
        timings: Seconds per stage, in the order the stages ran.
        notes: Things the caller should know (e.g. which input the preview used).
        refinement: What the Gaussian refinement did, when the request asked for it.
    """

    seed: int
    mesh: trimesh.Trimesh | None = None
    splats: Splats | None = None
    timings: dict[Stage, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    refinement: RefinementReport | None = None


@dataclass(frozen=True)
class GenerationState:
    """What the first call of a novel-view refinement hands over to the second, through the gateway (the service
    keeps nothing between calls; docs/gaussian-refinement.md says why). Travels as an uncompressed zip
    (:meth:`to_bytes`), the ``GENERATION_STATE`` artifact.

    Args:
        splats: The generated Gaussians as a 3DGS PLY (y-up frame).
        mesh_vertices: (V, 3) float32 vertices of the extracted mesh, when the GLB is baked after the fit (TRELLIS).
        mesh_faces: (F, 3) int32 faces of that mesh.
        representation: The backend's settings for rebuilding its Gaussians (TRELLIS: ``Gaussian.init_params``).
    """

    splats: bytes
    mesh_vertices: npt.NDArray[np.float32] | None = None
    mesh_faces: npt.NDArray[np.int32] | None = None
    representation: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("gaussians.ply", self.splats)
            archive.writestr("representation.json", json.dumps(self.representation))
            for name, array in (("mesh_vertices.npy", self.mesh_vertices), ("mesh_faces.npy", self.mesh_faces)):
                if array is not None:
                    member = io.BytesIO()
                    np.save(member, array, allow_pickle=False)
                    archive.writestr(name, member.getvalue())
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> GenerationState:
        """Read what :meth:`to_bytes` wrote.

        Raises:
            InvalidInput: not such a zip (the request's ``state`` must be the artifact as it was sent).
        """
        def refuse(why: str) -> InvalidInput:
            return InvalidInput(f"state: {why}; send the GENERATION_STATE artifact of the ImageTo3D call as it was")

        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = {info.filename: info for info in archive.infolist()}
                # Stored members only, each within the bytes received: nothing inflates beyond the request.
                if any(info.compress_type != zipfile.ZIP_STORED or info.file_size > len(data)
                       for info in members.values()):
                    raise refuse("compressed or oversized member")
                if "gaussians.ply" not in members:
                    raise refuse("no gaussians.ply")
                splats = archive.read("gaussians.ply")
                representation = json.loads(archive.read("representation.json")) \
                    if "representation.json" in members else {}
                arrays = {name: np.load(io.BytesIO(archive.read(name)), allow_pickle=False)
                          for name in ("mesh_vertices.npy", "mesh_faces.npy") if name in members}
        except (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError, NotImplementedError, RuntimeError) as exc:
            raise refuse(f"not a generation state ({exc})") from None
        if not isinstance(representation, dict):
            raise refuse("representation.json is not an object")
        vertices, faces = arrays.get("mesh_vertices.npy"), arrays.get("mesh_faces.npy")
        if (vertices is None) != (faces is None):
            raise refuse("a mesh needs both its vertices and its faces")
        if vertices is not None and faces is not None and not (
                vertices.ndim == 2 and vertices.shape[1] == 3 and vertices.dtype.kind == "f"
                and faces.ndim == 2 and faces.shape[1] == 3 and faces.dtype.kind in "iu"
                and (faces.size == 0 or (int(faces.min()) >= 0 and int(faces.max()) < len(vertices)))):
            raise refuse("the mesh needs (V, 3) float vertices and (F, 3) integer faces indexing them")
        return cls(splats=splats, mesh_vertices=vertices, mesh_faces=faces, representation=representation)


@dataclass(frozen=True)
class HandedOver:
    """The first call of a novel-view refinement: generated, cameras recovered, novel views rendered.

    Args:
        seed: The generation seed that was used.
        state: What the second call needs back.
        plan: The recovered cameras and the novel views (their cameras and renders).
        timings: Seconds per stage so far.
        notes: Things the caller should know.
    """

    seed: int
    state: GenerationState
    plan: NovelViewPlan
    timings: dict[Stage, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class StageClock:
    """Accumulates wall time per stage; a stage entered twice adds up."""

    def __init__(self) -> None:
        self.timings: dict[Stage, float] = {}

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[None]:
        """Time the body as part of ``stage``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
