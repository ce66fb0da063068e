"""Refiner service settings: flags, ``TRELLISBOX_REFINER_*`` environment variables, then defaults.

:class:`RefinerBackendConfig` is the part the backends see (which model, where, how it is loaded), also what
``ImageRefiner`` builds; :class:`RefinerSettings` adds the server's, the placement's and batching settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import SettingsConfigDict

from trellisbox._runtime.devices import validate_device
from trellisbox._runtime.model import ModelSettings

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-refiner-1.0"

BackendName = Literal["auto", "sdxl", "classic", "fixed-latency"]


class RefinerBackendConfig(BaseModel):
    """What a refiner backend is built from."""

    backend: BackendName = Field(
        "auto",
        description=(
            "sdxl: diffusers SDXL refiner img2img; classic: CPU restoration without weights; "
            "auto: sdxl when a CUDA GPU is visible and the weights are available locally, else classic; "
            "fixed-latency: load testing only, returns the input after --fixed-latency-ms per image."
        ),
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face model id, local diffusers folder, or 'tiny' (random-weight test model).",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    use_fp16: bool = Field(True, description="Load fp16 weights (variant 'fp16') on CUDA; fp32 on CPU.")
    attention_slicing: bool = Field(
        True, description="Compute attention in slices to lower peak VRAM (CUDA only: on a CPU it saves nothing and "
        "would make results differ from plain diffusers by a grey level)."
    )
    cpu_offload: bool = Field(
        True, description="Keep sub-models in host RAM and move each to the GPU only while it runs (CUDA only)."
    )
    fixed_latency_ms: float = Field(
        200.0, ge=0, le=600_000,
        description="fixed-latency backend only: wall time per image, spent sleeping (no CPU, like a GPU-bound model).",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return validate_device(value)


class RefinerSettings(ModelSettings, RefinerBackendConfig):
    """Settings of ``python -m refiner_service``."""

    # Pydantic merges this with the parent's config, so the CLI flags (kebab-case, implicit booleans)
    # stay; spreading the parent's dict here instead would pass env_prefix twice.
    model_config = SettingsConfigDict(env_prefix="TRELLISBOX_REFINER_")

    port: int = Field(50052, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    batch_window_ms: float = Field(
        5.0, ge=0, le=10_000,
        description=(
            "Dynamic batching (sdxl only): while the model is idle, a new request waits this long for compatible "
            "requests (same snapped size, steps, strength, guidance, aesthetic scores) to share its pipeline call; "
            "while it is busy, compatible requests join the next call anyway. 0 turns batching off."
        ),
    )
    max_batch_images: int = Field(
        4, ge=1, le=64,
        description=(
            "Dynamic batching: most images in one pipeline call (a multi-image request counts all its images; "
            "one with more runs alone). 1 turns batching off."
        ),
    )

    @property
    def batching(self) -> bool:
        """Whether dynamic batching is on (the backend must support it too)."""
        return self.batch_window_ms > 0 and self.max_batch_images > 1
