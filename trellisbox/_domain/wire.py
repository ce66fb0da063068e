"""The few pieces of protobuf's wire format that let events be sent and read without building messages.

Every response message of the contract (``RefineResponse``, ``ImageTo3DResponse``, ``GenerateResponse``,
``GetResultResponse``) carries its event as a single length-delimited field, and an artifact chunk's ``data`` is one
field of ``ArtifactChunk``: so a chunk event can be written around a view of the artifact
(:meth:`~trellisbox._domain.artifacts.Artifact.frames`), relayed as received (``gateway/relay.py``) and read without
copying its data (:func:`~trellisbox._domain.artifacts.read_chunk_frame`).
"""

from __future__ import annotations

#: Protobuf wire types.
VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5

Buffer = bytes | bytearray | memoryview


def encode_varint(value: int) -> bytes:
    """``value`` (non-negative) as a base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_prefix(field_number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return encode_varint(field_number << 3 | LENGTH_DELIMITED) + encode_varint(length)


def read_varint(data: Buffer, pos: int) -> tuple[int, int]:
    """Decode the varint at ``pos``; returns (value, position after it).

    Raises:
        ValueError: it is truncated or longer than 10 bytes.
    """
    value = shift = 0
    while shift < 64:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def single_field(data: Buffer) -> int:
    """The field number when ``data`` is exactly one length-delimited field (tag, length, payload), else 0."""
    try:
        tag, pos = read_varint(data, 0)
        if tag & 7 != LENGTH_DELIMITED:
            return 0
        length, pos = read_varint(data, pos)
    except ValueError:
        return 0
    return tag >> 3 if pos + length == len(data) else 0


def skip_field(data: Buffer, tag: int, pos: int) -> int:
    """The position after the value of a field whose ``tag`` was read just before ``pos``.

    Raises:
        ValueError: a wire type this contract does not use (groups), or the value runs past the end.
    """
    wire_type = tag & 7
    if wire_type == VARINT:
        return read_varint(data, pos)[1]
    if wire_type == LENGTH_DELIMITED:
        length, pos = read_varint(data, pos)
        end = pos + length
    elif wire_type == FIXED64:
        end = pos + 8
    elif wire_type == FIXED32:
        end = pos + 4
    else:
        raise ValueError(f"unsupported wire type {wire_type}")
    if end > len(data):
        raise ValueError("field runs past the end of the message")
    return end
