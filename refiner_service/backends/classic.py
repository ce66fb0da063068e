"""``classic``: CPU image restoration without model weights (numpy, scipy and Pillow only).

Four passes, each scaled by ``strength`` (0 leaves the image alone, 1 is the strongest):

1. JPEG deblocking: the step across each 8×8 block boundary is spread over four pixels where the
   step is small and both sides are flat (a compression artefact); large steps are real edges and stay.
2. Denoise: a locally adaptive Wiener filter (smooths flat noisy areas, leaves detail).
3. Sharpen: unsharp mask with a small threshold so the remaining noise is not amplified.
4. Colour normalisation: a gentle per-channel levels stretch (auto levels / white balance) measured on
   the opaque pixels only.

Deterministic: the seed, prompts, guidance and step count do not apply and are ignored.

Each pass runs band by band (:data:`BAND_ROWS` rows, with the few rows of context its filter reads) and checks
between bands whether the job should stop, so a cancel or a deadline stops even a 4096² image within a fraction
of a second; the result is the same as filtering the whole image at once.
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
from trellisbox._runtime.model import WeightFreeBackend
from trellisbox._runtime.worker import JobContext

_log = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
_BLOCK = 8  # JPEG's DCT block edge
#: Rows per band: a multiple of the JPEG block, so that deblocking sees the block grid where the whole image has it.
BAND_ROWS = 256
Check = Callable[[], None]


def _by_bands(halo: int, fn: Callable[..., Array], check: Check, *arrays: Array) -> Array:
    """``fn(*arrays)`` computed band by band (the same rows of each array), with ``check()`` between bands.

    ``fn`` must be row-local: an output row depends on input rows at most ``halo`` away (each band is filtered with
    that much context, which is then cut off).
    """
    band = BAND_ROWS
    height = arrays[0].shape[0]
    if height <= band:
        return fn(*arrays)
    out: Array | None = None
    for top in range(0, height, band):
        bottom = min(top + band, height)
        low, high = max(0, top - halo), min(height, bottom + halo)
        rows = fn(*(array[low:high] for array in arrays))[top - low:bottom - low]
        if out is None:
            out = np.empty((height, *rows.shape[1:]), dtype=rows.dtype)
        out[top:bottom] = rows
        check()
    assert out is not None  # nosec B101  # for mypy: the loop ran at least once
    return out


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


def _deblock_whole(a: Array, strength: float) -> Array:
    a = _deblock_axis(a, strength)
    return np.ascontiguousarray(_deblock_axis(a.transpose(1, 0, 2), strength).transpose(1, 0, 2))


def deblock(a: Array, strength: float, check: Check = lambda: None) -> Array:
    """Reduce 8×8 JPEG blocking on an H×W×C float array (grid aligned to the top-left corner).

    A block edge changes the two rows on each side and reads no further: one block of context per band is plenty.
    """
    return _by_bands(_BLOCK, lambda band: _deblock_whole(band, strength), check, a)


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


def _local_moments(a: Array) -> Array:
    """Mean and variance over each pixel's 3×3 neighbourhood (edges replicated), stacked: H×W×2C."""
    mean = _separable(a, _BOX3)
    return np.concatenate([mean, np.maximum(_separable(a * a, _BOX3) - mean * mean, 0.0)], axis=2)


def denoise(a: Array, strength: float, check: Check = lambda: None) -> Array:
    """Adaptive (Lee/Wiener) smoothing: the noise variance is the median local variance per channel."""
    channels = a.shape[2]
    moments = _by_bands(1, _local_moments, check, a)
    # A strided sample is enough for a robust estimate and keeps this pass fast at 1024².
    var_sample = moments[::4, ::4, channels:].reshape(-1, channels)
    noise: Array = np.median(var_sample, axis=0) * (0.5 + 2.0 * strength)
    mix = min(1.0, 1.5 * strength)

    def smooth(band: Array, stacked: Array) -> Array:
        mean, var = stacked[..., :channels], stacked[..., channels:]
        gain: Array = np.maximum(var - noise, 0.0) / np.maximum(var, noise + 1e-6)
        smoothed: Array = band + mix * (mean + gain * (band - mean) - band)
        return smoothed.astype(np.float32)

    return _by_bands(0, smooth, check, a, moments)


def sharpen(a: Array, strength: float, check: Check = lambda: None) -> Array:
    """Unsharp mask (sigma 1 px); details under ~2 grey levels are left alone."""

    def unsharp(band: Array) -> Array:
        detail = band - _separable(band, _BINOMIAL5)
        detail *= np.clip((np.abs(detail) - 1.0) / 2.0, 0.0, 1.0)
        return (band + (0.2 + 1.2 * strength) * detail).astype(np.float32)

    return _by_bands(len(_BINOMIAL5) // 2, unsharp, check, a)


def normalize_colour(a: Array, alpha: Image.Image | None, strength: float, check: Check = lambda: None) -> Array:
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
    mix = 0.5 * strength
    return _by_bands(0, lambda band: (band + mix * ((band - offset) * gain - band)).astype(np.float32), check, a)


class ClassicBackend(WeightFreeBackend, RefinerBackend):
    """Weight-free restoration on the CPU: deblock, denoise, sharpen, normalise colour.

    ``strength`` scales every pass; the other parameters only matter to diffusion backends.
    """

    name = "classic"

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
        check: Check = ctx.raise_if_stopped if ctx is not None else lambda: None
        passes: list[tuple[str, Callable[[Array], Array]]] = [
            ("deblock", lambda x: deblock(x, strength, check)),
            ("denoise", lambda x: denoise(x, strength, check)),
            ("sharpen", lambda x: sharpen(x, strength, check)),
            ("colour", lambda x: normalize_colour(x, alpha, strength, check)),
        ]
        for step, (label, apply) in enumerate(passes, start=1):
            check()
            a = apply(a)
            if ctx is not None:
                ctx.report(Stage.REFINE, step, len(passes), f"image {index + 1}/{count}: {label}")
        out = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="RGB")
        return reapply_alpha(out, alpha)
