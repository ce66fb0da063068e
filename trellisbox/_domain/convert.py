"""Protobuf ↔ domain: the one place the two meet. Backends never see protobuf.

Parameter conversions are derived from the parameter definitions (:mod:`trellisbox._domain.params`): a proto
field and a domain field share their name; proto3 ``optional`` fields left unset take the definition's
default; enums map by name (``MULTI_IMAGE_MODE_STOCHASTIC`` ↔ ``MultiImageMode.STOCHASTIC``, the
``..._UNSPECIFIED`` zero value meaning "the default").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message
from PIL import Image

from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.imaging import ImageLimits, check_image, decode_image
from trellisbox._domain.kinds import ArtifactKind, Stage, artifact_kind, kind_label, known_stage
from trellisbox._domain.params import ParamModel, build, describe, field_named, model_type, scalar_type
from trellisbox.v1 import common_pb2

P = TypeVar("P", bound=ParamModel)
M = TypeVar("M", bound=Message)


# -- parameters ---------------------------------------------------------------------------------------------


def params_from_proto(cls: type[P], message: Message, where: str) -> P:
    """Validated ``cls`` from ``message``: set fields as given, unset ones at their default.

    Args:
        cls: ``RefineParams`` or ``GenerationParams``.
        message: The matching proto message (``RefineParameters``, ``GenerationParameters``).
        where: How the caller spells the message, for errors (``refine_parameters``).

    Raises:
        InvalidInput: a value is out of range, NaN or infinite, too long, or an unknown enum number.
    """
    return build(cls, _values(cls, message, cls(), where), where)


def _values(cls: type[ParamModel], message: Message, defaults: ParamModel, where: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        default = getattr(defaults, name)
        nested = model_type(info)
        enum = _enum_type(message, name)
        if nested is not None:
            given = message.HasField(name)
            values[name] = _values(nested, getattr(message, name), default, f"{where}.{name}") if given else default
        elif enum is not None:
            values[name] = _enum_from_proto(enum, getattr(message, name), default, f"{where}.{name}")
        elif message.HasField(name):
            values[name] = getattr(message, name)
        else:
            values[name] = default
    return values


def _enum_type(message: Message, name: str) -> EnumDescriptor | None:
    field = message.DESCRIPTOR.fields_by_name[name]
    enum: EnumDescriptor | None = field.enum_type  # type: ignore[assignment]  # the C and Python twins
    return enum  # None for a field that is not an enum


def _enum_prefix(enum: EnumDescriptor) -> str:
    """``MULTI_IMAGE_MODE_`` for ``MultiImageMode`` (buf style: values carry the type's name)."""
    return str(enum.values_by_number[0].name).removesuffix("UNSPECIFIED")


def _enum_from_proto(enum: EnumDescriptor, number: int, default: Enum, where: str) -> Any:
    if number == 0:
        return default
    value = enum.values_by_number.get(number)
    if value is None:
        raise InvalidInput(f"{where} {number} is not a known {enum.name}")
    return type(default)[str(value.name).removeprefix(_enum_prefix(enum))]


def params_to_proto(params: ParamModel, message: M) -> M:
    """Fill ``message`` with every field of ``params`` (the forwarded request is explicit, not defaulted)."""
    for name in type(params).model_fields:
        value = getattr(params, name)
        if value is None:
            continue  # an unset seed: the next service chooses one
        enum = _enum_type(message, name)
        if isinstance(value, ParamModel):
            params_to_proto(value, getattr(message, name)).SetInParent()
        elif isinstance(value, Enum) and enum is not None:
            setattr(message, name, _enum_number(enum, value))
        else:
            setattr(message, name, value)
    return message


def _enum_number(enum: EnumDescriptor, member: Enum) -> int:
    return int(enum.values_by_name[_enum_prefix(enum) + member.name].number)


def params_message(cls: type[ParamModel], message: M, values: Mapping[str, Any], where: str) -> M:
    """``message`` with the fields named in ``values`` set (the rest left unset: the server's defaults).

    For callers that build requests from keyword mappings (the Python client, the CLI, the web form).
    Enum fields take the member or its value (``"stochastic"``); nested messages take a mapping.

    Raises:
        ValueError: a name that is not a parameter of ``cls``, an unknown enum value, or a value the field cannot
            hold (a string for a number, a negative seed, a whole number beyond 64 bits); each names the field.
            Other ranges are the server's to check.
    """
    for name, value in values.items():
        info = field_named(cls, name, where)
        nested = model_type(info)
        if nested is not None:
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.{name} must be a mapping of {', '.join(nested.model_fields)}, "
                                 f"got {value!r}")
            params_message(nested, getattr(message, name), value, f"{where}.{name}").SetInParent()
            continue
        kind = scalar_type(info)
        enum = _enum_type(message, name)
        if issubclass(kind, Enum) and enum is not None:
            try:
                member = value if isinstance(value, kind) else kind(value)
            except ValueError:
                raise ValueError(f"{where}.{name} must be one of {', '.join(str(m.value) for m in kind)}, "
                                 f"got {value!r}") from None
            setattr(message, name, _enum_number(enum, member))
            continue
        try:  # protobuf refuses what its field type cannot hold, but its message names no field
            setattr(message, name, value)
        except (TypeError, ValueError):
            wanted = describe(info)
            if kind in (int, float) and wanted.startswith("in "):
                wanted = f"{'a whole number' if kind is int else 'a number'} {wanted}"
            raise ValueError(f"{where}.{name} must be {wanted}, got {value!r}") from None
    return message


