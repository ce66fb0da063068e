"""Protobuf ↔ domain conversions shared by the servicers and the client. Backends never see protobuf."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import Message
from PIL import Image

from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.imaging import ImageLimits, decode_image
from trellisbox._domain.params import GenerationParams, MultiImageMode, RefineParams, SamplerParams
from trellisbox.v1 import common_pb2

_T = TypeVar("_T")

_MULTI_IMAGE_MODES = {
    common_pb2.MULTI_IMAGE_MODE_UNSPECIFIED: MultiImageMode.STOCHASTIC,
    common_pb2.MULTI_IMAGE_MODE_STOCHASTIC: MultiImageMode.STOCHASTIC,
    common_pb2.MULTI_IMAGE_MODE_MULTIDIFFUSION: MultiImageMode.MULTIDIFFUSION,
}


def _given(message: Message, name: str, default: _T) -> _T:
    """The field's value when the caller set it, else ``default`` (proto3 ``optional`` semantics)."""
    return getattr(message, name) if message.HasField(name) else default  # type: ignore[no-any-return]


def refine_params_from_proto(message: common_pb2.RefineParameters) -> RefineParams:
    """Validated refine parameters; unset fields take the seed's defaults."""
    d = RefineParams()
    return RefineParams(
        strength=_given(message, "strength", d.strength),
        guidance_scale=_given(message, "guidance_scale", d.guidance_scale),
        num_inference_steps=_given(message, "num_inference_steps", d.num_inference_steps),
        prompt=_given(message, "prompt", d.prompt),
        negative_prompt=_given(message, "negative_prompt", d.negative_prompt),
        seed=_given(message, "seed", d.seed),
        aesthetic_score=_given(message, "aesthetic_score", d.aesthetic_score),
        negative_aesthetic_score=_given(message, "negative_aesthetic_score", d.negative_aesthetic_score),
    ).validate()


def refine_params_to_proto(params: RefineParams) -> common_pb2.RefineParameters:
    message = common_pb2.RefineParameters(
        strength=params.strength,
        guidance_scale=params.guidance_scale,
        num_inference_steps=params.num_inference_steps,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        aesthetic_score=params.aesthetic_score,
        negative_aesthetic_score=params.negative_aesthetic_score,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message


def _sampler_from_proto(message: common_pb2.SamplerParameters, default: SamplerParams) -> SamplerParams:
    return SamplerParams(
        steps=_given(message, "steps", default.steps),
        cfg_strength=_given(message, "cfg_strength", default.cfg_strength),
    )


def generation_params_from_proto(message: common_pb2.GenerationParameters) -> GenerationParams:
    """Validated generation parameters; unset fields take the TRELLIS demo defaults."""
    defaults = GenerationParams()
    if message.multi_image_mode not in _MULTI_IMAGE_MODES:
        raise InvalidInput(f"multi_image_mode {message.multi_image_mode} is not a known MultiImageMode")
    return GenerationParams(
        seed=_given(message, "seed", defaults.seed),
        sparse_structure=_sampler_from_proto(message.sparse_structure, defaults.sparse_structure),
        slat=_sampler_from_proto(message.slat, defaults.slat),
        multi_image_mode=_MULTI_IMAGE_MODES[message.multi_image_mode],
        mesh_simplify=_given(message, "mesh_simplify", defaults.mesh_simplify),
        texture_size=_given(message, "texture_size", defaults.texture_size),
    ).validate()


def decode_images(images: Sequence[common_pb2.Image], limits: ImageLimits, max_count: int) -> list[Image.Image]:
    """Decode every image of a request, naming the offending one (``images[i]``) in errors."""
    if not images:
        raise InvalidInput("no images: send at least one PNG, JPEG or WebP image")
    if len(images) > max_count:
        raise InvalidInput(f"{len(images)} images sent; at most {max_count} per request")
    return [
        decode_image(image.data, image.media_type, limits, label=f"images[{i}]")
        for i, image in enumerate(images)
    ]


_MULTI_IMAGE_MODE_PROTO = {
    MultiImageMode.STOCHASTIC: common_pb2.MULTI_IMAGE_MODE_STOCHASTIC,
    MultiImageMode.MULTIDIFFUSION: common_pb2.MULTI_IMAGE_MODE_MULTIDIFFUSION,
}


def generation_params_to_proto(params: GenerationParams) -> common_pb2.GenerationParameters:
    message = common_pb2.GenerationParameters(
        sparse_structure=common_pb2.SamplerParameters(
            steps=params.sparse_structure.steps, cfg_strength=params.sparse_structure.cfg_strength
        ),
        slat=common_pb2.SamplerParameters(steps=params.slat.steps, cfg_strength=params.slat.cfg_strength),
        multi_image_mode=_MULTI_IMAGE_MODE_PROTO[params.multi_image_mode],
        mesh_simplify=params.mesh_simplify,
        texture_size=params.texture_size,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message
