"""The interface every refiner backend implements: :class:`ModelBackend` plus refining, alone or batched."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from trellisbox._domain.errors import Cancelled, DeadlineExceeded, ServiceError
from trellisbox._domain.params import MAX_SEED, RefineParams
from trellisbox._runtime.model import ModelBackend
from trellisbox._runtime.worker import JobContext

# Small and short (2 UNet steps), yet it runs every sub-model once: kernels and allocator are warm.
_WARM_UP_IMAGE_SIZE = (128, 128)
_WARM_UP_PARAMS = RefineParams(strength=0.5, num_inference_steps=4)


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


class RefinerBackend(ModelBackend):
    """Refines images with one model (or none), on the service's one model thread.

    Implementations load lazily or in :meth:`load`, report progress through ``ctx`` and stop at the next
    step boundary once ``ctx.should_stop`` (raising ``Cancelled`` or ``DeadlineExceeded``).
    """

    # True when refine_batch() shares one model call between requests (dynamic batching in the service).
    supports_batching: ClassVar[bool] = False

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

    def warm_up(self) -> None:
        """Refine one small grey image in two UNet steps."""
        self.refine([Image.new("RGB", _WARM_UP_IMAGE_SIZE, (127, 127, 127))], _WARM_UP_PARAMS, [0])

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
