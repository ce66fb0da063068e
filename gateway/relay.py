"""Relaying stage events to the client without decoding and re-encoding them.

``RefineResponse``, ``ImageTo3DResponse`` and ``GenerateResponse`` lay out the events the gateway relays
the same way: a oneof whose field 1 is ``Progress progress`` and field 2 is ``ArtifactChunk chunk``
(``tests/gateway/test_relay.py`` holds the protos to that). A stage's progress or chunk event on the wire
is therefore, byte for byte, a valid ``GenerateResponse`` carrying the same event. The stage stubs
deserialize with :func:`stage_deserializer`, which reads only the leading tag and length of each message:
progress and chunk events keep their received bytes and go back out as :class:`Encoded` (the gateway's
response serializer passes them through), so a 1 MiB artifact chunk is neither parsed, nor copied into a
new message, nor serialized again. ``done`` events, and any message not in that exact single-field form,
are parsed in full; the gateway reads those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

from trellisbox._domain.artifacts import read_chunk_frame
from trellisbox._domain.wire import single_field as single_field  # re-exported: gateway.results, tests
from trellisbox.v1 import common_pb2, gateway_pb2, refiner_pb2, trellis_pb2

#: Field numbers of the events in all three response messages (0: a message with no event set).
PROGRESS = 1
CHUNK = 2
DONE = 3

M = TypeVar("M", refiner_pb2.RefineResponse, trellis_pb2.ImageTo3DResponse)


@dataclass(frozen=True, slots=True)
class Encoded:
    """A ``GenerateResponse`` already in wire format, sent to the client as it is."""

    data: bytes


Outgoing: TypeAlias = gateway_pb2.GenerateResponse | Encoded


def serialize_response(response: Outgoing) -> bytes:
    """The gateway's response serializer: pre-encoded events pass through, messages are serialized."""
    if isinstance(response, Encoded):
        return response.data
    return response.SerializeToString()


class StageEvent(Generic[M]):
    """One message of a stage's response stream.

    ``field`` says which event it is (:data:`PROGRESS`, :data:`CHUNK`, :data:`DONE`, 0 for none). Progress
    and chunk events carry the bytes they arrived as (``encoded``) and are parsed only when
    :attr:`message` is read (the refined images the gateway reassembles); everything else is parsed on
    arrival.
    """

    __slots__ = ("_message", "_type", "encoded", "field")

    field: int
    encoded: bytes | None
    _type: type[M]
    _message: M | None

    def __init__(self, message_type: type[M], field: int, encoded: bytes | None = None,
                 message: M | None = None) -> None:
        self._type = message_type
        self.field = field
        self.encoded = encoded
        self._message = message

    @property
    def message(self) -> M:
        if self._message is None:
            assert self.encoded is not None  # nosec B101  # for mypy: one of the two is always set
            message: M = self._type.FromString(self.encoded)
            self._message = message
        return self._message

    def chunk(self) -> tuple[common_pb2.ArtifactChunk, bytes | memoryview]:
        """This chunk event's chunk, its data apart: from the received bytes, a view of them (no copy of the data).

        Raises:
            ArtifactProtocolError: the chunk is malformed.
        """
        if self.encoded is not None:
            read = read_chunk_frame(self.encoded)
            if read is not None:
                return read
        chunk = self.message.chunk
        return chunk, chunk.data

    def relay(self) -> Outgoing:
        """This progress or chunk event as the gateway's response: its own bytes when it has them."""
        if self.encoded is not None:
            return Encoded(self.encoded)
        message = self.message
        if message.HasField("progress"):
            return gateway_pb2.GenerateResponse(progress=message.progress)
        return gateway_pb2.GenerateResponse(chunk=message.chunk)


_EVENT_FIELDS = {"progress": PROGRESS, "chunk": CHUNK, "done": DONE}


def stage_deserializer(message_type: type[M]) -> Callable[[bytes], StageEvent[M]]:
    """Response deserializer for a stage stub whose messages are ``message_type``."""

    def deserialize(data: bytes) -> StageEvent[M]:
        field = single_field(data)
        if field in (PROGRESS, CHUNK):
            return StageEvent(message_type, field, encoded=data)
        message: M = message_type.FromString(data)
        field = _EVENT_FIELDS.get(message.WhichOneof("event") or "", 0)
        return StageEvent(message_type, field, message=message)

    return deserialize
