"""The interface every refiner backend implements. Backends see domain objects, never protobuf."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from trellisbox._domain.errors import Cancelled, DeadlineExceeded, ServiceError
from trellisbox._domain.params import MAX_SEED, RefineParams
from trellisbox._runtime.worker import JobContext


def seeds_for(first: int, count: int) -> list[int]:
    """Seeds of a batch: image ``i`` uses ``first + i``, wrapped so every seed stays in [0, MAX_SEED]."""
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]


def stop_reason(ctx: JobContext) -> ServiceError:
    """The error a stopped job ends with: ``Cancelled`` or ``DeadlineExceeded`` (``ctx.should_stop`` is true)."""
    try:
        ctx.raise_if_stopped()
    except (Cancelled, DeadlineExceeded) as exc:
        return exc
    return Cancelled("cancelled by the caller")  # should_stop flipped back: cannot happen with JobContext


@dataclass(frozen=True)
class BatchMember:
    """One request's share of a batched model call.

    Args:
        images: The request's images, RGB or RGBA.
        seeds: One seed per image (seed semantics as in :meth:`RefinerBackend.refine`).
        params: The request's parameters. ``prompt`` and ``negative_prompt`` are its own; the other fields
            equal those of every member of the batch (the batch key guarantees it).
        ctx: The request's own progress and cancellation; None outside the service.
        on_stop: Called on the model thread as soon as this member stops (cancel, deadline) while the rest
            of the batch goes on, so its caller hears about it now rather than when the batch ends.
    """

    images: Sequence[Image.Image]
    seeds: Sequence[int]
    params: RefineParams
    ctx: JobContext | None = None
    on_stop: Callable[[ServiceError], None] | None = None


# What a batched call hands back per member: its images, or the error that stopped it.
MemberOutcome = list[Image.Image] | ServiceError


class RefinerBackend(ABC):
    """Refines images with one model (or none). Not thread-safe: call from one thread (the model worker).

    Implementations load lazily or in :meth:`load`, report progress through ``ctx`` and stop at the next
    step boundary once ``ctx.should_stop`` (raising ``Cancelled`` or ``DeadlineExceeded``).
    """

    name: ClassVar[str]
    # True when refine_batch() shares one model call between requests (dynamic batching in the service).
    supports_batching: ClassVar[bool] = False

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

    def batch_key(self, images: Sequence[Image.Image], params: RefineParams) -> Hashable | None:
        """Requests with equal keys may share one :meth:`refine_batch` call; None: this one never shares."""
        return None

    def refine_batch(self, members: Sequence[BatchMember]) -> list[MemberOutcome]:
        """Refine several requests' images; backends that cannot share a model call run them one by one.

        A member that stops (``ctx.should_stop``) gets its ``Cancelled`` / ``DeadlineExceeded`` as its outcome
        and does not stop the others.

        Returns:
            One outcome per member, in order: its refined images, or the error that stopped it.
        """
        outcomes: list[MemberOutcome] = []
        for member in members:
            if member.ctx is not None and member.ctx.should_stop:
                outcomes.append(stop_reason(member.ctx))
                continue
            try:
                outcomes.append(self.refine(member.images, member.params, member.seeds, member.ctx))
            except (Cancelled, DeadlineExceeded) as exc:
                outcomes.append(exc)
        return outcomes

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
