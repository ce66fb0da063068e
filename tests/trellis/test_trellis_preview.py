"""The preview backend: a closed, textured mesh from one image on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageDraw

from tests.trellis.trellis_helpers import load_glb, object_image, parse_ply, validate_glb
from trellis_service.backends.preview import (
    PreviewBackend,
    extract_silhouette,
    grid_mask,
    inflate,
    remove_pinches,
)
from trellis_service.exporters import SPLAT_PROPERTIES, encode_asset
from trellisbox._domain.kinds import ArtifactKind, Stage
from trellisbox._domain.params import GenerationParams
from trellisbox._runtime.worker import JobContext, ProgressEvent

GLB = ArtifactKind.GLB
PLY = ArtifactKind.GAUSSIAN_PLY


def run_preview(images: list[Image.Image], params: GenerationParams | None = None,
                formats: set[ArtifactKind] | None = None
                ) -> tuple[dict[int, bytes], list[str], int, list[ProgressEvent]]:
    events: list[ProgressEvent] = []
    result = PreviewBackend().generate(images, params or GenerationParams(seed=5), formats or {GLB},
                                       JobContext("test", None, events.append))
    return {a.kind: a.data for a in encode_asset(result)}, result.notes, result.seed, events


def assert_closed(mesh: trimesh.Trimesh) -> None:
    assert mesh.is_watertight
    assert mesh.is_winding_consistent
    assert mesh.volume > 0  # outward normals
    assert mesh.euler_number == 2  # one closed surface without handles


def test_glb_is_watertight_and_textured() -> None:
    artifacts, _, _, events = run_preview([object_image()], GenerationParams(seed=1, texture_size=512))
    mesh = load_glb(artifacts[GLB])
    assert_closed(mesh)
    material = mesh.visual.material
    assert material.baseColorTexture.size == (512, 512)
    assert mesh.visual.uv.shape == (len(mesh.vertices), 2)
    stages = {event.stage for event in events}
    assert {Stage.PREPROCESS, Stage.EXPORT} <= stages


def test_khronos_validator_reports_no_errors(tmp_path: Path) -> None:
    artifacts, _, _, _ = run_preview([object_image(alpha=True)])
    path = tmp_path / "preview.glb"
    path.write_bytes(artifacts[GLB])
    report = validate_glb(path)
    assert report["numErrors"] == 0, report


def test_texture_is_upright() -> None:
    image = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((50, 40, 250, 100), fill=(255, 0, 0, 255))  # top half red
    draw.rectangle((50, 100, 250, 160), fill=(0, 0, 255, 255))  # bottom half blue
    mesh = load_glb(run_preview([image], GenerationParams(seed=1, texture_size=256))[0][GLB])
    texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB")).astype(float)
    side = texture.shape[0] - 1
    uv = mesh.visual.uv
    colours = texture[np.round((1 - uv[:, 1]) * side).astype(int), np.round(uv[:, 0] * side).astype(int)]
    top, bottom = mesh.vertices[:, 1] > 0.15, mesh.vertices[:, 1] < -0.15
    assert colours[top, 0].mean() > 200 and colours[top, 2].mean() < 50
    assert colours[bottom, 2].mean() > 200 and colours[bottom, 0].mean() < 50
    assert np.ptp(mesh.vertices[:, 0]) > np.ptp(mesh.vertices[:, 1])  # landscape object stays landscape


def test_texture_size_and_simplify_control_the_output() -> None:
    small = load_glb(run_preview([object_image()], GenerationParams(seed=1, texture_size=256,
                                                                     mesh_simplify=0.98))[0][GLB])
    large = load_glb(run_preview([object_image()], GenerationParams(seed=1, texture_size=1024,
                                                                    mesh_simplify=0.8))[0][GLB])
    assert small.visual.material.baseColorTexture.size == (256, 256)
    assert large.visual.material.baseColorTexture.size == (1024, 1024)
    assert len(large.faces) > 3 * len(small.faces)
    assert_closed(small)
    assert_closed(large)


def test_several_images_use_the_first_and_say_so() -> None:
    artifacts, notes, _, _ = run_preview([object_image(), object_image(background=(0, 0, 0)), object_image()])
    assert any("first of 3 images" in note for note in notes)
    single, _, _, _ = run_preview([object_image()])
    assert artifacts[GLB] == single[GLB]


def test_seed_is_echoed_and_output_deterministic() -> None:
    first, _, seed, _ = run_preview([object_image()], GenerationParams(seed=1234), {GLB, PLY})
    again, _, _, _ = run_preview([object_image()], GenerationParams(seed=1234), {GLB, PLY})
    other, _, _, _ = run_preview([object_image()], GenerationParams(seed=99), {GLB, PLY})
    assert seed == 1234
    assert first == again
    assert first[GLB] == other[GLB] and first[PLY] != other[PLY]  # the seed drives splat sampling
    _, _, random_seed, _ = run_preview([object_image()], GenerationParams(seed=None))
    assert 0 <= random_seed < 2**32


def test_mask_from_alpha_ignores_colours() -> None:
    # White object on white "background": only the alpha channel can tell them apart.
    image = Image.new("RGBA", (200, 200), (255, 255, 255, 0))
    ImageDraw.Draw(image).ellipse((50, 50, 150, 150), fill=(255, 255, 255, 255))
    silhouette = extract_silhouette(image)
    assert silhouette.source == "alpha"
    area = silhouette.mask.sum() / silhouette.mask.size
    assert area == pytest.approx(np.pi * 50**2 / 200**2, rel=0.05)


def test_mask_from_background_colour() -> None:
    silhouette = extract_silhouette(object_image((400, 300), background=(20, 140, 60)))
    assert silhouette.source == "background"
    assert any("#148c3c" in note for note in silhouette.notes)
    # The disc (with the square inside it, holes filled) is found; the border is not.
    expected = np.pi * (0.3 * 400) * (0.35 * 300) / (400 * 300)
    assert silhouette.mask.sum() / silhouette.mask.size == pytest.approx(expected, rel=0.05)
    assert not silhouette.mask[0].any() and not silhouette.mask[:, 0].any()


def test_opaque_alpha_falls_back_to_background_colour() -> None:
    silhouette = extract_silhouette(object_image().convert("RGBA"))  # alpha all 255: not a real cut-out
    assert silhouette.source == "background"


def test_mask_is_cleaned() -> None:
    image = Image.new("RGB", (200, 200), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 160, 160), fill=(0, 0, 0))
    draw.ellipse((80, 80, 120, 120), fill=(255, 255, 255))  # a hole
    draw.rectangle((5, 5, 15, 15), fill=(0, 0, 0))  # a separate speck
    silhouette = extract_silhouette(image)
    assert silhouette.mask[100, 100]  # hole filled
    assert not silhouette.mask[10, 10]  # only the largest component
    mesh = load_glb(run_preview([image])[0][GLB])
    assert_closed(mesh)
    # The filled hole takes the object's colour around it, not the white background.
    texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    centre = texture.shape[0] // 2
    assert texture[centre, centre].max() < 60


def test_blank_image_becomes_a_card() -> None:
    artifacts, notes, _, _ = run_preview([Image.new("RGB", (64, 48), (10, 10, 10))])
    assert any("whole image" in note for note in notes)
    assert_closed(load_glb(artifacts[GLB]))


def test_corner_contacts_and_thin_parts_stay_manifold() -> None:
    grid = np.zeros((8, 8), dtype=bool)
    grid[1:4, 1:4] = True
    grid[4:7, 4:7] = True  # touches the first square only at a corner
    fixed = remove_pinches(grid)
    p = np.pad(fixed, 1)
    a, b, c, d = p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]
    assert not ((a & d & ~b & ~c) | (b & c & ~a & ~d)).any()
    line = np.zeros((5, 12), dtype=bool)
    line[2, 1:11] = True  # one cell thin
    for cells in (fixed, line):
        mesh = inflate(cells, 1.0, cells.shape[0] / cells.shape[1])
        assert_closed(trimesh.Trimesh(mesh.vertices, mesh.faces, process=False))


def test_grid_follows_mesh_simplify() -> None:
    silhouette = extract_silhouette(object_image())
    assert grid_mask(silhouette, 200).sum() > 10 * grid_mask(silhouette, 50).sum()


def test_gaussian_ply_layout() -> None:
    artifacts, _, _, _ = run_preview([object_image()], GenerationParams(seed=3), {PLY})
    assert set(artifacts) == {PLY}
    names, table = parse_ply(artifacts[PLY])
    assert tuple(names) == SPLAT_PROPERTIES
    assert len(table) >= 4000 and np.isfinite(table).all()
    rotations = table[:, 13:17]
    np.testing.assert_allclose(np.linalg.norm(rotations, axis=1), 1.0, rtol=1e-4)
    colours = 0.5 + 0.28209479177387814 * table[:, 6:9]
    assert colours.min() >= -1e-4 and colours.max() <= 1 + 1e-4
    assert colours[:, 0].mean() > colours[:, 1].mean()  # mostly the red disc
    cloud = trimesh.load(trimesh.util.wrap_as_stream(artifacts[PLY]), file_type="ply")
    assert isinstance(cloud, trimesh.PointCloud)
    assert len(cloud.vertices) == len(table)
