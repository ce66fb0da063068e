from __future__ import annotations

import hashlib

import pytest

from trellisbox._domain.artifacts import Artifact, ArtifactAssembler, ArtifactProtocolError, read_chunk_frame
from trellisbox._domain.convert import params_from_proto, params_to_proto
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.kinds import ArtifactKind
from trellisbox._domain.params import GenerationParams, MultiImageMode, RefineParams
from trellisbox.v1 import common_pb2, gateway_pb2, refiner_pb2, trellis_pb2


def refine_params_from_proto(message: common_pb2.RefineParameters) -> RefineParams:
    return params_from_proto(RefineParams, message, "refine_parameters")


def generation_params_from_proto(message: common_pb2.GenerationParameters) -> GenerationParams:
    return params_from_proto(GenerationParams, message, "generation")


def test_unset_refine_parameters_take_the_trellis_box_defaults() -> None:
    params = refine_params_from_proto(common_pb2.RefineParameters())
    assert (params.strength, params.guidance_scale, params.num_inference_steps) == (0.3, 7.5, 20)
    assert params.prompt == "high quality, detailed, sharp"
    assert params.negative_prompt == "blurry, low quality, distorted"
    assert params.seed is None
    assert (params.aesthetic_score, params.negative_aesthetic_score) == (6.0, 2.5)


