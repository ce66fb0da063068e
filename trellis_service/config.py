"""TRELLIS service settings: flags ``--backend preview``, env ``TRELLISBOX_TRELLIS_BACKEND=preview``.

:class:`TrellisBackendConfig` is the part the backends see (which model, where, how TRELLIS is set up);
:class:`TrellisSettings` adds the server's and the GPU placement's settings.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from trellisbox._runtime.devices import validate_device
from trellisbox._runtime.lease import Residency
from trellisbox._runtime.model import ModelSettings

BackendName = Literal["auto", "trellis", "preview"]
_TRUTHY = {"1", "true", "yes", "on"}


class TrellisBackendConfig(BaseModel):
    """What the image-to-3D backends are built from."""

    backend: BackendName = Field(
        "auto",
        description="trellis: upstream TRELLIS on CUDA; preview: CPU silhouette inflation, no weights; "
        "auto: trellis when a GPU, the trellis package and the weights are present, else preview.",
    )
    model: str = Field(
        "microsoft/TRELLIS-image-large",
        description="Hugging Face model id (resolved from the local cache) or a local folder holding "
        "pipeline.json and ckpts/.",
    )
    device: str = Field("auto", description="auto, cuda or cuda:N (TRELLIS has no CPU path).")
    offline: bool = Field(
        False,
        description="Never download weights (sets HF_HUB_OFFLINE=1); missing weights fail the preflight. "
        "Also on when HF_HUB_OFFLINE is set in the environment.",
    )
    # Read by TRELLIS at import time; applied to os.environ before the lazy import. None: leave as is.
    attn_backend: Literal["flash_attn", "xformers", "sdpa", "naive"] | None = Field(
        None, description="ATTN_BACKEND for dense attention (upstream default flash_attn)."
    )
    sparse_attn_backend: Literal["flash_attn", "xformers"] | None = Field(
        None, description="SPARSE_ATTN_BACKEND (upstream default flash_attn)."
    )
    sparse_backend: Literal["spconv", "torchsparse"] | None = Field(
        None, description="SPARSE_BACKEND (upstream default spconv)."
    )
    spconv_algo: Literal["auto", "implicit_gemm", "native"] | None = Field(
        None, description="SPCONV_ALGO (upstream default auto: benchmarks on first use, which warm-up covers)."
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return validate_device(value)

    @model_validator(mode="after")
    def _offline_from_environment(self) -> TrellisBackendConfig:
        # The one place HF_HUB_OFFLINE is read: the hub library honours it anyway, so the preflight must too.
        if not self.offline and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY:
            self.offline = True
        return self

    def trellis_environment(self) -> dict[str, str]:
        """The environment variables TRELLIS reads at import time, as configured here."""
        env = {
            "ATTN_BACKEND": self.attn_backend,
            "SPARSE_ATTN_BACKEND": self.sparse_attn_backend,
            "SPARSE_BACKEND": self.sparse_backend,
            "SPCONV_ALGO": self.spconv_algo,
        }
        result: dict[str, str] = {key: str(value) for key, value in env.items() if value is not None}
        if self.offline:
            result["HF_HUB_OFFLINE"] = "1"
        return result


class TrellisSettings(ModelSettings, TrellisBackendConfig):
    """Settings of the TRELLIS service (environment prefix ``TRELLISBOX_TRELLIS_``)."""

    model_config = SettingsConfigDict(env_prefix="TRELLISBOX_TRELLIS_")  # merged with the base config

    port: int = Field(50053, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    residency: Residency = Field(
        "resident",
        description="Where the model waits between GPU turns in shared placement: resident (default here: "
        "TRELLIS is the main tenant and the refiner is offloaded), offload (host RAM), unload (freed).",
    )
