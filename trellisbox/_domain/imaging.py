"""The image codec shared by every service: decode with limits, encode PNG, keep alpha.

All untrusted image bytes go through :func:`decode_image` (the model services), which checks size, format and pixel
count from the header before decoding, and turns every decoder failure into an actionable
:class:`~trellisbox._domain.errors.InvalidInput`, or through :func:`check_image` (the gateway, which forwards the
caller's bytes): the same checks without decoding the pixels.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from trellisbox._domain.errors import InvalidInput

# A truncated upload must be an error, not a silently grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MEDIA_TYPES: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_FORMATS_BY_MEDIA_TYPE = {v: k for k, v in MEDIA_TYPES.items()} | {"image/jpg": "JPEG"}
#: The refined image's hand-off from the refiner to TRELLIS when the caller did not ask for it: uncompressed TIFF,
#: the pixels as they are in memory (lossless; writing and reading it costs about a copy, where PNG's filters and
#: deflate cost 10-100 ms at 512², docs/benchmarks.md). Accepted only where ``handoff`` is allowed (TRELLIS), and
#: only uncompressed, single-frame: no TIFF codec beyond Pillow's raw reader is ever reached.
HANDOFF_MEDIA_TYPE = "image/tiff"
_HANDOFF_FORMAT = "TIFF"


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on accepted images.

    Args:
        max_bytes: Largest encoded image accepted.
        max_pixels: Largest width × height accepted (checked from the header, before decoding).
        min_side: Smallest width or height accepted.
    """

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    min_side: int = 8


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


def _pixel_limit(pixels: int) -> str:
    """``16,777,216 (4096×4096)``: exact, with the square it allows when there is one."""
    side = math.isqrt(pixels)
    return f"{pixels:,}" + (f" ({side}×{side})" if side * side == pixels else "")


def header_pixels(data: bytes) -> int:
    """Width × height as the header says (nothing is decoded); 0 when the bytes do not open as an image (decoding them
    refuses them at once)."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception:
        return 0
    return int(width * height)


def _open(data: bytes, media_type: str, limits: ImageLimits, label: str, handoff: bool) -> Image.Image:
    """Open untrusted bytes and check everything the header tells (size, format, declared type, pixel count, sides);
    nothing is decoded yet."""
    if not data:
        raise InvalidInput(f"{label} is empty: send the encoded PNG, JPEG or WebP bytes")
    if len(data) > limits.max_bytes:
        raise InvalidInput(
            f"{label} is {len(data) / 2**20:.1f} MiB; the limit is {limits.max_bytes / 2**20:.0f} MiB. "
            "Send a smaller or more compressed image."
        )
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # Pillow refuses absurd sizes before we see them. A PNG's header says its sides (read them, for the same
        # message as any image over the limit); for the others, Pillow's message carries the pixel count.
        if _signature_format(data) == "PNG" and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            raise _too_many_pixels(label, width, height, limits) from None
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = _megapixels(int(found.group(1))) if found else "too many pixels"
        raise InvalidInput(
            f"{label} is {size}; the limit is {_megapixels(limits.max_pixels)} (e.g. 4096×4096). Downscale it."
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        started_as = _signature_format(data)
        if started_as:  # its header is damaged or cut short: the same advice as for a damaged body
            raise InvalidInput(f"{label} starts as a {started_as} file but is truncated or corrupt (its header cannot "
                               "be read); re-export the file") from None
        raise InvalidInput(
            f"{label} is not a PNG, JPEG or WebP image (first bytes: {data[:8]!r})"
        ) from None
    fmt = image.format or ""
    media_types = MEDIA_TYPES | ({_HANDOFF_FORMAT: HANDOFF_MEDIA_TYPE} if handoff else {})
    formats = _FORMATS_BY_MEDIA_TYPE | ({HANDOFF_MEDIA_TYPE: _HANDOFF_FORMAT} if handoff else {})
    if fmt not in media_types:
        raise InvalidInput(f"{label} is {fmt or 'an unknown format'}; send PNG, JPEG or WebP")
    if fmt == _HANDOFF_FORMAT and (image.info.get("compression") != "raw" or getattr(image, "n_frames", 1) != 1
                                   or image.mode not in ("RGB", "RGBA")):
        raise InvalidInput(f"{label} is a TIFF other than the uncompressed single-frame RGB(A) hand-off")
    declared = media_type.strip().lower()
    if declared:
        if declared not in formats:
            raise InvalidInput(
                f"{label} has media type {media_type[:40]!r}{'...' if len(media_type) > 40 else ''}; use image/png, "
                "image/jpeg or image/webp"
            )
        if formats[declared] != fmt:
            raise InvalidInput(f"{label} is declared {declared} but its bytes are {media_types[fmt]}")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _too_many_pixels(label, width, height, limits)
    if min(width, height) < limits.min_side:
        raise InvalidInput(f"{label} is {width}×{height}; each side must be at least {limits.min_side} px")
    return image


def _too_many_pixels(label: str, width: int, height: int, limits: ImageLimits) -> InvalidInput:
    return InvalidInput(f"{label} is {width}×{height} = {width * height:,} pixels; the limit is "
                        f"{_pixel_limit(limits.max_pixels)}. Downscale it.")


def _signature_format(data: bytes) -> str:
    """The accepted format whose signature ``data`` starts with, or ''."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return ""


