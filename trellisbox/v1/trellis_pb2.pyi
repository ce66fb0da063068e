from trellisbox.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageTo3DRequest(_message.Message):
    __slots__ = ("request_id", "images", "parameters", "formats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    parameters: _common_pb2.GenerationParameters
    formats: _containers.RepeatedScalarFieldContainer[_common_pb2.ArtifactKind]
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ..., formats: _Optional[_Iterable[_Union[_common_pb2.ArtifactKind, str]]] = ...) -> None: ...

class ImageTo3DResponse(_message.Message):
    __slots__ = ("progress", "chunk", "done")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    chunk: _common_pb2.ArtifactChunk
    done: ImageTo3DDone
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.ArtifactChunk, _Mapping]] = ..., done: _Optional[_Union[ImageTo3DDone, _Mapping]] = ...) -> None: ...

class ImageTo3DDone(_message.Message):
    __slots__ = ("seed", "timings", "backend", "device", "notes")
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    seed: int
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.StageTiming]
    backend: str
    device: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seed: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.StageTiming, _Mapping]]] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...
