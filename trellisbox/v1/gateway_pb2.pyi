from trellisbox.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("images", "refine", "refine_parameters", "generation", "formats", "request_id")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REFINE_FIELD_NUMBER: _ClassVar[int]
    REFINE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    refine: bool
    refine_parameters: _common_pb2.RefineParameters
    generation: _common_pb2.GenerationParameters
    formats: _containers.RepeatedScalarFieldContainer[_common_pb2.ArtifactKind]
    request_id: str
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., refine: _Optional[bool] = ..., refine_parameters: _Optional[_Union[_common_pb2.RefineParameters, _Mapping]] = ..., generation: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ..., formats: _Optional[_Iterable[_Union[_common_pb2.ArtifactKind, str]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("progress", "chunk", "done")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    chunk: _common_pb2.ArtifactChunk
    done: GenerateDone
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.ArtifactChunk, _Mapping]] = ..., done: _Optional[_Union[GenerateDone, _Mapping]] = ...) -> None: ...

class GenerateDone(_message.Message):
    __slots__ = ("request_id", "timings", "refine_seeds", "generation_seed", "refiner_backend", "generator_backend", "notes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REFINE_SEEDS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_SEED_FIELD_NUMBER: _ClassVar[int]
    REFINER_BACKEND_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_BACKEND_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.StageTiming]
    refine_seeds: _containers.RepeatedScalarFieldContainer[int]
    generation_seed: int
    refiner_backend: str
    generator_backend: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.StageTiming, _Mapping]]] = ..., refine_seeds: _Optional[_Iterable[int]] = ..., generation_seed: _Optional[int] = ..., refiner_backend: _Optional[str] = ..., generator_backend: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...
