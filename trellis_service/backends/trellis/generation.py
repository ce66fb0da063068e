"""One TRELLIS generation: ``run`` / ``run_multi_image`` as upstream documents them, then the export to the
CPU-side :class:`~trellis_service.domain.GeneratedAsset` (the GLB bake and the Gaussians' PLY)."""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Set
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from trellis_service.backends.trellis.instrumentation import instrumented
from trellis_service.domain import GeneratedAsset, GenerationState, HandedOver, StageClock
from trellis_service.exporters import PlyDocument, SplatArrays, written_ply
from trellis_service.preflight import u2net_path
from trellisbox._domain.errors import InvalidInput, ModelUnavailable
from trellisbox._domain.imaging import has_real_alpha
from trellisbox._domain.kinds import ArtifactKind, Stage
from trellisbox._domain.params import GenerationParams, MultiImageMode, random_seed
from trellisbox._runtime.worker import JobContext

if TYPE_CHECKING:
    from trellis_service.gaussian_refinement import NovelViewPlan, RefinementReport

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
    clock = StageClock()
    total = export_steps(formats)
    outputs = _generate(pipeline, images, params, seed, notes, ctx, clock, total, offline=offline)
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


def hand_over_asset(pipeline: Any, images: list[Image.Image], params: GenerationParams, ctx: JobContext, *,
                    offline: bool, device: str = "cuda") -> HandedOver:
    """The first call of a novel-view refinement: generate, then recover the images' cameras and render the novel
    views from the generated Gaussians. What the bake needs later travels in the state: the Gaussians (upstream's
    ``save_ply``), their ``init_params`` and the extracted mesh's vertices and faces (all ``to_glb`` reads of it).
    Arguments as :func:`generate_asset`."""
    from trellis_service.gaussian_refinement import plan_novel_views  # torch: only when asked for
    from trellis_service.gaussian_refinement.gaussians import read_splat_ply

    seed = params.seed if params.seed is not None else random_seed()
    notes: list[str] = []
    clock = StageClock()
    outputs = _generate(pipeline, images, params, seed, notes, ctx, clock, export_steps(set()), offline=offline)
    gaussian, mesh = outputs["gaussian"][0], outputs["mesh"][0]
    with clock.stage(Stage.GAUSSIAN_REFINEMENT):
        ctx.raise_if_stopped()
        splats = written_ply(gaussian.save_ply).data
        plan = plan_novel_views(read_splat_ply(splats), images, params.gaussian_refinement, ctx, seed=seed,
                                device=device)
    state = GenerationState(splats=splats, mesh_vertices=_host_array(mesh.vertices, np.float32),
                            mesh_faces=_host_array(mesh.faces, np.int32),
                            representation=dict(getattr(gaussian, "init_params", {})))
    return HandedOver(seed=seed, state=state, plan=plan, timings=clock.timings, notes=notes)


def refine_handed_over_asset(postprocessing: Any, state: GenerationState, plan: NovelViewPlan,
                             images: list[Image.Image], params: GenerationParams, formats: Set[ArtifactKind],
                             seed: int, ctx: JobContext, *, device: str = "cuda") -> GeneratedAsset:
    """The second call: fit to the images and the refined novel views, then bake the GLB from the refined Gaussians
    (a fresh upstream ``Gaussian`` with the handed-over ``init_params``, and a ``MeshExtractResult`` of the
    handed-over mesh)."""
    from trellis_service.gaussian_refinement import refine_splats  # torch: only when asked for
    from trellis_service.gaussian_refinement.gaussians import read_splat_ply

    clock = StageClock()
    with clock.stage(Stage.GAUSSIAN_REFINEMENT):
        refined = refine_splats(read_splat_ply(state.splats), images, params.gaussian_refinement, ctx, seed=seed,
                                device=device, plan=plan)
    glb_mesh: Any = None
    with clock.stage(Stage.EXPORT):
        if ArtifactKind.GLB in formats:
            ctx.raise_if_stopped()
            ctx.report(Stage.EXPORT, 0, 1, "simplifying and baking the texture")
            glb_mesh = postprocessing.to_glb(
                _upstream_gaussian(state, refined.splats, device), _upstream_mesh(state, device),
                simplify=params.mesh_simplify, texture_size=params.texture_size,
            )
        ctx.report(Stage.EXPORT, 1, 1, "done")
    return GeneratedAsset(seed=seed, mesh=glb_mesh,
                          splats=refined.splats if ArtifactKind.GAUSSIAN_PLY in formats else None,
                          timings=clock.timings, refinement=refined.report)