def _truncated_or_corrupt(label: str, exc: BaseException) -> InvalidInput:
    return InvalidInput(f"{label} is truncated or corrupt ({exc}); re-export the file")


def check_image(data: bytes, media_type: str = "", limits: ImageLimits | None = None, label: str = "image") -> None:
    """Check untrusted image bytes without decoding their pixels: for a service that only forwards them (the gateway).

    Everything :func:`decode_image` checks from the header (size, format, declared type, pixel count, sides), and for
    PNG the file's structure to its end, every chunk's checksum included: a truncated or damaged upload is refused
    here. What only decoding finds (a JPEG cut short, a deflate stream broken under valid checksums) is refused by
    :func:`decode_image` in the model service that first reads the pixels, before its model runs. Measured: 0.03 ms
    for a 512² PNG and 5 ms for a 14 MB 2048² one (0.4 ms per MiB: checksums), against 2.6 and 137 ms to decode.

    Raises:
        InvalidInput: as :func:`decode_image`, for what can be told without decoding.
    """
    _verify(_open(data, media_type, limits or ImageLimits(), label, handoff=False), label)


def _verify(image: Image.Image, label: str) -> None:
    """PNG: the chunk structure and every CRC up to IEND (JPEG and WebP: nothing, Pillow's no-op). Uses up
    ``image``: reopen the bytes to decode them."""
    try:
        image.verify()
    except (OSError, ValueError, SyntaxError, struct.error) as exc:
        raise _truncated_or_corrupt(label, exc) from None


