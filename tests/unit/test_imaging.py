from __future__ import annotations

import io
import re
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.images import encode, huge_png_header, png_bytes, rgba_object, truncated_png
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.imaging import (
    ImageLimits,
    check_image,
    decode_image,
    encode_handoff,
    encode_png,
    reapply_alpha,
    split_alpha,
)


def test_png_rgba_round_trip_keeps_alpha() -> None:
    image = decode_image(png_bytes(64), "image/png")
    assert image.mode == "RGBA" and image.size == (64, 64)
    again = decode_image(encode_png(image))
    assert list(again.getdata()) == list(image.getdata())


@pytest.mark.parametrize("fmt,media_type", [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_jpeg_and_webp_decode_to_rgb(fmt: str, media_type: str) -> None:
    data = encode(rgba_object(64).convert("RGB"), fmt)
    image = decode_image(data, media_type)
    assert image.mode == "RGB" and image.size == (64, 64)


def _flipped(data: bytes, offset_from_end: int) -> bytes:
    position = len(data) - offset_from_end
    return data[:position] + bytes([data[position] ^ 1]) + data[position + 1:]


@pytest.mark.parametrize(
    "data,media_type,message",
    [
        (b"", "", "is empty"),
        (b"definitely not an image", "", "is not a PNG, JPEG or WebP image"),
        (truncated_png(), "", "truncated or corrupt"),
        (huge_png_header(), "", "30000×30000 = 900,000,000 pixels; the limit is 16,777,216 (4096×4096)"),
        (huge_png_header(5000, 5000), "", "5000×5000 = 25,000,000 pixels; the limit is 16,777,216 (4096×4096)"),
        (huge_png_header(4097, 4097), "", "4097×4097 = 16,785,409 pixels; the limit is 16,777,216 (4096×4096)"),
        (png_bytes(), "image/jpeg", "declared image/jpeg but its bytes are image/png"),
        (png_bytes(), "image/gif", "use image/png, image/jpeg or image/webp"),
        (encode(Image.new("RGB", (16, 16)), "GIF"), "", "send PNG, JPEG or WebP"),
        (encode(Image.new("RGB", (4, 64)), "PNG"), "", "at least 8 px"),
        # A damaged or cut header with a known signature: truncated, not "not an image".
        (png_bytes()[:8], "", "starts as a PNG file but is truncated or corrupt"),
        (png_bytes()[:33], "", "starts as a PNG file but is truncated or corrupt"),
        (_flipped(png_bytes()[:33], 1) + png_bytes()[33:], "", "starts as a PNG file but is truncated or corrupt"),
        (encode(rgba_object(64), "WEBP")[:20], "", "starts as a WebP file but is truncated or corrupt"),
        (b"\xff\xd8\xff\xe0", "", "starts as a JPEG file but is truncated or corrupt"),
    ],
)
@pytest.mark.parametrize("read", [decode_image, check_image], ids=["decode", "check"])
def test_bad_images_are_invalid_input_with_actionable_messages(data: bytes, media_type: str, message: str,
                                                               read: Callable[..., object]) -> None:
    # The gateway's check (no decoding) and the model services' decode refuse each with the same message.
    with pytest.raises(InvalidInput, match="images\\[3\\]") as info:
        read(data, media_type, label="images[3]")
    assert message in str(info.value)


def test_the_check_reads_no_pixels_and_leaves_what_only_decoding_finds_to_the_decode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    jpeg = encode(rgba_object(256).convert("RGB"), "JPEG")
    cut_jpeg = jpeg[: len(jpeg) * 3 // 4]  # within the scan data: the header opens
    with monkeypatch.context() as patched:
        def no_decoding(self: object) -> None:
            raise AssertionError("check_image decoded pixels")

        patched.setattr(ImageFile.ImageFile, "load", no_decoding)
        # The last is a 1×1 PNG whose header says 4096×4096: its checksums hold, and decoding it would fail.
        for data in (png_bytes(), jpeg, encode(rgba_object(64), "WEBP"), huge_png_header(4096, 4096)):
            check_image(data)
        check_image(cut_jpeg)  # a JPEG's end is only found by decoding it ...
    with pytest.raises(InvalidInput, match="is truncated or corrupt"):
        decode_image(cut_jpeg, label="images[0]")  # ... which the stage that reads the pixels does first
    # A PNG cut after its pixel data, and one with a bit flipped in it: the check refuses both by the chunks' structure
    # and checksums, where decoding alone need not notice; the decode checks them too, so a model service called
    # directly refuses what the gateway would.
    for damaged in (png_bytes()[:-8], _flipped(png_bytes(), 60)):
        for read in (check_image, decode_image):
            with pytest.raises(InvalidInput, match=r"^images\[0\] is truncated or corrupt \(broken PNG file"):
                read(damaged, label="images[0]")


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped() -> None:
    """Pillow's own conversion clips every value above 255 to white."""
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    decoded = np.asarray(decode_image(encode(Image.fromarray(ramp), "PNG")))
    assert decoded.shape == (16, 64, 3)
    assert list(decoded[0, :, 0]) == [int(v) >> 8 for v in ramp[0]]


@pytest.mark.parametrize(("orientation", "size", "top_left"), [(1, (64, 32), "red"), (6, (32, 64), "red"),
                                                                 (3, (64, 32), "blue"), (8, (32, 64), "blue")])
def test_the_exif_orientation_is_applied_as_viewers_show_it(orientation: int, size: tuple[int, int],
                                                            top_left: str) -> None:
    photo = Image.new("RGB", (64, 32), "red")
    photo.paste((0, 0, 255), (32, 0, 64, 32))  # left half red, right half blue; 6 turns it clockwise, 8 back
    exif = photo.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif, quality=95)
    upright = decode_image(buffer.getvalue())
    assert upright.size == size
    red, _, blue = upright.getpixel((2, 2))  # type: ignore[misc]
    assert (red > 200 and blue < 60) if top_left == "red" else (blue > 200 and red < 60)


def test_byte_limit() -> None:
    with pytest.raises(InvalidInput, match="MiB; the limit is"):
        decode_image(png_bytes(256), limits=ImageLimits(max_bytes=1024))


def test_palette_with_transparency_becomes_rgba() -> None:
    palette = rgba_object(32).convert("P")
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=0)
    assert decode_image(buffer.getvalue()).mode == "RGBA"


def test_alpha_split_and_reapply_resizes_when_the_model_snapped_the_size() -> None:
    image = rgba_object(100)
    rgb, alpha = split_alpha(image)
    assert rgb.mode == "RGB" and alpha is not None
    out = reapply_alpha(rgb.resize((96, 96)), alpha)
    assert out.mode == "RGBA" and out.size == (96, 96)
    assert out.getchannel("A").getextrema() == (0, 255)


def test_handoff_tiff_is_lossless_and_accepted_only_where_allowed() -> None:
    image = rgba_object(64)
    data = encode_handoff(image)
    decoded = decode_image(data, "image/tiff", handoff=True)
    assert decoded.mode == "RGBA" and decoded.tobytes() == image.tobytes()
    with pytest.raises(InvalidInput, match="is TIFF; send PNG, JPEG or WebP"):
        decode_image(data)  # a caller's upload: not one of the public formats
    with pytest.raises(InvalidInput, match="use image/png, image/jpeg or image/webp"):
        decode_image(png_bytes(), "image/tiff")


@pytest.mark.parametrize("case,message", [
    ("truncated", "truncated or corrupt"),
    ("compressed", "TIFF other than the uncompressed single-frame RGB(A) hand-off"),
    ("lying", "declared image/tiff but its bytes are image/png"),
    ("declared png", "declared image/png but its bytes are image/tiff"),
])
def test_bad_handoff_images_are_refused(case: str, message: str) -> None:
    image = rgba_object(64)
    data, media_type = {
        "truncated": (encode_handoff(image)[:-200], "image/tiff"),
        "compressed": (encode(image, "TIFF", compression="tiff_deflate"), ""),
        "lying": (png_bytes(), "image/tiff"),
        "declared png": (encode_handoff(image), "image/png"),
    }[case]
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode_image(data, media_type, handoff=True)
