"""Chunking and reassembly as the gateway and the client use them (trellisbox/artifacts.py)."""

from __future__ import annotations

import hashlib
import os

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
    bad = common_pb2.ArtifactChunk()
    bad.CopyFrom(chunks[2])
    bad.sha256 = "0" * 64
    assembler = ArtifactAssembler()
    assembler.feed(chunks[0])
    assembler.feed(chunks[1])
    with pytest.raises(ArtifactProtocolError, match=r"sha256 mismatch for ARTIFACT_KIND_GLB\[0\]"):
        assembler.feed(bad)
