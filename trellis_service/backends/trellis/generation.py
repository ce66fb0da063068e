"""One TRELLIS generation: ``run`` / ``run_multi_image`` as upstream documents them, then the export to the
CPU-side :class:`~trellis_service.domain.GeneratedAsset` (the GLB bake and the Gaussians' PLY)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Set
from typing import TYPE_CHECKING, Any

from PIL import Image

from trellis_service.backends.trellis.instrumentation import instrumented
from trellis_service.domain import GeneratedAsset, StageClock
from trellis_service.exporters import PlyDocument, SplatArrays, written_ply
from trellis_service.preflight import u2net_path
from trellisbox._domain.errors import ModelUnavailable
from trellisbox._domain.imaging import has_real_alpha
from trellisbox._domain.kinds import ArtifactKind, Stage
from trellisbox._domain.params import GenerationParams, MultiImageMode, random_seed
from trellisbox._runtime.worker import JobContext

if TYPE_CHECKING:
    from trellis_service.gaussian_refinement import RefinementReport

#: Only what the GLB bake and the PLY need.
_OUTPUT_FORMATS = ["gaussian", "mesh"]


def generate_asset(pipeline: Any, postprocessing: Any, images: list[Image.Image], params: GenerationParams,
                   formats: Set[ArtifactKind], ctx: JobContext, *, offline: bool, device: str = "cuda"
                   ) -> GeneratedAsset:
    """Generate one asset with a loaded pipeline.

    Args:
        pipeline: The loaded ``TrellisImageTo3DPipeline``.
        postprocessing: ``trellis.utils.postprocessing_utils`` (``to_glb``).
        images: One image, or several views of one object (``run_multi_image``).
        params: Validated generation parameters.
        formats: What to produce.
        ctx: Progress reporting and cancellation of this job.
        offline: Downloads are off: an image that needs background removal without u2net.onnx is refused.
        device: Where the Gaussian refinement computes (when the request asks for it).

    Returns:
        The asset with the CPU-side mesh and splats asked for.
    """
    seed = params.seed if params.seed is not None else random_seed()
    notes: list[str] = []
    u2net = u2net_path(os.environ)
    if offline and not u2net.is_file() and not all(has_real_alpha(image) for image in images):
        raise ModelUnavailable(
            f"an input image has no alpha channel, so TRELLIS must remove its background with rembg, but "
            f"{u2net} is missing and downloads are off. Send RGBA images with a cut-out, or "
            "install u2net.onnx under U2NET_HOME."
        )
    clock = StageClock()
    total = export_steps(formats)
    ctx.raise_if_stopped()
    with instrumented(pipeline, ctx, clock, params, len(images), total):
        outputs = _sample(pipeline, images, params, seed, notes)
    gaussian, mesh = outputs["gaussian"][0], outputs["mesh"][0]
    glb_mesh: Any = None
    splats: PlyDocument | SplatArrays | None = None
    report: RefinementReport | None = None
    if params.gaussian_refinement.enabled:
        from trellis_service.gaussian_refinement import refine_splats  # torch: only when asked for
        from trellis_service.gaussian_refinement.gaussians import read_splat_ply

        with clock.stage(Stage.GAUSSIAN_REFINEMENT):
            ctx.raise_if_stopped()
            generated = read_splat_ply(written_ply(gaussian.save_ply).data)
            refined = refine_splats(generated, images, params.gaussian_refinement, ctx, seed=seed, device=device)
            load_splats(gaussian, refined.splats)  # the GLB below is baked from the refined Gaussians
            splats, report = refined.splats, refined.report
    with clock.stage(Stage.EXPORT):
        if ArtifactKind.GLB in formats:
            ctx.raise_if_stopped()
            ctx.report(Stage.EXPORT, 1, total, "simplifying and baking the texture")
            glb_mesh = postprocessing.to_glb(
                gaussian, mesh, simplify=params.mesh_simplify, texture_size=params.texture_size,
            )
        if ArtifactKind.GAUSSIAN_PLY in formats and splats is None:
            ctx.raise_if_stopped()
            ctx.report(Stage.EXPORT, total - 1, total, "copying the Gaussians off the GPU")
            splats = written_ply(gaussian.save_ply)
        ctx.report(Stage.EXPORT, total, total, "done")
    if ArtifactKind.GAUSSIAN_PLY not in formats:
        splats = None
    return GeneratedAsset(seed=seed, mesh=glb_mesh, splats=splats, timings=clock.timings, notes=notes,
                          refinement=report)


def load_splats(gaussian: Any, splats: SplatArrays) -> None:
    """Put ``splats`` (y-up PLY frame) into upstream's ``Gaussian`` through its own reader, ``load_ply``, which
    undoes the frame change ``save_ply`` made."""
    with tempfile.TemporaryDirectory(prefix="trellisbox-refined-") as folder:
        path = os.path.join(folder, "refined.ply")
        with open(path, "wb") as handle:
            handle.write(splats.ply_bytes())
        gaussian.load_ply(path)


def export_steps(formats: Set[ArtifactKind]) -> int:
    """Steps of the export stage: decode_slat, then the bake for GLB, then the PLY copy."""
    return 1 + int(ArtifactKind.GLB in formats) + int(ArtifactKind.GAUSSIAN_PLY in formats)


def _sample(pipeline: Any, images: list[Image.Image], params: GenerationParams, seed: int,
            notes: list[str]) -> dict[str, Any]:
    """Upstream's own entry point: ``run`` for one image, ``run_multi_image`` for several (noted in ``notes``)."""
    sparse = {"steps": params.sparse_structure.steps, "cfg_strength": params.sparse_structure.cfg_strength}
    slat = {"steps": params.slat.steps, "cfg_strength": params.slat.cfg_strength}
    if len(images) == 1:
        outputs: dict[str, Any] = pipeline.run(
            images[0], seed=seed, sparse_structure_sampler_params=sparse, slat_sampler_params=slat,
            formats=_OUTPUT_FORMATS, preprocess_image=True,
        )
        return outputs
    mode = params.multi_image_mode.value
    notes.append(f"{len(images)} views combined with run_multi_image(mode={mode!r})")
    if params.multi_image_mode is MultiImageMode.STOCHASTIC and len(images) > min(
            params.sparse_structure.steps, params.slat.steps):
        notes.append("more views than sampler steps: in stochastic mode some views are never used; "
                     "raise the steps or use multidiffusion")
    outputs = pipeline.run_multi_image(
        images, seed=seed, sparse_structure_sampler_params=sparse, slat_sampler_params=slat,
        formats=_OUTPUT_FORMATS, preprocess_image=True, mode=mode,
    )
    return outputs
