"""What the Python client refuses before it sends anything, and how it says so: the errors its docstrings name,
each naming what was wrong, never an exception from deep inside protobuf or gRPC."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from trellisbox import TrellisBoxClient
from trellisbox.client import build_request


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_one_image_is_taken_as_one_image_whatever_its_form(tmp_path: Path) -> None:
    """A single path, bytes or PIL image is one image: not a sequence of characters or of byte values."""
    path = tmp_path / "chair.png"
    path.write_bytes(_png())
    for single in (path, str(path), _png(), bytearray(_png()), Image.new("RGB", (8, 8))):
        request = build_request(single)
        assert len(request.images) == 1
        assert Image.open(io.BytesIO(request.images[0].data)).size == (8, 8)
    assert len(build_request([path, _png()]).images) == 2


def test_an_image_of_no_known_form_is_named() -> None:
    with pytest.raises(TypeError, match=r"images\[1\]: an image is a path, encoded bytes or a PIL image, not int"):
        build_request([_png(), 7])  # type: ignore[list-item]  # what the test is about


@pytest.mark.parametrize("timeout", [0, -5, math.nan])
def test_a_timeout_that_is_not_a_positive_number_is_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        TrellisBoxClient("127.0.0.1:1", timeout=timeout)
    TrellisBoxClient("127.0.0.1:1", timeout=None).close()  # no deadline: allowed


def test_a_key_without_its_certificate_is_refused_not_ignored(tmp_path: Path) -> None:
    """Before, a key file alone left the channel in plaintext without a word."""
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="needs both its certificate file and its key file"):
        TrellisBoxClient("127.0.0.1:1", key_file=key)


def test_a_ca_file_that_is_not_pem_is_named_at_once(tmp_path: Path) -> None:
    """Not a handshake failure that reads like a network problem, later."""
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"\x30\x82\x01\x0a binary DER, not PEM")
    with pytest.raises(ValueError, match=re.escape(f"the CA bundle {ca} is not in PEM format")):
        TrellisBoxClient("127.0.0.1:1", ca_file=ca)
