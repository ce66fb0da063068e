"""Test images and small helpers shared by the refiner tests (a uniquely named module: conftest.py files of
other test folders would shadow a plain ``from conftest import``)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def scene(size: int = 64, seed: int = 0) -> Image.Image:
    """A smooth synthetic photo (gradients, a disc, a box, mild noise): deterministic per seed."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([200 * xx + 30, 180 * yy + 40, 120 * (1 - xx * yy) + 60], axis=-1)
    rgb += np.random.default_rng(seed).normal(0, 2.0, rgb.shape)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.2, size * 0.25, size * 0.7, size * 0.8), fill=(220, 90, 60))
    draw.rectangle((size * 0.55, size * 0.1, size * 0.9, size * 0.4), fill=(40, 60, 170))
    return image


def with_alpha(image: Image.Image) -> Image.Image:
    """``image`` with a disc-shaped alpha (opaque object, transparent corners, soft ramp inside)."""
    w, h = image.size
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(xx - w / 2, yy - h / 2) / (min(w, h) / 2)
    alpha = np.clip((1.0 - r) * 4 * 255, 0, 255).astype(np.uint8)
    out = image.convert("RGBA")
    out.putalpha(Image.fromarray(alpha, "L"))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_degraded(image: Image.Image, quality: int = 10) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def blockiness(image: Image.Image) -> float:
    """Mean luma step across 8×8 block boundaries over the mean step inside blocks (1 = no grid)."""
    luma = np.asarray(image.convert("L"), dtype=np.float64)
    ratios = []
    for a in (luma, luma.T):
        steps = np.abs(np.diff(a, axis=1))
        boundary = (np.arange(steps.shape[1]) + 1) % 8 == 0
        ratios.append(steps[:, boundary].mean() / steps[:, ~boundary].mean())
    return float(np.mean(ratios))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)
