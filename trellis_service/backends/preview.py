"""The ``preview`` backend: a textured, watertight 3D asset from one image on a CPU, without weights.

It is not TRELLIS. It cuts the object out (alpha channel, or the background colour estimated from
the image border), inflates the silhouette into a closed "pillow" (height grows with the square root
of the distance to the outline, front and back surfaces joined by a thin rim), and projects the image
onto it as the baseColor texture. The point is an honest end-to-end path (gRPC, streaming, GLB, PLY,
validators) on machines that cannot run TRELLIS, and a fast placeholder for UIs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import trimesh
from PIL import Image
from scipy import ndimage

from trellis_service.backends.base import ImageTo3DBackend
from trellis_service.domain import GeneratedAsset, GenerationState, HandedOver, StageClock
from trellis_service.exporters import SH_C0, ExportError, SplatArrays
from trellisbox._domain.imaging import has_real_alpha
from trellisbox._domain.kinds import ArtifactKind, Stage
from trellisbox._domain.params import GenerationParams, random_seed
from trellisbox._runtime.model import WeightFreeBackend
from trellisbox._runtime.worker import JobContext

if TYPE_CHECKING:
    from trellis_service.gaussian_refinement import NovelViewPlan, RefinementReport

_log = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Longest side of the copy the silhouette is computed on (the texture uses the full image).
WORK_SIDE = 512
#: Grid cells across the object's longer side at mesh_simplify = 0; fewer as simplify grows.
MAX_GRID = 400
MIN_GRID = 24
#: Inflation depth as a fraction of the largest inscribed radius (1.0 would make a disc a sphere).
DEPTH_RATIO = 0.8
#: A foreground smaller than this fraction of the image is treated as "nothing found".
MIN_FOREGROUND = 0.002


@dataclass(frozen=True)
class Silhouette:
    """The object's cut-out.

    Args:
        mask: Foreground at work resolution (True = object), cleaned: one component, no holes.
        scale: Work resolution / original resolution, per axis (x, y).
        box: Crop of the object in original pixel coordinates (left, top, right, bottom).
        source: "alpha", "background" or "whole image".
        colour_mask: Pixels whose colour belongs to the object (``mask`` without the filled holes):
            the texture takes hole colours from the object around them, not from the background.
        notes: What the caller should know about how it was found.
    """

    mask: BoolArray
    scale: tuple[float, float]
    box: tuple[int, int, int, int]
    source: str
    colour_mask: BoolArray
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class InflatedMesh:
    """A closed triangle mesh with one UV per vertex.

    Args:
        vertices: (V, 3) positions, y up, the image facing +z, the longer side one unit long.
        faces: (F, 3) vertex indices, counter-clockwise seen from outside.
        uv: (V, 2) texture coordinates in trimesh's convention (v grows upwards).
    """

    vertices: FloatArray
    faces: IntArray
    uv: FloatArray


def grid_resolution(mesh_simplify: float) -> int:
    """Cells across the longer side: the face count scales with (1 - simplify), like upstream's."""
    return round(float(np.clip(MAX_GRID * math.sqrt(1.0 - mesh_simplify), MIN_GRID, MAX_GRID)))


def splat_count(mesh_simplify: float) -> int:
    return int(np.clip(round(400_000 * (1.0 - mesh_simplify)), 4_000, 200_000))


