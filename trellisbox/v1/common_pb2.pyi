from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_QUEUED: _ClassVar[Stage]
    STAGE_REFINE: _ClassVar[Stage]
    STAGE_PREPROCESS: _ClassVar[Stage]
    STAGE_SPARSE_STRUCTURE: _ClassVar[Stage]
    STAGE_SLAT: _ClassVar[Stage]
    STAGE_EXPORT: _ClassVar[Stage]

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_GLB: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_GAUSSIAN_PLY: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_REFINED_IMAGE: _ClassVar[ArtifactKind]

class MultiImageMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MULTI_IMAGE_MODE_UNSPECIFIED: _ClassVar[MultiImageMode]
    MULTI_IMAGE_MODE_STOCHASTIC: _ClassVar[MultiImageMode]
    MULTI_IMAGE_MODE_MULTIDIFFUSION: _ClassVar[MultiImageMode]
STAGE_UNSPECIFIED: Stage
STAGE_QUEUED: Stage
STAGE_REFINE: Stage
STAGE_PREPROCESS: Stage
STAGE_SPARSE_STRUCTURE: Stage
STAGE_SLAT: Stage
STAGE_EXPORT: Stage
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_GLB: ArtifactKind
ARTIFACT_KIND_GAUSSIAN_PLY: ArtifactKind
ARTIFACT_KIND_REFINED_IMAGE: ArtifactKind
MULTI_IMAGE_MODE_UNSPECIFIED: MultiImageMode
MULTI_IMAGE_MODE_STOCHASTIC: MultiImageMode
MULTI_IMAGE_MODE_MULTIDIFFUSION: MultiImageMode

class Image(_message.Message):
    __slots__ = ("data", "media_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    media_type: str
    def __init__(self, data: _Optional[bytes] = ..., media_type: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "step", "total", "message")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    step: int
    total: int
    message: str
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("kind", "media_type", "index", "total_bytes", "offset", "data", "sha256")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    kind: ArtifactKind
    media_type: str
    index: int
    total_bytes: int
    offset: int
    data: bytes
    sha256: str
    def __init__(self, kind: _Optional[_Union[ArtifactKind, str]] = ..., media_type: _Optional[str] = ..., index: _Optional[int] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    seconds: float
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class RefineParameters(_message.Message):
    __slots__ = ("strength", "guidance_scale", "num_inference_steps", "prompt", "negative_prompt", "seed", "aesthetic_score", "negative_aesthetic_score")
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    AESTHETIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_AESTHETIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    strength: float
    guidance_scale: float
    num_inference_steps: int
    prompt: str
    negative_prompt: str
    seed: int
    aesthetic_score: float
    negative_aesthetic_score: float
    def __init__(self, strength: _Optional[float] = ..., guidance_scale: _Optional[float] = ..., num_inference_steps: _Optional[int] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., seed: _Optional[int] = ..., aesthetic_score: _Optional[float] = ..., negative_aesthetic_score: _Optional[float] = ...) -> None: ...

class SamplerParameters(_message.Message):
    __slots__ = ("steps", "cfg_strength")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CFG_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    steps: int
    cfg_strength: float
    def __init__(self, steps: _Optional[int] = ..., cfg_strength: _Optional[float] = ...) -> None: ...

class GenerationParameters(_message.Message):
    __slots__ = ("seed", "sparse_structure", "slat", "multi_image_mode", "mesh_simplify", "texture_size")
    SEED_FIELD_NUMBER: _ClassVar[int]
    SPARSE_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SLAT_FIELD_NUMBER: _ClassVar[int]
    MULTI_IMAGE_MODE_FIELD_NUMBER: _ClassVar[int]
    MESH_SIMPLIFY_FIELD_NUMBER: _ClassVar[int]
    TEXTURE_SIZE_FIELD_NUMBER: _ClassVar[int]
    seed: int
    sparse_structure: SamplerParameters
    slat: SamplerParameters
    multi_image_mode: MultiImageMode
    mesh_simplify: float
    texture_size: int
    def __init__(self, seed: _Optional[int] = ..., sparse_structure: _Optional[_Union[SamplerParameters, _Mapping]] = ..., slat: _Optional[_Union[SamplerParameters, _Mapping]] = ..., multi_image_mode: _Optional[_Union[MultiImageMode, str]] = ..., mesh_simplify: _Optional[float] = ..., texture_size: _Optional[int] = ...) -> None: ...
