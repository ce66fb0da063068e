"""Artifact chunking and reassembly: the one streaming format for GLB, PLY and refined PNGs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from trellisbox.v1 import common_pb2

CHUNK_BYTES = 1024 * 1024

MEDIA_TYPES: dict[int, str] = {
    common_pb2.ARTIFACT_KIND_GLB: "model/gltf-binary",
    common_pb2.ARTIFACT_KIND_GAUSSIAN_PLY: "application/x-ply",
    common_pb2.ARTIFACT_KIND_REFINED_IMAGE: "image/png",
}
FILE_SUFFIXES: dict[int, str] = {
    common_pb2.ARTIFACT_KIND_GLB: ".glb",
    common_pb2.ARTIFACT_KIND_GAUSSIAN_PLY: ".ply",
    common_pb2.ARTIFACT_KIND_REFINED_IMAGE: ".png",
}


class ArtifactProtocolError(Exception):
    """Chunks arrived out of order, with a wrong size, or with a checksum that does not match."""


@dataclass(frozen=True)
class Artifact:
    """A complete artifact.

    Args:
        kind: An ``ArtifactKind`` value.
        data: The artifact bytes.
        index: Which artifact of this kind (input image index for refined images).
        media_type: Defaults to the kind's media type.
    """

    kind: int
    data: bytes
    index: int = 0
    media_type: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def kind_name(self) -> str:
        return common_pb2.ArtifactKind.Name(self.kind)  # type: ignore[arg-type]

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[common_pb2.ArtifactChunk]:
        """The artifact as ordered chunks; the last carries the SHA-256 of the whole."""
        view = memoryview(self.data)
        total = len(view)
        media_type = self.media_type or MEDIA_TYPES.get(self.kind, "application/octet-stream")
        offset = 0
        while True:
            end = min(offset + chunk_bytes, total)
            last = end >= total
            yield common_pb2.ArtifactChunk(
                kind=self.kind,  # type: ignore[arg-type]
                media_type=media_type,
                index=self.index,
                total_bytes=total,
                offset=offset,
                data=bytes(view[offset:end]),
                sha256=self.sha256 if last else "",
            )
            if last:
                return
            offset = end


class ArtifactAssembler:
    """Reassembles chunked artifacts and verifies order, size and checksum."""

    def __init__(self, max_bytes: int = 2**31) -> None:
        self._max_bytes = max_bytes
        self._open: dict[tuple[int, int], bytearray] = {}

    def feed(self, chunk: common_pb2.ArtifactChunk) -> Artifact | None:
        """Add one chunk; returns the artifact when this chunk completes it."""
        key = (chunk.kind, chunk.index)
        if chunk.total_bytes > self._max_bytes:
            raise ArtifactProtocolError(f"artifact of {chunk.total_bytes} bytes exceeds {self._max_bytes}")
        buffer = self._open.setdefault(key, bytearray())
        if chunk.offset != len(buffer):
            raise ArtifactProtocolError(
                f"chunk at offset {chunk.offset} but {len(buffer)} bytes received so far"
            )
        buffer += chunk.data
        if len(buffer) > chunk.total_bytes:
            raise ArtifactProtocolError(f"received {len(buffer)} bytes, more than total {chunk.total_bytes}")
        if len(buffer) < chunk.total_bytes:
            return None
        del self._open[key]
        artifact = Artifact(kind=chunk.kind, data=bytes(buffer), index=chunk.index,
                            media_type=chunk.media_type)
        if chunk.sha256 and chunk.sha256 != artifact.sha256:
            raise ArtifactProtocolError(f"sha256 mismatch for {artifact.kind_name}[{chunk.index}]")
        return artifact

    @property
    def incomplete(self) -> list[tuple[int, int]]:
        """(kind, index) of artifacts started but not finished."""
        return list(self._open)
