"""``classic``: CPU image restoration without model weights (numpy, scipy and Pillow only).

Four passes, each scaled by ``strength`` (0 leaves the image alone, 1 is the strongest):

1. JPEG deblocking: the step across each 8×8 block boundary is spread over four pixels where the
   step is small and both sides are flat (a compression artefact); large steps are real edges and stay.
2. Denoise: a locally adaptive Wiener filter (smooths flat noisy areas, leaves detail).
3. Sharpen: unsharp mask with a small threshold so the remaining noise is not amplified.
4. Colour normalisation: a gentle per-channel levels stretch (auto levels / white balance) measured on
   the opaque pixels only.

Deterministic: the seed, prompts, guidance and step count do not apply and are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image

from refiner_service.backends.base import RefinerBackend
from trellisbox._domain.imaging import reapply_alpha, split_alpha
from trellisbox._domain.kinds import Stage
from trellisbox._domain.params import RefineParams
from trellisbox._runtime.worker import JobContext

_log = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
_BLOCK = 8  # JPEG's DCT block edge


def _deblock_axis(a: Array, strength: float) -> Array:
    """Smooth block boundaries between columns 8k-1 and 8k (rows: call on the transposed array)."""
    width = a.shape[1]
    cols = np.arange(_BLOCK, width - 1, _BLOCK)
    if cols.size == 0:
        return a
    p1, p0, q0, q1 = (a[:, cols + k] for k in (-2, -1, 0, 1))
    step = q0 - p0
    # Artefact threshold in grey levels: a step above it is a real edge and is kept.
    threshold = 8.0 + 40.0 * strength
    size = np.abs(step)
    weight = np.clip((threshold - size) / (0.5 * threshold), 0.0, 1.0)
    # Only where both sides are flat: otherwise the step belongs to texture, not to the block grid.
    flat = np.maximum(np.abs(p0 - p1), np.abs(q1 - q0))
    weight *= np.clip((threshold - flat) / (0.5 * threshold), 0.0, 1.0)
    weight *= min(1.0, 0.4 + strength)
    delta = weight * step / 8.0
    out = a.copy()
    out[:, cols - 2] = p1 + delta
    out[:, cols - 1] = p0 + 3.0 * delta
    out[:, cols] = q0 - 3.0 * delta
    out[:, cols + 1] = q1 - delta
    return out


def deblock(a: Array, strength: float) -> Array:
    """Reduce 8×8 JPEG blocking on an H×W×C float array (grid aligned to the top-left corner)."""
    a = _deblock_axis(a, strength)
    return np.ascontiguousarray(_deblock_axis(a.transpose(1, 0, 2), strength).transpose(1, 0, 2))


def _separable(a: Array, taps: Sequence[float]) -> Array:
    """Filter rows and columns of an H×W×C array with a symmetric kernel, edges replicated.

    Plain numpy slices: several times faster than scipy.ndimage on channel-last arrays.
    """
    r = len(taps) // 2
    p = np.pad(a, ((r, r), (r, r), (0, 0)), mode="edge")
    h, w = a.shape[:2]
    rows = np.zeros((p.shape[0], w, a.shape[2]), dtype=np.float32)
    for k, t in enumerate(taps):
        rows += np.float32(t) * p[:, k:k + w]
    out = np.zeros_like(a)
    for k, t in enumerate(taps):
        out += np.float32(t) * rows[k:k + h]
    return out


_BOX3 = (1 / 3, 1 / 3, 1 / 3)
_BINOMIAL5 = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)  # ≈ Gaussian, sigma 1 px


def denoise(a: Array, strength: float) -> Array:
    """Adaptive (Lee/Wiener) smoothing: the noise variance is the median local variance per channel."""
    mean = _separable(a, _BOX3)
    var = np.maximum(_separable(a * a, _BOX3) - mean * mean, 0.0)
    # A strided sample is enough for a robust estimate and keeps this pass fast at 1024².
    noise = np.median(var[::4, ::4].reshape(-1, a.shape[2]), axis=0) * (0.5 + 2.0 * strength)
    gain = np.maximum(var - noise, 0.0) / np.maximum(var, noise + 1e-6)
    smoothed = mean + gain * (a - mean)
    mix = min(1.0, 1.5 * strength)
    return (a + mix * (smoothed - a)).astype(np.float32)


def sharpen(a: Array, strength: float) -> Array:
    """Unsharp mask (sigma 1 px); details under ~2 grey levels are left alone."""
    blurred = _separable(a, _BINOMIAL5)
    detail = a - blurred
    detail *= np.clip((np.abs(detail) - 1.0) / 2.0, 0.0, 1.0)
    return (a + (0.2 + 1.2 * strength) * detail).astype(np.float32)


def normalize_colour(a: Array, alpha: Image.Image | None, strength: float) -> Array:
    """Stretch each channel's 0.5–99.5 percentile range towards 0–255, blended by ``strength``."""
    pixels = a.reshape(-1, a.shape[2])
    if alpha is not None:
        opaque = np.asarray(alpha, dtype=np.uint8).reshape(-1) > 127
        pixels = pixels[opaque]
    if pixels.shape[0] < 64:
        return a
    sample = pixels[:: max(1, pixels.shape[0] // 65_536)]  # percentiles need no more
    low, high = np.percentile(sample, [0.5, 99.5], axis=0)
    span = high - low
    # Flat channels (a plain background) and nearly full-range ones are left alone; gains are capped so a
    # dark, low-contrast photo is brightened gently rather than blown out.
    gain = np.where(span > 32.0, np.minimum(255.0 / np.maximum(span, 1e-6), 1.5), 1.0)
    offset = np.where(span > 32.0, low, 0.0)
    stretched = (a - offset) * gain
    mix = 0.5 * strength
    return (a + mix * (stretched - a)).astype(np.float32)


class ClassicBackend(RefinerBackend):
    """Weight-free restoration on the CPU: deblock, denoise, sharpen, normalise colour.

    ``strength`` scales every pass; the other parameters only matter to diffusion backends.
    """

    name = "classic"

    def __init__(self) -> None:
        self._loaded = False

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        self._loaded = True  # nothing to load; kept so the service's warm-up is uniform

    def unload(self) -> None:
        self._loaded = False

    def refine(self, images: Sequence[Image.Image], params: RefineParams, seeds: Sequence[int],
               ctx: JobContext | None = None) -> list[Image.Image]:
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        self.load()
        return [self._refine_one(image, params.strength, i, len(images), ctx) for i, image in enumerate(images)]

    def _refine_one(self, image: Image.Image, strength: float, index: int, count: int,
                    ctx: JobContext | None) -> Image.Image:
        rgb, alpha = split_alpha(image)
        a = np.asarray(rgb, dtype=np.float32)
        passes: list[tuple[str, Callable[[Array], Array]]] = [
            ("deblock", lambda x: deblock(x, strength)),
            ("denoise", lambda x: denoise(x, strength)),
            ("sharpen", lambda x: sharpen(x, strength)),
            ("colour", lambda x: normalize_colour(x, alpha, strength)),
        ]
        for step, (label, apply) in enumerate(passes, start=1):
            if ctx is not None:
                ctx.raise_if_stopped()
            a = apply(a)
            if ctx is not None:
                ctx.report(Stage.REFINE, step, len(passes), f"image {index + 1}/{count}: {label}")
        out = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="RGB")
        return reapply_alpha(out, alpha)
