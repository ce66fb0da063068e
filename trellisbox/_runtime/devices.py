"""Device selection for the model services. Imports torch lazily: the gateway never loads it."""

from __future__ import annotations

import re

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def validate_device(spec: str) -> str:
    """Check a configured device string: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not _DEVICE.match(spec):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_device(spec: str) -> str:
    """The concrete device for ``spec``: ``auto`` becomes ``cuda:0`` when a GPU is visible, else ``cpu``.

    Raises:
        ValueError: a CUDA device was asked for but none (or not that index) is visible.
    """
    validate_device(spec)
    if spec == "auto":
        return "cuda:0" if cuda_available() else "cpu"
    if spec.startswith("cuda"):
        if not cuda_available():
            raise ValueError(f"device {spec} was configured but no CUDA device is visible")
        import torch

        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec} was configured but only {torch.cuda.device_count()} GPU(s) are visible")
        return f"cuda:{index}"
    return spec


def gpu_memory_bytes(device: str) -> tuple[int, int] | None:
    """(allocated, reserved) bytes on a CUDA ``device``; None on the CPU or when torch is not loaded."""
    if not device.startswith("cuda"):
        return None
    import sys

    torch = sys.modules.get("torch")  # never import torch just to report memory
    if torch is None or not torch.cuda.is_available():
        return None
    return int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device))
