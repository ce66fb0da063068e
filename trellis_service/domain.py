"""Domain types of the TRELLIS service: what a backend returns and how stage time is measured.

Backends never see protobuf; the servicer turns a :class:`GenerationResult` into the stream's
artifact chunks and ``ImageTo3DDone``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from trellisbox._domain.artifacts import Artifact


@dataclass(frozen=True)
class GenerationResult:
    """One generated 3D asset.

    Args:
        artifacts: The requested artifacts (GLB first, then Gaussian PLY).
        seed: The seed that was used (echoed to the caller so a run can be repeated).
        timings: Seconds per ``trellisbox.v1.Stage`` value, in the order the stages ran.
        notes: Things the caller should know (e.g. which input the preview used).
    """

    artifacts: list[Artifact]
    seed: int
    timings: dict[int, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class StageClock:
    """Accumulates wall time per stage; a stage entered twice adds up."""

    def __init__(self) -> None:
        self.timings: dict[int, float] = {}

    @contextmanager
    def stage(self, stage: int) -> Iterator[None]:
        """Time the body as part of ``stage`` (a ``trellisbox.v1.Stage`` value)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
