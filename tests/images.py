"""Encoded test images made in code."""

from __future__ import annotations

import io

from PIL import Image

from trellisbox._domain.imaging import synthetic_object


def rgba_object(size: int = 128, seed: int = 0) -> Image.Image:
    """A shaded disc on a transparent background, distinct per seed."""
    return synthetic_object(size, seed)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_bytes(size: int = 128) -> bytes:
    return encode(rgba_object(size))


def truncated_png(size: int = 128) -> bytes:
    data = png_bytes(size)
    return data[: len(data) // 2]


def huge_png_header(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny file whose header claims width × height: the decoder must refuse it before allocating."""
    small = encode(Image.new("L", (1, 1)), "PNG")
    # Rewrite IHDR's width/height; a valid CRC is not needed to be rejected on size first.
    import struct
    import zlib

    ihdr_start = 8
    length = struct.unpack(">I", small[ihdr_start:ihdr_start + 4])[0]
    body = b"IHDR" + struct.pack(">II", width, height) + small[ihdr_start + 16:ihdr_start + 8 + length]
    crc = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return small[:ihdr_start] + struct.pack(">I", length) + body + crc + small[ihdr_start + 12 + length:]


def padded_png(size: int, pad_bytes: int) -> bytes:
    """A valid ``size``² PNG made ``pad_bytes`` larger by a private ancillary chunk (decoders skip it): a large upload
    that is cheap to decode."""
    import struct
    import zlib

    small = png_bytes(size)
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, then IHDR's length, type, body and CRC
    body = b"prVt" + bytes(pad_bytes)
    chunk = struct.pack(">I", pad_bytes) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return small[:ihdr_end] + chunk + small[ihdr_end:]