def largest_component(mask: BoolArray) -> BoolArray:
    """The largest 4-connected foreground component with its holes filled."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(ndimage.binary_fill_holes(labels == int(sizes.argmax())), dtype=bool)


def remove_pinches(grid: BoolArray, max_rounds: int = 256) -> BoolArray:
    """Add cells where two cells touch only at a corner, so the outline is one simple loop.

    A corner-only contact would make a vertex shared by two separate fans of faces (non-manifold).
    Cells are only ever added, so this terminates; holes created on the way are filled.
    """
    grid = grid.copy()
    for _ in range(max_rounds):
        p = np.pad(grid, 1)
        a, b, c, d = p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]
        diag = a & d & ~b & ~c  # fill b: padded (i, j+1) -> grid (i-1, j)
        anti = b & c & ~a & ~d  # fill a: padded (i, j) -> grid (i-1, j-1)
        if not diag.any() and not anti.any():
            return grid
        i, j = np.nonzero(diag)
        grid[i - 1, j] = True
        i, j = np.nonzero(anti)
        grid[i - 1, j - 1] = True
        grid = np.asarray(ndimage.binary_fill_holes(grid), dtype=bool)
    raise RuntimeError("could not remove corner contacts from the silhouette")


def extract_silhouette(image: Image.Image, work_side: int = WORK_SIDE) -> Silhouette:
    """Find the object: from a real alpha channel, else from the background colour at the border."""
    width, height = image.size
    factor = min(1.0, work_side / max(width, height))
    work_size = (max(1, round(width * factor)), max(1, round(height * factor)))
    small = image.resize(work_size, Image.Resampling.BOX) if factor < 1.0 else image
    # Per axis: rounding makes the two factors differ slightly, and boxes must stay inside the mask.
    sx, sy = work_size[0] / width, work_size[1] / height
    notes: list[str] = []
    if has_real_alpha(image):
        raw = np.asarray(small.getchannel("A")) >= 128
        source = "alpha"
        notes.append("silhouette from the alpha channel")
    else:
        rgb = np.asarray(small.convert("RGB"), dtype=np.float32)
        rows, cols = rgb.shape[:2]
        band = max(1, round(0.02 * min(rows, cols)))
        border = np.concatenate([
            rgb[:band].reshape(-1, 3), rgb[-band:].reshape(-1, 3),
            rgb[:, :band].reshape(-1, 3), rgb[:, -band:].reshape(-1, 3),
        ])
        background = np.median(border, axis=0)
        noise = float(np.percentile(np.linalg.norm(border - background, axis=1), 95))
        threshold = max(28.0, 1.5 * noise + 8.0)
        raw = np.linalg.norm(rgb - background, axis=2) > threshold
        source = "background"
        colour = "#{:02x}{:02x}{:02x}".format(*(round(float(v)) for v in background))
        notes.append(f"no alpha channel: silhouette from the background colour {colour} at the border")
        if noise > 40.0:
            notes.append("the image border is not one colour, so the cut-out is approximate; "
                         "send a PNG with alpha for a clean silhouette")
    opened = ndimage.binary_opening(raw, structure=ndimage.generate_binary_structure(2, 1))
    mask = largest_component(opened if opened.any() else raw)
    colour_mask = mask & raw
    if mask.sum() < MIN_FOREGROUND * mask.size:
        mask = colour_mask = np.ones_like(mask)
        source = "whole image"
        notes.append("no object found in the image: the whole image was used as a flat card")
    rows_any = np.nonzero(mask.any(axis=1))[0]
    cols_any = np.nonzero(mask.any(axis=0))[0]
    # One work pixel of margin so the outline never touches the crop border.
    left = max(0.0, (cols_any[0] - 1) / sx)
    top = max(0.0, (rows_any[0] - 1) / sy)
    right = min(float(width), (cols_any[-1] + 2) / sx)
    bottom = min(float(height), (rows_any[-1] + 2) / sy)
    box = (math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom))
    return Silhouette(mask=mask, scale=(sx, sy), box=box, source=source, colour_mask=colour_mask,
                      notes=tuple(notes))


def _work_box(silhouette: Silhouette) -> tuple[float, float, float, float]:
    left, top, right, bottom = silhouette.box
    sx, sy = silhouette.scale
    rows, cols = silhouette.mask.shape
    return (left * sx, top * sy, min(right * sx, float(cols)), min(bottom * sy, float(rows)))


def grid_mask(silhouette: Silhouette, resolution: int) -> BoolArray:
    """The silhouette on the mesh grid: ``resolution`` cells across the longer side of the crop."""
    left, top, right, bottom = silhouette.box
    crop_w, crop_h = right - left, bottom - top
    longest = max(crop_w, crop_h)
    size = (max(2, round(resolution * crop_w / longest)), max(2, round(resolution * crop_h / longest)))
    mask_image = Image.fromarray(silhouette.mask.astype(np.uint8) * 255)
    cells = np.asarray(mask_image.resize(size, Image.Resampling.BOX, box=_work_box(silhouette))) >= 128
    if not cells.any():  # an object thinner than a cell: keep whatever it touches
        cells = np.asarray(mask_image.resize(size, Image.Resampling.BOX, box=_work_box(silhouette))) > 0
    if not cells.any():
        cells = np.ones_like(cells)
    return remove_pinches(largest_component(cells))


def inflate(grid: BoolArray, width: float, height: float, depth_ratio: float = DEPTH_RATIO) -> InflatedMesh:
    """Inflate a grid silhouette into a closed mesh of ``width`` × ``height`` world units.

    Front (+z) and back (−z) surfaces share the grid's corner vertices layout; their heights grow
    with the square root of the distance to the outline, and a rim of side faces joins them along the
    outline. Every edge has exactly two faces, orientation is consistent and outward.
    """
    rows, cols = grid.shape
    cell_w, cell_h = width / cols, height / rows
    p = np.pad(grid, 1)
    c00, c01, c10, c11 = p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]
    used = c00 | c01 | c10 | c11
    interior = c00 & c01 & c10 & c11
    distance = ndimage.distance_transform_edt(interior, sampling=(cell_h, cell_w))
    dmax = float(distance.max())
    height_map = depth_ratio * dmax * np.sqrt(distance / dmax) if dmax > 0 else np.zeros_like(distance)
    # A minimum half-thickness keeps front and back apart where the object is one cell thin.
    half = height_map + 0.35 * min(cell_w, cell_h)

    index = np.full(used.shape, -1, dtype=np.int64)
    count = int(used.sum())
    index[used] = np.arange(count)
    vi, vj = np.nonzero(used)  # row-major, the same order as the index assignment above
    x = vj * cell_w - width / 2
    y = height / 2 - vi * cell_h
    z = half[used]
    vertices = np.concatenate([np.stack([x, y, z], axis=1), np.stack([x, y, -z], axis=1)])
    uv_front = np.stack([vj / cols, 1.0 - vi / rows], axis=1)
    uv = np.concatenate([uv_front, uv_front])

    ci, cj = np.nonzero(grid)
    tl, tr = index[ci, cj], index[ci, cj + 1]
    bl, br = index[ci + 1, cj], index[ci + 1, cj + 1]
    # Counter-clockwise seen from +z (image rows grow downwards, y upwards).
    front = np.concatenate([np.stack([tl, bl, br], axis=1), np.stack([tl, br, tr], axis=1)])
    back = front[:, ::-1] + count
    edges = front[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    keys = edges[:, 0] * count + edges[:, 1]
    reverse = edges[:, 1] * count + edges[:, 0]
    outline = edges[~np.isin(reverse, keys)]  # directed edges with no face on the other side
    a, b = outline[:, 0], outline[:, 1]
    rim = np.concatenate([np.stack([b, a, a + count], axis=1), np.stack([b, a + count, b + count], axis=1)])
    faces = np.concatenate([front, back, rim]).astype(np.int64)
    return InflatedMesh(vertices=vertices.astype(np.float64), faces=faces, uv=uv.astype(np.float64))


def project_texture(image: Image.Image, silhouette: Silhouette, size: int) -> Image.Image:
    """The object's crop as a ``size`` × ``size`` RGB texture, background replaced by nearby
    foreground colours so that bilinear filtering at the outline does not bleed the background in."""
    left, top, right, bottom = silhouette.box
    box = (float(left), float(top), float(right), float(bottom))
    colour = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box).convert("RGB"))
    mask_image = Image.fromarray(silhouette.colour_mask.astype(np.uint8) * 255)
    inside = np.asarray(mask_image.resize((size, size), Image.Resampling.BILINEAR, box=_work_box(silhouette))) >= 128
    if inside.all() or not inside.any():
        return Image.fromarray(colour, "RGB")
    # Fill on a small copy (a distance transform at full texture size costs more than it is worth).
    low = min(size, 256)
    colour_low = np.asarray(image.resize((low, low), Image.Resampling.BOX, box=box).convert("RGB"))
    inside_low = np.asarray(mask_image.resize((low, low), Image.Resampling.BOX, box=_work_box(silhouette))) >= 192
    if not inside_low.any():
        inside_low = np.asarray(mask_image.resize((low, low), Image.Resampling.BOX, box=_work_box(silhouette))) > 0
    nearest = ndimage.distance_transform_edt(~inside_low, return_distances=False, return_indices=True)
    filled_low = colour_low[nearest[0], nearest[1]]
    filled = np.asarray(Image.fromarray(filled_low, "RGB").resize((size, size), Image.Resampling.BILINEAR))
    return Image.fromarray(np.where(inside[..., None], colour, filled).astype(np.uint8), "RGB")


def textured_trimesh(mesh: InflatedMesh, texture: Image.Image) -> trimesh.Trimesh:
    """A trimesh with a PBR material whose baseColor is ``texture``; smooth normals computed."""
    material = trimesh.visual.material.PBRMaterial(  # type: ignore[no-untyped-call]
        name="preview",
        baseColorTexture=texture,
        baseColorFactor=np.array([255, 255, 255, 255], dtype=np.uint8),
        metallicFactor=0.0,
        roughnessFactor=1.0,
    )
    result = trimesh.Trimesh(
        vertices=mesh.vertices, faces=mesh.faces,
        visual=trimesh.visual.TextureVisuals(uv=mesh.uv, material=material),  # type: ignore[no-untyped-call]
        process=False,
    )
    _ = result.vertex_normals  # cached normals are written to the GLB (smooth shading)
    return result


def sample_splats(mesh: InflatedMesh, texture: Image.Image, count: int, seed: int) -> SplatArrays:
    """``count`` flat Gaussian splats on the surface, coloured from the texture."""
    rng = np.random.default_rng(seed)
    triangles = mesh.vertices[mesh.faces]
    cross = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    double_area = np.linalg.norm(cross, axis=1)
    chosen = rng.choice(len(mesh.faces), size=count, p=double_area / double_area.sum())
    r1 = np.sqrt(rng.random(count))
    r2 = rng.random(count)
    weights = np.stack([1.0 - r1, r1 * (1.0 - r2), r1 * r2], axis=1)[:, :, None]
    xyz = (triangles[chosen] * weights).sum(axis=1)
    uv = (mesh.uv[mesh.faces[chosen]] * weights).sum(axis=1)
    pixels = np.asarray(texture.convert("RGB"), dtype=np.float64) / 255.0
    side = pixels.shape[0] - 1
    col = np.clip(np.round(uv[:, 0] * side), 0, side).astype(np.int64)
    row = np.clip(np.round((1.0 - uv[:, 1]) * side), 0, side).astype(np.int64)
    f_dc = (pixels[row, col] - 0.5) / SH_C0
    normals = cross[chosen] / np.maximum(double_area[chosen], 1e-12)[:, None]
    sigma = math.sqrt(0.5 * float(double_area.sum()) / count) * 0.6
    scale = np.tile(np.log([sigma, sigma, sigma * 0.1]), (count, 1))
    # Quaternion (w, x, y, z) turning +z onto the normal, so each splat lies flat on the surface.
    nx, ny, nz = normals[:, 0], normals[:, 1], normals[:, 2]
    rotation = np.stack([1.0 + nz, -ny, nx, np.zeros_like(nz)], axis=1)
    flipped = nz < -0.999999
    rotation[flipped] = (0.0, 1.0, 0.0, 0.0)
    rotation /= np.linalg.norm(rotation, axis=1, keepdims=True)
    opacity = np.full(count, math.log(0.9 / 0.1))  # logit(0.9)
    f32 = np.float32
    return SplatArrays(xyz.astype(f32), normals.astype(f32), f_dc.astype(f32), opacity.astype(f32),
                       scale.astype(f32), rotation.astype(f32))


#: Said with every refined preview GLB.
PREVIEW_GLB_NOTE = ("preview backend: the GLB keeps its projected texture; only TRELLIS re-bakes the GLB from the "
                    "refined Gaussians")


class PreviewBackend(WeightFreeBackend, ImageTo3DBackend):
    """CPU silhouette inflation: no weights, well under two seconds for a 512×512 image."""

    name = "preview"

    def describe(self) -> str:
        return "backend=preview device=cpu (silhouette inflation, not TRELLIS)"

    def generate(self, images: list[Image.Image], params: GenerationParams, formats: Set[ArtifactKind],
                 ctx: JobContext) -> GeneratedAsset:
        seed = params.seed if params.seed is not None else random_seed()
        clock = StageClock()
        notes = ["preview backend: silhouette inflation on the CPU, not TRELLIS; "
                 "sampler settings and multi_image_mode have no effect"]
        if len(images) > 1:
            notes.append(f"preview uses the first of {len(images)} images for shape and texture; "
                         "the others are ignored")
        want_glb = ArtifactKind.GLB in formats
        want_ply = ArtifactKind.GAUSSIAN_PLY in formats
        refine = params.gaussian_refinement.enabled
        need_splats = want_ply or refine
        steps = 2 + int(want_glb) + int(need_splats)
        with clock.stage(Stage.PREPROCESS):
            ctx.report(Stage.PREPROCESS, 0, 1, "finding the object's silhouette")
            image = images[0]
            silhouette = extract_silhouette(image)
            notes.extend(silhouette.notes)
            ctx.report(Stage.PREPROCESS, 1, 1, f"silhouette from {silhouette.source}")
        ctx.raise_if_stopped()
        mesh: trimesh.Trimesh | None = None
        splats: SplatArrays | None = None
        with clock.stage(Stage.EXPORT):
            ctx.report(Stage.EXPORT, 0, steps, "inflating the silhouette")
            left, top, right, bottom = silhouette.box
            longest = max(right - left, bottom - top)
            inflated = inflate(grid_mask(silhouette, grid_resolution(params.mesh_simplify)),
                               (right - left) / longest, (bottom - top) / longest)
            ctx.raise_if_stopped()
            ctx.report(Stage.EXPORT, 1, steps, "projecting the texture")
            texture = project_texture(image, silhouette, params.texture_size)
            ctx.raise_if_stopped()
            step = 2
            if want_glb:
                ctx.report(Stage.EXPORT, step, steps, "texturing the mesh")
                mesh = textured_trimesh(inflated, texture)
                step += 1
                ctx.raise_if_stopped()
            if need_splats:
                ctx.report(Stage.EXPORT, step, steps, "sampling Gaussian splats")
                splats = sample_splats(inflated, texture, splat_count(params.mesh_simplify), seed)
                step += 1
            ctx.report(Stage.EXPORT, steps, steps, "done")
        _log.debug("preview mesh: %d vertices, %d faces", len(inflated.vertices), len(inflated.faces))
        report: RefinementReport | None = None
        if refine and splats is not None:
            from trellis_service.gaussian_refinement import refine_splats  # torch: only when asked for

            with clock.stage(Stage.GAUSSIAN_REFINEMENT):
                refined = refine_splats(splats, images[:1], params.gaussian_refinement, ctx, seed=seed)
            splats, report = refined.splats, refined.report
            if want_glb:
                notes.append(PREVIEW_GLB_NOTE)
        return GeneratedAsset(seed=seed, mesh=mesh, splats=splats if want_ply else None, timings=clock.timings,
                              notes=notes, refinement=report)

    def hand_over(self, images: list[Image.Image], params: GenerationParams, ctx: JobContext) -> HandedOver:
        from trellis_service.gaussian_refinement import plan_novel_views  # torch: only when asked for

        asset = self.generate(images, _unrefined(params), {ArtifactKind.GAUSSIAN_PLY}, ctx)
        if not isinstance(asset.splats, SplatArrays):
            raise ExportError("the preview made no Gaussians to refine")
        clock = StageClock()
        clock.timings.update(asset.timings)
        with clock.stage(Stage.GAUSSIAN_REFINEMENT):
            plan = plan_novel_views(asset.splats, images[:1], params.gaussian_refinement, ctx, seed=asset.seed)
        return HandedOver(seed=asset.seed, state=GenerationState(splats=asset.splats.ply_bytes()), plan=plan,
                          timings=clock.timings, notes=asset.notes)

    def refine_handed_over(self, state: GenerationState, plan: NovelViewPlan, images: list[Image.Image],
                           params: GenerationParams, formats: Set[ArtifactKind], seed: int,
                           ctx: JobContext) -> GeneratedAsset:
        from trellis_service.gaussian_refinement import refine_splats  # torch: only when asked for
        from trellis_service.gaussian_refinement.gaussians import read_splat_ply

        clock = StageClock()
        with clock.stage(Stage.GAUSSIAN_REFINEMENT):
            refined = refine_splats(read_splat_ply(state.splats), images[:1], params.gaussian_refinement, ctx,
                                    seed=seed, plan=plan)
        mesh: trimesh.Trimesh | None = None
        notes: list[str] = []
        if ArtifactKind.GLB in formats:  # the preview's GLB does not depend on the Gaussians: made again, the same
            made = self.generate(images, _unrefined(params).model_copy(update={"seed": seed}), {ArtifactKind.GLB},
                                 ctx)
            mesh, notes = made.mesh, [*made.notes, PREVIEW_GLB_NOTE]
            for stage, seconds in made.timings.items():
                clock.timings[stage] = clock.timings.get(stage, 0.0) + seconds
        return GeneratedAsset(seed=seed, mesh=mesh,
                              splats=refined.splats if ArtifactKind.GAUSSIAN_PLY in formats else None,
                              timings=clock.timings, notes=notes, refinement=refined.report)


def _unrefined(params: GenerationParams) -> GenerationParams:
    """``params`` without the Gaussian refinement: what the preview generates before either half of it."""
    return params.model_copy(update={"gaussian_refinement": params.gaussian_refinement.model_copy(
        update={"enabled": False})})
