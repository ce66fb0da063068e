"""Refiner backends, chosen by configuration: ``sdxl`` (diffusers) and ``classic`` (CPU, no weights);
``fixed-latency`` is for load tests only (see its module).

``auto`` picks ``sdxl`` only when a CUDA GPU is usable and the weights are already on local disk, so it
never starts a multi-GB download nor runs SDXL on a CPU; otherwise ``classic``. The choice and the
reason are logged as a WARNING because the two produce very different images.
"""

from __future__ import annotations

import logging
from pathlib import Path

from refiner_service.backends.base import RefinerBackend, seeds_for
from refiner_service.config import DEFAULT_MODEL, RefinerBackendConfig
from refiner_service.tiny import TINY_MODEL
from trellisbox._runtime.devices import cuda_available, validate_device

__all__ = ["RefinerBackend", "create_backend", "resolve_backend", "seeds_for", "weights_available"]

_log = logging.getLogger(__name__)
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _has_weights(folder: Path) -> bool:
    unet = folder / "unet"
    return unet.is_dir() and any(p.name.endswith(_WEIGHT_SUFFIXES) for p in unet.iterdir())


def weights_available(model: str) -> tuple[bool, str]:
    """Whether ``model`` can be loaded without the network, and why (or why not).

    A local folder needs ``model_index.json``; a hub id must already be in the Hugging Face cache with
    UNet weights (checked with ``local_files_only``: no network access).
    """
    if model == TINY_MODEL:
        return True, "the tiny random-weight test model is built locally"
    path = Path(model).expanduser()
    if path.exists():
        if (path / "model_index.json").is_file():
            return True, f"local folder {path}"
        return False, f"{path} has no model_index.json"
    from huggingface_hub import snapshot_download

    try:
        # local_files_only: reads the local cache and downloads nothing, so there is no revision to pin.
        cached = snapshot_download(model, local_files_only=True)  # nosec B615
        folder = Path(cached)
    except (OSError, ValueError) as exc:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return False, f"{model} is not in the Hugging Face cache ({type(exc).__name__})"
    if (folder / "model_index.json").is_file() and _has_weights(folder):
        return True, f"{model} found in the Hugging Face cache"
    return False, f"{model} is only partly in the Hugging Face cache (no UNet weights)"


def resolve_backend(backend: str, model: str = DEFAULT_MODEL, device: str = "auto") -> tuple[str, str]:
    """The concrete backend for ``backend`` (``auto`` resolved) and the reason for the choice."""
    validate_device(device)
    if backend != "auto":
        return backend, "configured explicitly"
    if device == "cpu":
        return "classic", "device is cpu (SDXL on a CPU takes minutes per image)"
    if not cuda_available():
        return "classic", "no CUDA GPU is visible"
    ok, why = weights_available(model)
    if not ok:
        return "classic", f"{why}; download it or pass --backend sdxl to fail loudly instead"
    return "sdxl", f"a CUDA GPU is visible and {why}"


def create_backend(config: RefinerBackendConfig, *, show_progress_bars: bool = True) -> RefinerBackend:
    """Build (not load) the backend ``config`` names; ``auto`` is resolved and logged loudly.

    Args:
        config: Backend, model, device and how to load it.
        show_progress_bars: diffusers' loading and denoising bars (for a terminal; a service's log turns them off).
    """
    name, reason = resolve_backend(config.backend, config.model, config.device)
    if name == "sdxl":
        from refiner_service.backends.sdxl import SDXLBackend

        _log.warning("refiner backend: sdxl (model %s, device %s): %s", config.model, config.device, reason)
        return SDXLBackend(config.model, config.device, use_fp16=config.use_fp16,
                           attention_slicing=config.attention_slicing, cpu_offload=config.cpu_offload,
                           show_progress_bars=show_progress_bars)
    if name == "classic":
        from refiner_service.backends.classic import ClassicBackend

        _log.warning("refiner backend: classic (CPU restoration, no diffusion model): %s", reason)
        return ClassicBackend()
    if name == "fixed-latency":
        from refiner_service.backends.fixed_latency import FixedLatencyBackend

        _log.warning("refiner backend: fixed-latency (%g ms per image, returns its input; load testing only)",
                     config.fixed_latency_ms)
        return FixedLatencyBackend(config.fixed_latency_ms)
    raise ValueError(f"unknown refiner backend {config.backend!r}: use auto, sdxl, classic or fixed-latency")
