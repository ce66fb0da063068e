"""The interface every refiner backend implements. Backends see domain objects, never protobuf."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from PIL import Image

from trellisbox.params import MAX_SEED, RefineParams
from trellisbox.worker import JobContext


def seeds_for(first: int, count: int) -> list[int]:
    """Seeds of a batch: image ``i`` uses ``first + i``, wrapped so every seed stays in [0, MAX_SEED]."""
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]


class RefinerBackend(ABC):
    """Refines images with one model (or none). Not thread-safe: call from one thread (the model worker).

    Implementations load lazily or in :meth:`load`, report progress through ``ctx`` and stop at the next
    step boundary once ``ctx.should_stop`` (raising ``Cancelled`` or ``DeadlineExceeded``).
    """

    name: ClassVar[str]

    @property
    @abstractmethod
    def device(self) -> str:
        """Where it runs: ``cpu`` or ``cuda:N`` once loaded (the configured spec before)."""

    @property
    @abstractmethod
    def loaded(self) -> bool:
        """True while the model is in memory."""

    @abstractmethod
    def load(self) -> None:
        """Load the model (idempotent). Raises ``ModelUnavailable`` when it cannot run here."""

    def check(self, params: RefineParams) -> None:
        """Raise ``InvalidInput`` for parameters this backend cannot run (called before queueing)."""
        return None  # every parameter in RefineParams' ranges works unless a backend says otherwise

    @abstractmethod
    def refine(self, images: Sequence[Image.Image], params: RefineParams, seeds: Sequence[int],
               ctx: JobContext | None = None) -> list[Image.Image]:
        """Refine each image (RGB or RGBA; alpha is kept) with ``seeds[i]``; loads first if needed.

        Args:
            images: Input images, RGB or RGBA.
            params: Validated parameters; ``params.seed`` is ignored in favour of ``seeds``.
            seeds: One seed per image.
            ctx: Progress and cancellation of the running job; None outside the service.

        Returns:
            One image per input, same size and mode as the input.
        """

    @abstractmethod
    def unload(self) -> None:
        """Free the model and its device memory (idempotent); the next refine loads again."""

    def to_gpu(self) -> None:
        """Move a loaded model onto its GPU (idempotent); a shared GPU's turn starts with this."""
        return None  # CPU backends have nothing to move

    def to_host(self) -> None:
        """Park a loaded model in host RAM and free its VRAM; a shared GPU's turn ends with this."""
        return None

    def describe(self) -> str:
        return f"backend={self.name} device={self.device}"
