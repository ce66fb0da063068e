"""Domain types of the TRELLIS service: what a backend produces, and how its stage time is measured.

Backends never see protobuf and never encode files: a backend returns a :class:`GeneratedAsset` holding the
textured mesh and the Gaussian splats on the CPU; the servicer encodes them into GLB and PLY
(:func:`trellis_service.exporters.encode_asset`) off the model thread, as the refiner's servicer encodes
its PNGs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trimesh

from trellisbox._domain.kinds import Stage

if TYPE_CHECKING:
    from trellis_service.gaussian_refinement import RefinementReport


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
