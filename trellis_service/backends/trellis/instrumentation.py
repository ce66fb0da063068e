"""Progress, stage timing and cancellation for one TRELLIS call, without touching upstream code.

For the duration of one ``run`` / ``run_multi_image`` the pipeline's stage methods and its samplers'
``sample_once`` are shadowed by instance attributes that report progress, time the stage and check for
cancellation first; afterwards every instance is as upstream left it, including after a cancel inside
``run_multi_image`` (whose sampler patch upstream undoes only on success).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from trellis_service.domain import StageClock
from trellisbox._domain.kinds import Stage
from trellisbox._domain.params import GenerationParams
from trellisbox._runtime.worker import JobContext

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


@contextlib.contextmanager
def instrumented(pipeline: Any, ctx: JobContext, clock: StageClock, params: GenerationParams, n_images: int,
                 export_steps: int) -> Iterator[None]:
    """Wrap the pipeline's stage methods (instance attributes shadow the class's) for the duration of
    one call: progress and timing per stage, a cancellation check before each stage and sampler step.

    Args:
        pipeline: The loaded ``TrellisImageTo3DPipeline``.
        ctx: Progress reporting and cancellation of this job.
        clock: Where the stage times add up.
        params: The sampler steps, the totals of the sampler stages' progress.
        n_images: The number of input images (the preprocess stage's total).
        export_steps: The export stage's total (decoding is its first step).
    """
    patches: list[tuple[object, str, object]] = []  # (target, name, previous instance attribute)
    missing = object()

    def patch(target: object, name: str, make: Wrap) -> None:
        patches.append((target, name, vars(target).get(name, missing)))
        setattr(target, name, make(getattr(target, name)))

    def staged(stage: Stage, before: Callable[[], None]) -> Wrap:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                ctx.raise_if_stopped()
                before()
                with clock.stage(stage):
                    return original(*args, **kwargs)
            return wrapper
        return make

    def sampler_steps(stage: Stage, total: int, message: str) -> Wrap:
        done = [0]

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                ctx.raise_if_stopped()
                out = original(*args, **kwargs)
                done[0] += 1
                ctx.report(stage, min(done[0], total), total, message)
                return out
            return wrapper
        return make

    preprocessed = [0]

    def before_preprocess() -> None:
        ctx.report(Stage.PREPROCESS, preprocessed[0], n_images, "removing background and cropping")
        preprocessed[0] += 1

    patch(pipeline, "preprocess_image", staged(Stage.PREPROCESS, before_preprocess))
    patch(pipeline, "get_cond", staged(
        Stage.PREPROCESS, lambda: ctx.report(
            Stage.PREPROCESS, n_images, n_images, "encoding the image with DINOv2")))
    patch(pipeline, "sample_sparse_structure", staged(
        Stage.SPARSE_STRUCTURE, lambda: ctx.report(
            Stage.SPARSE_STRUCTURE, 0, params.sparse_structure.steps, "sampling sparse structure")))
    patch(pipeline, "sample_slat", staged(
        Stage.SLAT, lambda: ctx.report(
            Stage.SLAT, 0, params.slat.steps, "sampling structured latent")))
    patch(pipeline, "decode_slat", staged(
        Stage.EXPORT, lambda: ctx.report(
            Stage.EXPORT, 0, export_steps, "decoding mesh and Gaussians")))
    samplers = [getattr(pipeline, name, None) for name in ("sparse_structure_sampler", "slat_sampler")]
    for sampler, stage, total, message in (
        (samplers[0], Stage.SPARSE_STRUCTURE, params.sparse_structure.steps, "sparse structure step"),
        (samplers[1], Stage.SLAT, params.slat.steps, "structured latent step"),
    ):
        if sampler is not None and hasattr(sampler, "sample_once"):
            patch(sampler, "sample_once", sampler_steps(stage, total, message))
    try:
        yield
    finally:
        for target, name, previous in reversed(patches):
            if previous is missing:
                with contextlib.suppress(AttributeError):
                    delattr(target, name)
            else:
                setattr(target, name, previous)
        for sampler in samplers:
            restore_sampler(sampler)


def restore_sampler(sampler: Any) -> None:
    """Undo ``run_multi_image``'s ``inject_sampler_multi_image`` if a cancel left it in place: upstream restores
    the sampler only on success, and a patched sampler would break every later run."""
    if sampler is not None and "_old_inference_model" in vars(sampler):
        sampler._inference_model = sampler._old_inference_model
        delattr(sampler, "_old_inference_model")
