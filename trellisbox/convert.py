"""Protobuf ↔ domain conversions shared by the servicers and the client. Backends never see protobuf."""

from __future__ import annotations

from collections.abc import Sequence

from trellisbox.errors import InvalidInput
from trellisbox.imaging import ImageLimits, decode_image
from trellisbox.params import GenerationParams, MultiImageMode, RefineParams, SamplerParams
from trellisbox.v1 import common_pb2

from PIL import Image

_MULTI_IMAGE_MODES = {
    common_pb2.MULTI_IMAGE_MODE_UNSPECIFIED: MultiImageMode.STOCHASTIC,
    common_pb2.MULTI_IMAGE_MODE_STOCHASTIC: MultiImageMode.STOCHASTIC,
    common_pb2.MULTI_IMAGE_MODE_MULTIDIFFUSION: MultiImageMode.MULTIDIFFUSION,
}


def refine_params_from_proto(message: common_pb2.RefineParameters) -> RefineParams:
    """Validated refine parameters; unset fields take the seed's defaults."""
    defaults = RefineParams()

    def pick(name: str, default: object) -> object:
        return getattr(message, name) if message.HasField(name) else default

    return RefineParams(
        strength=float(pick("strength", defaults.strength)),  # type: ignore[arg-type]
        guidance_scale=float(pick("guidance_scale", defaults.guidance_scale)),  # type: ignore[arg-type]
        num_inference_steps=int(pick("num_inference_steps", defaults.num_inference_steps)),  # type: ignore[call-overload]
        prompt=str(pick("prompt", defaults.prompt)),
        negative_prompt=str(pick("negative_prompt", defaults.negative_prompt)),
        seed=int(message.seed) if message.HasField("seed") else None,
        aesthetic_score=float(pick("aesthetic_score", defaults.aesthetic_score)),  # type: ignore[arg-type]
        negative_aesthetic_score=float(
            pick("negative_aesthetic_score", defaults.negative_aesthetic_score)  # type: ignore[arg-type]
        ),
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
        steps=int(message.steps) if message.HasField("steps") else default.steps,
        cfg_strength=float(message.cfg_strength) if message.HasField("cfg_strength") else default.cfg_strength,
    )


def generation_params_from_proto(message: common_pb2.GenerationParameters) -> GenerationParams:
    """Validated generation parameters; unset fields take the TRELLIS demo defaults."""
    defaults = GenerationParams()
    if message.multi_image_mode not in _MULTI_IMAGE_MODES:
        raise InvalidInput(f"multi_image_mode {message.multi_image_mode} is not a known MultiImageMode")
    return GenerationParams(
        seed=int(message.seed) if message.HasField("seed") else None,
        sparse_structure=_sampler_from_proto(message.sparse_structure, defaults.sparse_structure),
        slat=_sampler_from_proto(message.slat, defaults.slat),
        multi_image_mode=_MULTI_IMAGE_MODES[message.multi_image_mode],
        mesh_simplify=float(message.mesh_simplify) if message.HasField("mesh_simplify") else defaults.mesh_simplify,
        texture_size=int(message.texture_size) if message.HasField("texture_size") else defaults.texture_size,
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