def test_explicit_zero_is_not_unset() -> None:
    params = refine_params_from_proto(common_pb2.RefineParameters(guidance_scale=0.0, seed=0))
    assert params.guidance_scale == 0.0 and params.seed == 0


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"strength": 7}, "strength must be in (0.0, 1.0], got 7"),
        ({"strength": 0}, "strength must be in (0.0, 1.0]"),
        ({"num_inference_steps": 0}, "num_inference_steps must be in [1, 200]"),
        ({"guidance_scale": 100}, "guidance_scale must be in [0.0, 30.0]"),
        ({"seed": 2**40}, "refine_parameters.seed must be in [0, 4294967295]"),
        ({"strength": float("nan")}, "refine_parameters.strength must be in (0.0, 1.0], got nan"),
        ({"guidance_scale": float("inf")}, "refine_parameters.guidance_scale must be in [0.0, 30.0], got inf"),
        ({"aesthetic_score": float("-inf")}, "refine_parameters.aesthetic_score must be in [0.0, 10.0], got -inf"),
        ({"prompt": "x" * 5000}, "prompt is 5000 characters"),
    ],
)
def test_out_of_range_refine_parameters(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        refine_params_from_proto(common_pb2.RefineParameters(**fields))  # type: ignore[arg-type]
    assert message in str(info.value)


def test_generation_defaults_and_round_trip() -> None:
    params = generation_params_from_proto(common_pb2.GenerationParameters())
    assert params == GenerationParams()
    assert (params.sparse_structure.steps, params.sparse_structure.cfg_strength) == (12, 7.5)
    assert (params.slat.steps, params.slat.cfg_strength) == (12, 3.0)
    custom = GenerationParams(seed=5, multi_image_mode=MultiImageMode.MULTIDIFFUSION, texture_size=512)
    assert generation_params_from_proto(params_to_proto(custom, common_pb2.GenerationParameters())) == custom
    refine = RefineParams(strength=0.5, seed=9, prompt="a chair")
    assert refine_params_from_proto(params_to_proto(refine, common_pb2.RefineParameters())) == refine


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"texture_size": 10}, "texture_size must be in [256, 4096]"),
        ({"mesh_simplify": 1.5}, "mesh_simplify must be in [0.0, 0.99]"),
        ({"slat": common_pb2.SamplerParameters(steps=0)}, "generation.slat.steps must be in [1, 100]"),
        ({"mesh_simplify": float("nan")}, "generation.mesh_simplify must be in [0.0, 0.99], got nan"),
        ({"sparse_structure": common_pb2.SamplerParameters(cfg_strength=float("inf"))},
         "generation.sparse_structure.cfg_strength must be in [0.0, 30.0], got inf"),
        ({"multi_image_mode": 7}, "generation.multi_image_mode 7 is not a known MultiImageMode"),
    ],
)
def test_out_of_range_generation_parameters(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        generation_params_from_proto(common_pb2.GenerationParameters(**fields))  # type: ignore[arg-type]
    assert message in str(info.value)


@pytest.mark.parametrize("size", [0, 1, 1000, 2**20, 2**20 + 1, 3 * 2**20 + 17])
def test_chunking_round_trip(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    artifact = Artifact(ArtifactKind.GLB, data, index=2)
    chunks = list(artifact.chunks())
    assert all(len(c.data) <= 2**20 for c in chunks)
    assert [c.sha256 != "" for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    assembler = ArtifactAssembler()
    results = [assembler.feed(c) for c in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1)
    done = results[-1]
    assert done is not None and done.data == data and done.index == 2
    assert done.media_type == "model/gltf-binary"
    assert assembler.incomplete == []


@pytest.mark.parametrize("size", [0, 1, 1000, 4096, 4097, 3 * 2**20 + 5])
def test_frames_are_the_chunks_as_every_response(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    artifact = Artifact(ArtifactKind.GAUSSIAN_PLY, data, index=2)
    frames = list(artifact.frames(4096 if size < 2**20 else 2**20))
    expected = list(Artifact(ArtifactKind.GAUSSIAN_PLY, data, index=2).chunks(4096 if size < 2**20 else 2**20))
    for response_type in (refiner_pb2.RefineResponse, trellis_pb2.ImageTo3DResponse, gateway_pb2.GenerateResponse):
        parsed = [response_type.FromString(frame) for frame in frames]
        assert [p.WhichOneof("event") for p in parsed] == ["chunk"] * len(expected)
        assert [p.chunk for p in parsed] == expected
    assembler = ArtifactAssembler()
    results = [assembler.feed(gateway_pb2.GenerateResponse.FromString(frame).chunk) for frame in frames]
    assert results[-1] is not None and results[-1].data == data and results[-1].index == 2
    assert results[-1].sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 4097, 2**20 + 3])
def test_chunk_frames_are_read_without_parsing_the_data(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    artifact = Artifact(ArtifactKind.GLB, data, index=1)
    expected = list(Artifact(ArtifactKind.GLB, data, index=1).chunks(4096))
    # Both forms: the servicers' frames (data last) and protobuf's own serialization (data in field order).
    serialized = [gateway_pb2.GenerateResponse(chunk=c).SerializeToString() for c in expected]
    for frames in ([*artifact.frames(4096)], serialized):
        assembler = ArtifactAssembler()
        results = []
        for frame, chunk in zip(frames, expected, strict=True):
            read = read_chunk_frame(frame)
            assert read is not None
            head, view = read
            assert isinstance(view, memoryview) and view.obj is frame  # the data is a view of the frame, not a copy
            assert bytes(view) == chunk.data and head.data == b""
            head.data = chunk.data
            assert head == chunk
            results.append(assembler.feed(read[0], view))
        assert results[-1] is not None and results[-1].data == data
        assert results[-1].sha256 == hashlib.sha256(data).hexdigest()


def test_read_chunk_frame_leaves_other_events_and_refuses_malformed_chunks() -> None:
    progress = gateway_pb2.GenerateResponse(progress=common_pb2.Progress(step=1, total=2)).SerializeToString()
    done = gateway_pb2.GenerateResponse(done=gateway_pb2.GenerateDone(request_id="r")).SerializeToString()
    assert read_chunk_frame(progress) is None and read_chunk_frame(done) is None
    frame = next(Artifact(ArtifactKind.GLB, b"x" * 100).frames())
    # The chunk's declared length says 5 more bytes than there are: not one whole field, so not read as a chunk.
    assert read_chunk_frame(frame[:-5]) is None
    # A whole event whose data field claims more bytes than the chunk holds.
    chunk = common_pb2.ArtifactChunk(total_bytes=100).SerializeToString() + bytes([6 << 3 | 2, 50]) + b"y" * 10
    with pytest.raises(ArtifactProtocolError, match="malformed artifact chunk"):
        read_chunk_frame(bytes([2 << 3 | 2, len(chunk)]) + chunk)
    # A field with a wire type the contract does not use (a group).
    chunk = bytes([1 << 3 | 3])
    with pytest.raises(ArtifactProtocolError, match="wire type"):
        read_chunk_frame(bytes([2 << 3 | 2, len(chunk)]) + chunk)


def test_assembler_rejects_gaps_and_bad_checksums() -> None:
    chunks = list(Artifact(ArtifactKind.GLB, b"x" * 3000).chunks(chunk_bytes=1000))
    with pytest.raises(ArtifactProtocolError, match="offset"):
        ArtifactAssembler().feed(chunks[1])
    assembler = ArtifactAssembler()
    assembler.feed(chunks[0])
    assembler.feed(chunks[1])
    last = common_pb2.ArtifactChunk()
    last.CopyFrom(chunks[2])
    last.data = b"y" + last.data[1:]
    with pytest.raises(ArtifactProtocolError, match="crc32c mismatch"):
        assembler.feed(last)
