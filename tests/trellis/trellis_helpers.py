"""Images, file parsers and the glTF validator for the TRELLIS service tests."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = REPO_ROOT / "tools" / "gltf-validator"


def object_image(size: tuple[int, int] = (256, 256), background: tuple[int, int, int] = (245, 245, 245),
                 alpha: bool = False) -> Image.Image:
    """A red disc with a blue square on a uniform background (RGB), or on transparency (RGBA)."""
    width, height = size
    image = Image.new("RGBA", size, (*background, 0)) if alpha else Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.2, height * 0.15, width * 0.8, height * 0.85), fill=(200, 40, 40, 255))
    draw.rectangle((width * 0.4, height * 0.4, width * 0.6, height * 0.6), fill=(30, 60, 200, 255))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_glb(data: bytes) -> trimesh.Trimesh:
    mesh = trimesh.load(io.BytesIO(data), file_type="glb", force="mesh")
    assert isinstance(mesh, trimesh.Trimesh)
    return mesh


def validate_glb(path: Path) -> dict[str, object]:
    """Run the Khronos glTF validator on ``path`` and return its JSON summary (skips without node)."""
    node = shutil.which("node")
    if node is None or not (VALIDATOR / "node_modules" / "gltf-validator").is_dir():
        pytest.skip("the Khronos glTF validator is not installed (make install runs npm ci)")
    proc = subprocess.run([node, str(VALIDATOR / "validate.mjs"), str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    report: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def parse_ply(data: bytes) -> tuple[list[str], np.ndarray]:
    """Vertex property names and the (N, P) float table of a binary little-endian float-only PLY."""
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    assert lines[0] == "ply"
    assert lines[1] == "format binary_little_endian 1.0"
    count = next(int(line.split()[2]) for line in lines if line.startswith("element vertex"))
    names = [line.split()[2] for line in lines if line.startswith("property")]
    assert all(line.split()[1] == "float" for line in lines if line.startswith("property"))
    table = np.frombuffer(data[end:], dtype="<f4")
    assert table.size == count * len(names), "PLY body size does not match its header"
    return names, table.reshape(count, len(names))