# -- progress, timings and artifact kinds -------------------------------------------------------------------


def stage_to_proto(stage: Stage) -> common_pb2.Stage.ValueType:
    return common_pb2.Stage.ValueType(int(stage))


def progress_to_proto(stage: Stage, step: int, total: int, message: str = "") -> common_pb2.Progress:
    return common_pb2.Progress(stage=stage_to_proto(stage), step=step, total=total, message=message)


def timings_to_proto(timings: Mapping[Stage, float]) -> list[common_pb2.StageTiming]:
    return [common_pb2.StageTiming(stage=stage_to_proto(stage), seconds=seconds) for stage, seconds in timings.items()]


def stage_name(number: int) -> str:
    """``"SLAT"`` for a proto stage number (``str(number)`` for one this version does not know)."""
    stage = known_stage(number)
    return stage.name if stage is not None else str(number)


def kinds_from_proto(kinds: Iterable[int], allowed: Iterable[ArtifactKind], where: str = "formats",
                     hints: Mapping[ArtifactKind, str] | None = None) -> frozenset[ArtifactKind]:
    """The requested artifact kinds, refusing unknown ones and those this service cannot make.

    Args:
        kinds: The request's ``ArtifactKind`` numbers.
        allowed: What this service produces.
        where: How the caller spells the field, for errors.
        hints: Where to get a kind this service does not produce (added to its error).
    """
    allowed = frozenset(allowed)
    use = " and/or ".join(kind_label(k) for k in sorted(allowed))
    result: set[ArtifactKind] = set()
    for number in kinds:
        kind = artifact_kind(number)
        if not isinstance(kind, ArtifactKind) or kind not in allowed:
            known = number in common_pb2.ArtifactKind.values()
            name = common_pb2.ArtifactKind.Name(common_pb2.ArtifactKind.ValueType(number)) if known else str(number)
            hint = (hints or {}).get(kind) if isinstance(kind, ArtifactKind) else None
            raise InvalidInput(f"{where}: {name} is not an artifact this service produces"
                               + (f"; {hint}" if hint else "") + f"; use {use}")
        result.add(kind)
    return frozenset(result)


def kinds_to_proto(kinds: Iterable[ArtifactKind]) -> list[common_pb2.ArtifactKind.ValueType]:
    return [common_pb2.ArtifactKind.ValueType(int(kind)) for kind in sorted(kinds)]


# -- images -------------------------------------------------------------------------------------------------


def _numbered(images: Sequence[common_pb2.Image], max_count: int, field: str
              ) -> Iterator[tuple[str, common_pb2.Image]]:
    """A request's images with the name errors give each (``images[i]``; ``field`` names the request's field), once
    their count is within bounds."""
    if not images:
        raise InvalidInput(f"no {field}: send at least one PNG, JPEG or WebP image")
    if len(images) > max_count:
        raise InvalidInput(f"{len(images)} {field} sent; at most {max_count} per request")
    for i, image in enumerate(images):
        yield f"{field}[{i}]", image


def decoded_images(images: Sequence[common_pb2.Image], limits: ImageLimits, max_count: int, *,
                   handoff: bool = False, field: str = "images") -> Iterator[Image.Image]:
    """Decode a request's images one by one, naming the offending one in errors; ``handoff`` also accepts the stages'
    hand-off format (:func:`~trellisbox._domain.imaging.decode_image`)."""
    for label, image in _numbered(images, max_count, field):
        yield decode_image(image.data, image.media_type, limits, label=label, handoff=handoff)


def decode_images(images: Sequence[common_pb2.Image], limits: ImageLimits, max_count: int, *,
                  handoff: bool = False, field: str = "images") -> list[Image.Image]:
    """Every image of a request, decoded."""
    return list(decoded_images(images, limits, max_count, handoff=handoff, field=field))


def check_images(images: Sequence[common_pb2.Image], limits: ImageLimits, max_count: int) -> None:
    """Check a request's images without decoding them (:func:`~trellisbox._domain.imaging.check_image`), naming the
    offending one in errors."""
    for label, image in _numbered(images, max_count, "images"):
        check_image(image.data, image.media_type, limits, label=label)