#: ``Gaussian.__init__`` arguments upstream keeps in ``init_params``; nothing else is passed on from a state.
_GAUSSIAN_INIT_PARAMS = frozenset({"aabb", "sh_degree", "mininum_kernel_size", "scaling_bias", "opacity_bias",
                                   "scaling_activation"})


def _upstream_gaussian(state: GenerationState, splats: SplatArrays, device: str) -> Any:
    unknown = set(state.representation) - _GAUSSIAN_INIT_PARAMS
    if unknown or "aabb" not in state.representation:
        raise InvalidInput(f"state: representation.json must hold upstream Gaussian.init_params (aabb, ...); "
                           f"got {sorted(state.representation)}")
    representations = importlib.import_module("trellis.representations")
    gaussian = representations.Gaussian(**state.representation, device=device)
    load_splats(gaussian, splats)
    return gaussian


def _upstream_mesh(state: GenerationState, device: str) -> Any:
    import torch

    if state.mesh_vertices is None or state.mesh_faces is None:
        raise InvalidInput("state: no mesh to bake the GLB on; send the GENERATION_STATE of a TRELLIS ImageTo3D call")
    representations = importlib.import_module("trellis.representations")
    return representations.MeshExtractResult(vertices=torch.as_tensor(state.mesh_vertices, device=device),
                                             faces=torch.as_tensor(state.mesh_faces, device=device))


def _host_array(values: Any, dtype: type[np.generic]) -> Any:
    """A tensor (or array) as a contiguous host array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(values, dtype=dtype))


#: The frame change upstream's ``save_ply`` applies by default (its z-up frame to the y-up of viewers): a quarter
#: turn about x. Its ``load_ply`` cannot undo it (with a transform it reads a variable it never set), so refined
#: splats go back in TRELLIS's own frame and are loaded with ``transform=None``.
SAVE_PLY_TRANSFORM = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=np.float32)


def to_trellis_frame(splats: SplatArrays) -> SplatArrays:
    """``splats`` (y-up, as ``save_ply`` wrote them) in TRELLIS's z-up frame: positions and normals times the
    transform's inverse, rotations composed with it (quaternion of the quarter turn, conjugated, on the left)."""
    half = np.float32(np.sqrt(0.5))
    w, x, y, z = (np.asarray(splats.rotation, dtype=np.float32)[:, k] for k in range(4))
    rotation = np.stack([half * (w + x), half * (x - w), half * (y + z), half * (z - y)], axis=1)
    return SplatArrays(xyz=np.asarray(splats.xyz, dtype=np.float32) @ SAVE_PLY_TRANSFORM,
                       normals=np.asarray(splats.normals, dtype=np.float32) @ SAVE_PLY_TRANSFORM,
                       f_dc=splats.f_dc, opacity=splats.opacity, scale=splats.scale, rotation=rotation)


def load_splats(gaussian: Any, splats: SplatArrays) -> None:
    """Put ``splats`` (y-up PLY frame) into upstream's ``Gaussian`` through its own reader, ``load_ply``, given them
    in its own frame (see :data:`SAVE_PLY_TRANSFORM`)."""
    with tempfile.TemporaryDirectory(prefix="trellisbox-refined-") as folder:
        path = os.path.join(folder, "refined.ply")
        with open(path, "wb") as handle:
            handle.write(to_trellis_frame(splats).ply_bytes())
        gaussian.load_ply(path, transform=None)


def export_steps(formats: Set[ArtifactKind]) -> int:
    """Steps of the export stage: decode_slat, then the bake for GLB, then the PLY copy."""
    return 1 + int(ArtifactKind.GLB in formats) + int(ArtifactKind.GAUSSIAN_PLY in formats)


def _generate(pipeline: Any, images: list[Image.Image], params: GenerationParams, seed: int, notes: list[str],
              ctx: JobContext, clock: StageClock, total: int, *, offline: bool) -> dict[str, Any]:
    """Sample with progress and timing; an image that needs background removal is refused first when rembg's
    model is missing and downloads are off."""
    u2net = u2net_path(os.environ)
    if offline and not u2net.is_file() and not all(has_real_alpha(image) for image in images):
        raise ModelUnavailable(
            f"an input image has no alpha channel, so TRELLIS must remove its background with rembg, but "
            f"{u2net} is missing and downloads are off. Send RGBA images with a cut-out, or "
            "install u2net.onnx under U2NET_HOME."
        )
    ctx.raise_if_stopped()
    with instrumented(pipeline, ctx, clock, params, len(images), total):
        return _sample(pipeline, images, params, seed, notes)


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