def decode_image(data: bytes, media_type: str = "", limits: ImageLimits | None = None,
                 label: str = "image", *, handoff: bool = False) -> Image.Image:
    """Decode untrusted bytes into an RGB or RGBA image.

    Args:
        data: Encoded PNG, JPEG or WebP bytes.
        media_type: Declared media type; empty to sniff. A declared type must match the bytes.
        limits: Size bounds; defaults to :class:`ImageLimits()`.
        label: How the image is named in error messages, e.g. ``"images[2]"``.
        handoff: Also accept the stages' hand-off format (:data:`HANDOFF_MEDIA_TYPE`, uncompressed TIFF).

    Returns:
        A fully decoded image in mode ``RGBA`` when the input carries transparency, else ``RGB``, 8 bits per
        channel (16-bit grey scaled, not clipped), turned upright as its EXIF orientation says (as viewers show it).

    Raises:
        InvalidInput: empty, too large, not an image, unsupported format, truncated or corrupt (a PNG's checksums
            included, as :func:`check_image` checks them: a model service called directly refuses what the gateway
            would).
    """
    image = _open(data, media_type, limits or ImageLimits(), label, handoff)
    if image.format == "PNG":  # 0.03 ms at 512² (check_image)
        _verify(image, label)
        image = Image.open(io.BytesIO(data))
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise _truncated_or_corrupt(label, exc) from None
    return normalize_mode(_upright(image))


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says, in place (most images need no turn, and a copy of a large one
    costs time and memory); as it is when that tag is absent or cannot be read (a damaged EXIF block costs the turn,
    not the request)."""
    with contextlib.suppress(OSError, ValueError, SyntaxError, struct.error, KeyError, TypeError):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def has_alpha(image: Image.Image) -> bool:
    """True when the image carries transparency information."""
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def has_real_alpha(image: Image.Image) -> bool:
    """True for an RGBA image whose alpha is not all opaque: a real cut-out. TRELLIS's ``preprocess_image``
    uses the same test to skip background removal."""
    return image.mode == "RGBA" and int(np.asarray(image.getchannel("A")).min()) < 255


def normalize_mode(image: Image.Image) -> Image.Image:
    """RGBA when the image has transparency, else RGB (palette, grey and CMYK converted; 16-bit grey scaled to 8
    bits, where Pillow's conversion would clip every value above 255 to white)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(image).astype(np.uint32, copy=False)
        image = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    target = "RGBA" if has_alpha(image) else "RGB"
    return image if image.mode == target else image.convert(target)


def encode_png(image: Image.Image, compress_level: int = 3) -> bytes:
    """PNG bytes of ``image``. Level 3 is the measured sweet spot between size and encode time."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def encode_handoff(image: Image.Image) -> bytes:
    """The hand-off form of ``image`` (:data:`HANDOFF_MEDIA_TYPE`): uncompressed TIFF, lossless, alpha kept."""
    buffer = io.BytesIO()
    image.save(buffer, format=_HANDOFF_FORMAT, compression="raw")
    return buffer.getvalue()


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The RGB part and the alpha channel (None when opaque by mode)."""
    if image.mode == "RGBA":
        return image.convert("RGB"), image.getchannel("A")
    return (image if image.mode == "RGB" else image.convert("RGB")), None


def reapply_alpha(rgb: Image.Image, alpha: Image.Image | None) -> Image.Image:
    """Put ``alpha`` back on ``rgb``, resizing it when the model snapped the size (multiple of 8)."""
    if alpha is None:
        return rgb
    if alpha.size != rgb.size:
        alpha = alpha.resize(rgb.size, Image.Resampling.LANCZOS)
    out = rgb.convert("RGBA")
    out.putalpha(alpha)
    return out


def synthetic_object(side: int = 128, seed: int | None = None, *, noisy: bool = False) -> Image.Image:
    """A shaded disc on a transparent background (RGBA): the warm-up input, and the tests' and benchmarks' object.

    Args:
        side: Width and height in pixels.
        seed: None for smooth shading; a seed adds that seed's mild pixel noise (distinct images per seed).
        noisy: Fill the disc with random pixels instead (an incompressible texture, for transport benchmarks).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    inside = np.hypot(xx - side / 2, yy - side / 2) < side * 0.45
    rgba = np.zeros((side, side, 4), np.uint8)
    if noisy:
        rgba[..., :3] = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    else:
        rgba[..., 0] = 200
        rgba[..., 1] = (60 + 150 * xx / side).astype(np.uint8)
        blue = 60 + 150 * yy / side + (rng.integers(0, 16, (side, side)) if seed is not None else 0)
        rgba[..., 2] = np.clip(blue, 0, 255).astype(np.uint8)
    rgba[..., 3] = np.where(inside, 255, 0)
    return Image.fromarray(rgba, "RGBA")
