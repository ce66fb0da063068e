"""The gateway relays stage progress and chunk events in the bytes they arrived as (gateway/relay.py)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.relay import CHUNK, DONE, PROGRESS, Encoded, serialize_response, single_field, stage_deserializer
from trellisbox._domain.artifacts import Artifact
from trellisbox.v1 import common_pb2, gateway_pb2, refiner_pb2, trellis_pb2

STAGE_TYPES = [refiner_pb2.RefineResponse, trellis_pb2.ImageTo3DResponse]
# Either stage message class: the tests run the same code over both (a union mypy cannot call through).
StageType = Any


def _progress() -> common_pb2.Progress:
    return common_pb2.Progress(stage=common_pb2.STAGE_SLAT, step=3, total=12, message="sampling")


def _chunk(size: int = 3 * 2**20 // 2) -> common_pb2.ArtifactChunk:
    return next(Artifact(common_pb2.ARTIFACT_KIND_GLB, bytes(range(256)) * (size // 256)).chunks(size))


@pytest.mark.parametrize("stage_type", STAGE_TYPES)
def test_stage_events_share_field_numbers_and_types_with_generate_response(stage_type: StageType) -> None:
    """The invariant the raw relay rests on: fields 1 and 2 mean the same thing in all three messages."""
    gateway = gateway_pb2.GenerateResponse.DESCRIPTOR
    stage = stage_type.DESCRIPTOR
    for number in (PROGRESS, CHUNK):
        ours, theirs = gateway.fields_by_number[number], stage.fields_by_number[number]
        assert (ours.name, ours.message_type.full_name) == (theirs.name, theirs.message_type.full_name)
        assert ours.containing_oneof is not None and theirs.containing_oneof is not None
        assert ours.containing_oneof.name == theirs.containing_oneof.name == "event"
    assert stage.fields_by_number[DONE].name == gateway.fields_by_number[DONE].name == "done"


@pytest.mark.parametrize("stage_type", STAGE_TYPES)
@pytest.mark.parametrize("field", ["progress", "chunk"])
def test_progress_and_chunks_are_relayed_byte_for_byte(stage_type: StageType, field: str) -> None:
    value = _progress() if field == "progress" else _chunk()
    event_field: dict[str, Any] = {field: value}
    wire = stage_type(**event_field).SerializeToString()
    event = stage_deserializer(stage_type)(wire)
    assert event.field == (PROGRESS if field == "progress" else CHUNK)
    relayed = event.relay()
    assert isinstance(relayed, Encoded) and relayed.data is wire  # not parsed, not copied
    assert serialize_response(relayed) is wire
    assert gateway_pb2.GenerateResponse.FromString(wire) == gateway_pb2.GenerateResponse(**event_field)
    assert getattr(event.message, field) == value  # parsed on demand (refined images)


@pytest.mark.parametrize("stage_type", STAGE_TYPES)
def test_done_is_parsed(stage_type: StageType) -> None:
    done_type = type(stage_type().done)
    message = stage_type(done=done_type(timings=[common_pb2.StageTiming(stage=common_pb2.STAGE_EXPORT, seconds=1.5)]))
    event = stage_deserializer(stage_type)(message.SerializeToString())
    assert event.field == DONE and event.encoded is None
    assert event.message == message


def test_a_message_not_in_single_field_form_is_parsed_and_reencoded() -> None:
    # Two oneof members on the wire: protobuf keeps the last one, and so must the relay.
    progress = trellis_pb2.ImageTo3DResponse(progress=_progress()).SerializeToString()
    chunk = trellis_pb2.ImageTo3DResponse(chunk=_chunk(4096)).SerializeToString()
    event = stage_deserializer(trellis_pb2.ImageTo3DResponse)(progress + chunk)
    assert event.field == CHUNK and event.encoded is None
    relayed = event.relay()
    assert relayed == gateway_pb2.GenerateResponse(chunk=_chunk(4096))
    assert gateway_pb2.GenerateResponse.FromString(serialize_response(relayed)) == relayed


def test_an_empty_event_is_neither_relayed_nor_done() -> None:
    event = stage_deserializer(refiner_pb2.RefineResponse)(b"")
    assert event.field == 0


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"", 0),
        (b"\x0a\x00", 1),  # field 1, empty payload
        (b"\x12\x02ab", 2),
        (b"\x12\x03ab", 0),  # length runs past the end
        (b"\x12\x01ab", 0),  # trailing bytes: a second field
        (b"\x08\x01", 0),  # varint wire type
        (b"\x12\x80", 0),  # truncated length varint
        (b"\x12" + b"\xff" * 11, 0),  # overlong varint
    ],
)
def test_single_field(data: bytes, expected: int) -> None:
    assert single_field(data) == expected


def test_serialize_response_serializes_messages() -> None:
    message = gateway_pb2.GenerateResponse(done=gateway_pb2.GenerateDone(request_id="r"))
    assert serialize_response(message) == message.SerializeToString()


@pytest.mark.parametrize(("original", "twin"), [
    (gateway_pb2.GenerateResponse, gateway_pb2.GetResultResponse),
    (trellis_pb2.ImageTo3DResponse, trellis_pb2.RefineGaussiansResponse),
])
def test_twin_responses_are_the_same_on_the_wire(original: Any, twin: Any) -> None:
    """A durable request's stored records (GenerateResponse bytes) are sent as they are by GetResult; the gateway
    reads RefineGaussians' events as ImageTo3D's."""
    for number in (PROGRESS, CHUNK, DONE):
        ours, theirs = original.DESCRIPTOR.fields_by_number[number], twin.DESCRIPTOR.fields_by_number[number]
        assert (ours.name, ours.message_type.full_name) == (theirs.name, theirs.message_type.full_name)
    assert set(original.DESCRIPTOR.fields_by_number) == set(twin.DESCRIPTOR.fields_by_number)


@pytest.mark.parametrize("stage_type", STAGE_TYPES)
def test_a_chunk_is_read_from_its_received_bytes(stage_type: StageType) -> None:
    chunk = _chunk()
    received = stage_type(chunk=chunk).SerializeToString()
    event = stage_deserializer(stage_type)(received)
    head, data = event.chunk()
    assert isinstance(data, memoryview) and data.obj is received and bytes(data) == chunk.data  # a view, no copy
    assert (head.offset, head.total_bytes, head.kind, head.sha256) == (chunk.offset, chunk.total_bytes, chunk.kind,
                                                                       chunk.sha256)
    # A chunk event not in single-field form is parsed, and its data read from the message.
    tail = stage_type(chunk=common_pb2.ArtifactChunk(data=b"tail")).SerializeToString()
    parsed = stage_deserializer(stage_type)(received + tail)
    assert parsed.encoded is None and parsed.field == CHUNK
    head, data = parsed.chunk()  # protobuf merges the two chunks: the second's data replaces the first's
    assert data == b"tail" and head.total_bytes == chunk.total_bytes
