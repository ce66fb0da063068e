"""The interface every image-to-3D backend implements. Backends never see protobuf."""

from __future__ import annotations

import abc
from collections.abc import Set

from PIL import Image

from trellis_service.domain import GenerationResult
from trellisbox._domain.params import GenerationParams
from trellisbox._runtime.worker import JobContext


class ImageTo3DBackend(abc.ABC):
    """One image-to-3D model. Every method is called on the service's single model thread.

    Upstream pipelines are not thread-safe, so a backend instance is only ever driven by one
    :class:`~trellisbox._runtime.worker.ModelWorker`; implementations need no locking of their own.
    """

    #: Short name reported to callers ("trellis", "preview").
    name: str = ""

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where the model runs ("cuda:0", "cpu")."""

    def preflight(self) -> list[str]:
        """Check that the backend can load here, before loading anything heavy.

        Returns:
            Warnings worth logging (the backend can still run).

        Raises:
            ModelUnavailable: it cannot run here; the message names the cause and the fix.
        """
        return []

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model (idempotent)."""

    @abc.abstractmethod
    def generate(self, images: list[Image.Image], params: GenerationParams, formats: Set[int],
                 ctx: JobContext) -> GenerationResult:
        """Generate one asset from one image or several views of one object.

        Args:
            images: Decoded RGB or RGBA images (at least one).
            params: Validated generation parameters.
            formats: ``ArtifactKind`` values to produce (GLB and/or GAUSSIAN_PLY).
            ctx: Progress reporting and cancellation of this job.
        """

    def unload(self) -> None:  # noqa: B027 - optional hook, nothing to free by default
        """Free the model (GPU memory)."""

    def to_gpu(self) -> None:  # noqa: B027 - CPU backends have nothing to move
        """Move a loaded model onto its GPU (idempotent); a shared GPU's turn starts with this."""

    def to_host(self) -> None:  # noqa: B027
        """Park a loaded model in host RAM and free its VRAM; a shared GPU's turn ends with this."""

    def describe(self) -> str:
        """One line for the log: backend, device and what it runs."""
        return f"backend={self.name} device={self.device}"
