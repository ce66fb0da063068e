"""Device selection for the model services. Imports torch lazily: the gateway never loads it."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)\Z")


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
    torch = _loaded_cuda_torch(device)
    if torch is None:
        return None
    return int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device))


def _loaded_cuda_torch(device: str) -> Any:
    """torch, when ``device`` is a CUDA device, torch is already imported and CUDA is available; else None."""
    if not device.startswith("cuda"):
        return None
    torch = sys.modules.get("torch")  # never import torch just to report memory
    if torch is None or not torch.cuda.is_available():
        return None
    return torch


class GpuMemoryCollector(Collector):
    """GPU memory of one model service's CUDA device, read from torch at each scrape (nothing on the CPU, or while
    torch is not imported):

    - ``trellisbox_gpu_memory_allocated_bytes``: tensors this process holds now;
    - ``trellisbox_gpu_memory_reserved_bytes``: what torch's caching allocator holds (what the process takes);
    - ``trellisbox_gpu_memory_peak_allocated_bytes``: the most it allocated since it started;
    - ``trellisbox_gpu_memory_free_bytes`` and ``trellisbox_gpu_memory_total_bytes``: the whole device, all processes
      (the driver's view): alert on free memory running low before a load or a large job fails with OOM.
    """

    def __init__(self, service: str, device: str) -> None:
        self._labels = [service, device]
        self._device = device

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # registering must not touch CUDA; collect() runs at scrape time only

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = _loaded_cuda_torch(self._device)
        if torch is None:
            return
        free, total = torch.cuda.mem_get_info(self._device)
        values = {
            "allocated": ("Bytes of CUDA memory held by tensors.", torch.cuda.memory_allocated(self._device)),
            "reserved": ("Bytes of CUDA memory reserved by the caching allocator.",
                         torch.cuda.memory_reserved(self._device)),
            "peak_allocated": ("Most bytes of CUDA memory held by tensors since the start.",
                               torch.cuda.max_memory_allocated(self._device)),
            "free": ("Free bytes on the device (all processes).", free),
            "total": ("Total bytes on the device.", total),
        }
        for name, (documentation, value) in values.items():
            family = GaugeMetricFamily(f"trellisbox_gpu_memory_{name}_bytes", documentation,
                                       labels=["service", "device"])
            family.add_metric(self._labels, float(value))
            yield family
