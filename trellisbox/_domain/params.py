"""Request parameters as validated domain types, with the seed's and TRELLIS's defaults.

The gateway validates with these before any model runs; the model services validate again with the
same code, so a direct caller of a model service gets the same messages.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from trellisbox._domain.errors import InvalidInput

DEFAULT_PROMPT = "high quality, detailed, sharp"
DEFAULT_NEGATIVE_PROMPT = "blurry, low quality, distorted"
MAX_SEED = 2**32 - 1  # torch.Generator.manual_seed and numpy accept 32-bit seeds everywhere
MAX_PROMPT_CHARS = 2000


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise InvalidInput(f"{name} must be in {bracket}{low}, {high}], got {value}")


def _check_seed(name: str, seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InvalidInput(f"{name} must be in [0, {MAX_SEED}], got {seed}")


@dataclass(frozen=True)
class RefineParams:
    """SDXL-refiner img2img parameters (defaults from the seed feature).

    Args:
        strength: How far the image may move, (0, 1]. Lower is more faithful.
        guidance_scale: Classifier-free guidance, [0, 30].
        num_inference_steps: Scheduler steps, [1, 200]; UNet runs int(steps × strength) of them.
        prompt: What the refined image should look like.
        negative_prompt: What it should not look like.
        seed: Seed of the first image (image i uses seed + i); random when None.
        aesthetic_score: SDXL-refiner aesthetic conditioning of the positive branch.
        negative_aesthetic_score: Aesthetic conditioning of the negative branch.
    """

    strength: float = 0.3
    guidance_scale: float = 7.5
    num_inference_steps: int = 20
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def validate(self) -> RefineParams:
        _check_range("strength", self.strength, 0.0, 1.0, low_open=True)
        _check_range("guidance_scale", self.guidance_scale, 0.0, 30.0)
        _check_range("num_inference_steps", self.num_inference_steps, 1, 200)
        _check_range("aesthetic_score", self.aesthetic_score, 0.0, 10.0)
        _check_range("negative_aesthetic_score", self.negative_aesthetic_score, 0.0, 10.0)
        _check_seed("refine seed", self.seed)
        for name, text in (("prompt", self.prompt), ("negative_prompt", self.negative_prompt)):
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidInput(f"{name} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
        return self


class MultiImageMode(StrEnum):
    STOCHASTIC = "stochastic"
    MULTIDIFFUSION = "multidiffusion"


@dataclass(frozen=True)
class SamplerParams:
    """One TRELLIS sampler stage.

    Args:
        steps: Sampling steps, [1, 100].
        cfg_strength: Classifier-free guidance strength, [0, 30].
    """

    steps: int
    cfg_strength: float

    def validate(self, stage: str) -> SamplerParams:
        _check_range(f"{stage}.steps", self.steps, 1, 100)
        _check_range(f"{stage}.cfg_strength", self.cfg_strength, 0.0, 30.0)
        return self


@dataclass(frozen=True)
class GenerationParams:
    """Image-to-3D parameters (defaults from the official TRELLIS demo).

    Args:
        seed: Generation seed; random when None.
        sparse_structure: Stage-1 sampler (12 steps, cfg 7.5).
        slat: Stage-2 sampler (12 steps, cfg 3.0).
        multi_image_mode: How several views are combined.
        mesh_simplify: Fraction of faces removed before the texture bake, [0, 0.99].
        texture_size: Baked texture edge in pixels, [256, 4096].
    """

    seed: int | None = None
    sparse_structure: SamplerParams = field(default_factory=lambda: SamplerParams(12, 7.5))
    slat: SamplerParams = field(default_factory=lambda: SamplerParams(12, 3.0))
    multi_image_mode: MultiImageMode = MultiImageMode.STOCHASTIC
    mesh_simplify: float = 0.95
    texture_size: int = 1024

    def validate(self) -> GenerationParams:
        _check_seed("generation seed", self.seed)
        self.sparse_structure.validate("sparse_structure")
        self.slat.validate("slat")
        _check_range("mesh_simplify", self.mesh_simplify, 0.0, 0.99)
        _check_range("texture_size", self.texture_size, 256, 4096)
        return self
