"""Artifact chunking and reassembly: the one streaming format for GLB, PLY and refined PNGs."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import crc32c
from google.protobuf.message import DecodeError

from trellisbox._domain.kinds import ArtifactKind, artifact_kind, kind_label
from trellisbox._domain.wire import LENGTH_DELIMITED, length_prefix, read_varint, single_field, skip_field
from trellisbox.v1 import common_pb2

CHUNK_BYTES = 1024 * 1024
#: Field numbers in the wire form :meth:`Artifact.frames` writes: ``chunk`` in every stage's and the gateway's
#: response (``gateway/relay.py``), ``data`` in ``ArtifactChunk``.
CHUNK_EVENT_FIELD = 2
CHUNK_DATA_FIELD = 6


class ArtifactProtocolError(Exception):
    """Chunks arrived out of order, with a wrong size, or with a checksum that does not match their data."""


@dataclass(frozen=True)
class Artifact:
    """A complete artifact.

    Args:
        kind: An :class:`ArtifactKind` (a plain number when a newer server sent a kind this client does not know).
        data: The artifact bytes.
        index: Which artifact of this kind (input image index for refined images).
        media_type: Defaults to the kind's media type.
    """

    kind: ArtifactKind | int
    data: bytes
    index: int = 0
    media_type: str = ""

    @cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of ``data``, computed once, when first asked for. Already known where the artifact was cut,
        and where it was checked with it (chunks from a server older than the CRC-32C field)."""
        return hashlib.sha256(self.data).hexdigest()

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[common_pb2.ArtifactChunk]:
        """The artifact as ordered chunks, each with the CRC-32C of its data; the last carries the SHA-256 of the
        whole."""
        for head, piece in self._cut(chunk_bytes):
            head.data = bytes(piece)
            yield head

    def frames(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The chunks of :meth:`chunks` as serialized response events: each is, byte for byte, a
        ``RefineResponse``, ``ImageTo3DResponse`` or ``GenerateResponse`` whose ``chunk`` is set.

        What a servicer sends, built with one copy of the artifact's bytes: each chunk's small fields are
        serialized by protobuf without ``data``, and ``data`` (parsers accept fields in any order) follows
        straight from a view of the artifact. Cutting a piece, setting it into a chunk, wrapping that in a
        response and serializing it copies each byte four times.
        """
        for head, piece in self._cut(chunk_bytes):
            fields = head.SerializeToString() + length_prefix(CHUNK_DATA_FIELD, len(piece))
            yield b"".join((length_prefix(CHUNK_EVENT_FIELD, len(fields) + len(piece)), fields, piece))

    def _cut(self, chunk_bytes: int) -> Iterator[tuple[common_pb2.ArtifactChunk, memoryview]]:
        """Each chunk without its data, and a view of that data.

        The SHA-256 is computed piece by piece as the chunks are cut (each piece is hashed while it is still
        in cache, and the last chunk is not held back by a pass over the whole artifact); an artifact
        chunked again reuses it. Each piece's CRC-32C, for the receivers' check, costs a fifteenth of that.
        """
        view = memoryview(self.data)
        total = len(view)
        kind = artifact_kind(self.kind)
        default_type = kind.media_type if isinstance(kind, ArtifactKind) else "application/octet-stream"
        media_type = self.media_type or default_type
        digest = None if "sha256" in self.__dict__ else hashlib.sha256()
        offset = 0
        while True:
            end = min(offset + chunk_bytes, total)
            piece = view[offset:end]
            last = end >= total
            if digest is not None:
                digest.update(piece)
                if last:
                    self.__dict__["sha256"] = digest.hexdigest()  # fills the cached_property
            yield common_pb2.ArtifactChunk(
                kind=common_pb2.ArtifactKind.ValueType(self.kind),
                media_type=media_type,
                index=self.index,
                total_bytes=total,
                offset=offset,
                sha256=self.sha256 if last else "",
                crc32c=crc32c.crc32c(piece),
            ), piece
            if last:
                return
            offset = end


@dataclass
class _Partial:
    """An artifact being received: its bytes so far, and their running SHA-256 where its chunks carry no CRC-32C."""

    digest: hashlib._Hash | None
    buffer: io.BytesIO = field(default_factory=io.BytesIO)
    received: int = 0


def read_chunk_frame(frame: bytes) -> tuple[common_pb2.ArtifactChunk, memoryview] | None:
    """Read a serialized response event without copying its artifact bytes: when ``frame`` is a response whose event
    is an artifact chunk (field 2 of every response message of the contract), the chunk without its data, and a view
    of the data inside ``frame``; None for any other event.

    Parsing the response instead copies the 1 MiB of data into the message, and reading ``chunk.data`` copies it
    once more; here only the chunk's small fields are parsed (by protobuf), wherever they are in the message.

    Raises:
        ArtifactProtocolError: the chunk is malformed.
    """
    if single_field(frame) != CHUNK_EVENT_FIELD:
        return None
    view = memoryview(frame)
    head = bytearray()
    data = view[:0]
    try:
        pos = read_varint(frame, read_varint(frame, 0)[1])[1]  # past the event's tag and length: the chunk's fields
        while pos < len(frame):
            start = pos
            tag, pos = read_varint(frame, pos)
            end = skip_field(frame, tag, pos)
            if tag == CHUNK_DATA_FIELD << 3 | LENGTH_DELIMITED:  # the data; of several, the last counts (protobuf)
                data = view[read_varint(frame, pos)[1]:end]
            else:
                head += view[start:end]
            pos = end
        chunk = common_pb2.ArtifactChunk.FromString(bytes(head))
    except (ValueError, DecodeError) as exc:
        raise ArtifactProtocolError(f"malformed artifact chunk: {exc}") from None
    return chunk, data


class ArtifactAssembler:
    """Reassembles chunked artifacts and verifies their order, their size and each chunk's CRC-32C.

    Each chunk is checked on arrival, while its bytes are in cache, and appended to a ``BytesIO``, whose
    ``getvalue()`` hands its buffer over as the artifact's ``bytes`` without copying it: one copy of
    every byte in all, and no second pass. (Fresh memory is what costs: the first write to a page faults
    it in, so each avoided copy of a whole artifact matters more than the copy itself.)

    The CRC-32C of each chunk, set where the artifact was cut, is what guards the bytes end to end: it
    costs 0.05 ms per MiB here, where hashing the artifact with SHA-256 cost 0.8, a third of all the client
    spent per MiB received. The last chunk's SHA-256 is left to :attr:`Artifact.sha256`, computed when asked
    for. Chunks from a server older than the CRC-32C field are checked against that SHA-256 instead.
    """

    def __init__(self, max_bytes: int = 2**31) -> None:
        self._max_bytes = max_bytes
        self._open: dict[tuple[int, int], _Partial] = {}

    def feed(self, chunk: common_pb2.ArtifactChunk, data: bytes | memoryview | None = None) -> Artifact | None:
        """Add one chunk; returns the artifact when this chunk completes it. ``data``: the chunk's bytes when they
        were read apart from ``chunk`` (:func:`read_chunk_frame`), else ``chunk.data``."""
        key = (chunk.kind, chunk.index)
        total = chunk.total_bytes
        if total > self._max_bytes:
            raise ArtifactProtocolError(f"artifact of {total} bytes exceeds {self._max_bytes}")
        checked = chunk.HasField("crc32c")  # False from a server older than the field
        partial = self._open.get(key)
        if partial is None:
            partial = self._open[key] = _Partial(None if checked else hashlib.sha256())
        if chunk.offset != partial.received:
            raise ArtifactProtocolError(
                f"chunk at offset {chunk.offset} but {partial.received} bytes received so far"
            )
        if data is None:
            data = chunk.data  # protobuf hands out a new copy on every access: read it once
        partial.received += len(data)
        if partial.received > total:
            raise ArtifactProtocolError(f"received {partial.received} bytes, more than total {total}")
        if checked:
            if crc32c.crc32c(data) != chunk.crc32c:
                raise ArtifactProtocolError(f"crc32c mismatch for {kind_label(chunk.kind)}[{chunk.index}] in the "
                                            f"chunk at offset {chunk.offset}")
        elif partial.digest is None:
            raise ArtifactProtocolError(f"the chunk at offset {chunk.offset} of {kind_label(chunk.kind)}"
                                        f"[{chunk.index}] has no crc32c, unlike the chunks before it")
        if partial.digest is not None:
            partial.digest.update(data)
        partial.buffer.write(data)
        if partial.received < total:
            return None
        del self._open[key]
        artifact = Artifact(kind=artifact_kind(chunk.kind), data=partial.buffer.getvalue(), index=chunk.index,
                            media_type=chunk.media_type)
        if partial.digest is not None:
            sha256 = partial.digest.hexdigest()
            if chunk.sha256 and chunk.sha256 != sha256:
                raise ArtifactProtocolError(f"sha256 mismatch for {kind_label(chunk.kind)}[{chunk.index}]")
            artifact.__dict__["sha256"] = sha256  # already known: fills the cached_property
        return artifact

    @property
    def incomplete(self) -> list[tuple[int, int]]:
        """(kind, index) of artifacts started but not finished."""
        return list(self._open)
