"""Chunking and reassembly as the gateway and the client use them (trellisbox/artifacts.py)."""

from __future__ import annotations

import hashlib
import os

import crc32c
import pytest

from trellisbox._domain.artifacts import Artifact, ArtifactAssembler, ArtifactProtocolError
from trellisbox.v1 import common_pb2

GLB, PLY = common_pb2.ARTIFACT_KIND_GLB, common_pb2.ARTIFACT_KIND_GAUSSIAN_PLY


@pytest.mark.parametrize("size,chunk_bytes", [(0, 1024), (1, 1024), (1024, 1024), (1025, 1024), (10_000, 999)])
def test_round_trip_and_checksum(size: int, chunk_bytes: int) -> None:
    data = os.urandom(size)
    chunks = list(Artifact(GLB, data).chunks(chunk_bytes))
    assert b"".join(c.data for c in chunks) == data
    assert [c.offset for c in chunks] == list(range(0, max(size, 1), chunk_bytes))[: len(chunks)]
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert all(not c.sha256 for c in chunks[:-1])
    assembler = ArtifactAssembler()
    results = [assembler.feed(c) for c in chunks]
    artifact = results[-1]
    assert artifact is not None and results[:-1] == [None] * (len(chunks) - 1)
    assert artifact.data == data and isinstance(artifact.data, bytes)
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert assembler.incomplete == []


def test_chunking_twice_gives_the_same_chunks() -> None:
    artifact = Artifact(PLY, os.urandom(5000), index=2)
    assert list(artifact.chunks(2048)) == list(artifact.chunks(2048))
    assert artifact.sha256 == hashlib.sha256(artifact.data).hexdigest()


def test_artifacts_of_different_kinds_and_indexes_reassemble_side_by_side() -> None:
    a, b = Artifact(GLB, os.urandom(3000)), Artifact(PLY, os.urandom(2500), index=1)
    assembler = ArtifactAssembler()
    done = []
    for ca, cb in zip(a.chunks(1000), b.chunks(1000), strict=True):
        done += [x for x in (assembler.feed(ca), assembler.feed(cb)) if x is not None]
    assert [(x.kind, x.index, x.data) for x in done] == [(GLB, 0, a.data), (PLY, 1, b.data)]


def test_protocol_errors() -> None:
    chunks = list(Artifact(GLB, b"x" * 3000).chunks(1000))
    with pytest.raises(ArtifactProtocolError, match="offset 1000 but 0"):
        ArtifactAssembler().feed(chunks[1])
    oversized = common_pb2.ArtifactChunk()
    oversized.CopyFrom(chunks[0])
    oversized.total_bytes = 500
    with pytest.raises(ArtifactProtocolError, match="more than total"):
        ArtifactAssembler().feed(oversized)
    with pytest.raises(ArtifactProtocolError, match="exceeds"):
        ArtifactAssembler(max_bytes=100).feed(chunks[0])


def _without_crc32c(chunk: common_pb2.ArtifactChunk) -> common_pb2.ArtifactChunk:
    """The chunk as a server older than the ``crc32c`` field sends it."""
    legacy = common_pb2.ArtifactChunk()
    legacy.CopyFrom(chunk)
    legacy.ClearField("crc32c")
    return legacy


def test_each_chunk_carries_the_crc32c_of_its_data() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the Castagnoli check value: what other languages' CRC-32C give
    data = os.urandom(2500)
    chunks = list(Artifact(GLB, data).chunks(1000))
    assert [c.crc32c for c in chunks] == [crc32c.crc32c(data[i:i + 1000]) for i in range(0, 2500, 1000)]
    assert all(c.HasField("crc32c") for c in chunks)
    empty = list(Artifact(GLB, b"").chunks())
    assert empty[0].HasField("crc32c") and empty[0].crc32c == 0


def _one_bit_flipped(data: bytes) -> bytes:
    """``data`` with its first bit inverted: always a change, whatever random bytes it holds."""
    return bytes([data[0] ^ 1]) + data[1:]


@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_chunk_whose_data_changed_on_the_way_is_refused_where_it_arrives(where: int) -> None:
    chunks = list(Artifact(GLB, os.urandom(3000)).chunks(1000))
    damaged = common_pb2.ArtifactChunk()
    damaged.CopyFrom(chunks[where])
    damaged.data = _one_bit_flipped(damaged.data)
    assembler = ArtifactAssembler()
    for chunk in chunks[:where]:
        assert assembler.feed(chunk) is None
    with pytest.raises(ArtifactProtocolError,
                       match=rf"crc32c mismatch for ARTIFACT_KIND_GLB\[0\] in the chunk at offset {where * 1000}"):
        assembler.feed(damaged)
    with pytest.raises(ArtifactProtocolError, match="crc32c mismatch"):  # as a view, read from a frame
        ArtifactAssembler().feed(chunks[0], memoryview(_one_bit_flipped(chunks[0].data)))


def test_chunks_without_crc32c_are_checked_against_the_sha256() -> None:
    data = os.urandom(3000)
    legacy = [_without_crc32c(c) for c in Artifact(GLB, data).chunks(1000)]
    assembler = ArtifactAssembler()
    artifact = [assembler.feed(c) for c in legacy][-1]
    assert artifact is not None and artifact.data == data
    assert artifact.__dict__["sha256"] == hashlib.sha256(data).hexdigest()  # verified on arrival, so already known
    bad = common_pb2.ArtifactChunk()
    bad.CopyFrom(legacy[2])
    bad.sha256 = "0" * 64
    assembler = ArtifactAssembler()
    assembler.feed(legacy[0])
    assembler.feed(legacy[1])
    with pytest.raises(ArtifactProtocolError, match=r"sha256 mismatch for ARTIFACT_KIND_GLB\[0\]"):
        assembler.feed(bad)


def test_a_chunk_without_crc32c_after_chunks_with_one_is_refused() -> None:
    chunks = list(Artifact(GLB, os.urandom(3000)).chunks(1000))
    assembler = ArtifactAssembler()
    assembler.feed(chunks[0])
    with pytest.raises(ArtifactProtocolError, match="offset 1000 of ARTIFACT_KIND_GLB\\[0\\] has no crc32c"):
        assembler.feed(_without_crc32c(chunks[1]))
