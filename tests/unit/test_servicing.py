"""Where the model services' image and output work runs: small work on the event loop, the rest in threads, and
artifacts hashed where they are encoded."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Any

import pytest
from PIL import Image

from tests.images import encode, padded_png, png_bytes
from trellisbox._domain.artifacts import Artifact
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.kinds import ArtifactKind
from trellisbox._runtime import servicing
from trellisbox._runtime.config import ServiceSettings
from trellisbox.v1 import common_pb2


def _decoding_thread(monkeypatch: pytest.MonkeyPatch, images: list[common_pb2.Image]) -> tuple[str, str, int]:
    """(the event loop's thread, the thread that decoded, how many images came back)."""
    seen: list[str] = []
    decode = servicing.decode_images  # type: ignore[attr-defined]  # the module's own import, patched below

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return decode(*args, **kwargs)

    monkeypatch.setattr(servicing, "decode_images", recording)

    async def run() -> tuple[str, int]:
        decoded = await servicing.decode_request_images(images, ServiceSettings())
        return threading.current_thread().name, len(decoded)

    loop_thread, count = asyncio.run(run())
    return loop_thread, seen[0], count


def test_small_images_are_decoded_on_the_event_loop_and_large_ones_in_a_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    small = [common_pb2.Image(data=png_bytes(512))]
    loop_thread, decoded_on, count = _decoding_thread(monkeypatch, small)
    assert decoded_on == loop_thread and count == 1
    # More pixels than INLINE_PIXELS in all (two 1000×600 images: 1.2 MP) in a few kB, or more bytes than 1 MiB in
    # a small image: a thread.
    flat = encode(Image.new("RGB", (1000, 600), (90, 120, 200)), "PNG")
    assert len(flat) < 10_000
    for images in ([common_pb2.Image(data=flat)] * 2, [common_pb2.Image(data=padded_png(64, 2**20))]):
        loop_thread, decoded_on, count = _decoding_thread(monkeypatch, images)
        assert decoded_on != loop_thread and count == len(images)


def test_bad_images_are_refused_the_same_way_on_either_path() -> None:
    settings = ServiceSettings()
    for images in ([common_pb2.Image(data=png_bytes(64)[:100])],
                   [common_pb2.Image(data=png_bytes(768)[:-100])] * 2):
        with pytest.raises(InvalidInput, match=r"^images\[0\] is truncated or corrupt"):
            asyncio.run(servicing.decode_request_images(images, settings))


def test_outputs_come_back_hashed_from_an_encoding_thread_or_inline() -> None:
    data = bytes(range(256)) * 4096
    threads: list[str] = []

    def encode() -> list[Artifact]:
        threads.append(threading.current_thread().name)
        return [Artifact(ArtifactKind.GLB, data)]

    async def run(inline: bool) -> tuple[list[Artifact], float]:
        return await servicing.encode_outputs(encode, inline=inline)

    for inline in (False, True):
        artifacts, seconds = asyncio.run(run(inline))
        (artifact,) = artifacts
        # Hashed already: sending it then only cuts it (the hash is not computed again as chunks are cut).
        assert artifact.__dict__["sha256"] == hashlib.sha256(data).hexdigest()
        assert seconds >= 0
    assert threads[0].startswith("encode") and threads[1] == "MainThread"
    # The last chunk carries the hash computed at encoding.
    last = list(artifacts[0].chunks(len(data) // 3))[-1]
    assert last.sha256 == hashlib.sha256(data).hexdigest()


def test_start_encoding_works_from_any_thread() -> None:
    """The TRELLIS model thread starts encoding as its job returns, without the event loop."""
    results: list[Any] = []

    def model_thread() -> None:
        future = servicing.start_encoding(lambda: [Artifact(ArtifactKind.GAUSSIAN_PLY, b"ply")])
        results.append(future.result(timeout=10))

    thread = threading.Thread(target=model_thread)
    thread.start()
    thread.join(10)
    (artifacts, _seconds), = results
    assert artifacts[0].__dict__["sha256"] == hashlib.sha256(b"ply").hexdigest()
