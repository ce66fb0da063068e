"""GPU memory on /metrics: read from torch at scrape time on CUDA, absent on the CPU.

The machines that run this suite have no GPU: the collector is driven by a stand-in for ``torch`` with the
calls it makes (``torch.cuda.memory_allocated`` and friends), and the test against a real GPU is skipped
unless one is visible.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from trellisbox._runtime.devices import GpuMemoryCollector, cuda_available
from trellisbox._runtime.lease import LeaseSettings
from trellisbox._runtime.model import ModelHost

MiB = 2**20


def _fake_torch(allocated: int) -> SimpleNamespace:
    asked: list[str] = []

    def reading(value: int):  # type: ignore[no-untyped-def]
        def read(device: str) -> int:
            asked.append(device)
            return value
        return read

    cuda = SimpleNamespace(
        is_available=lambda: True, memory_allocated=reading(allocated), memory_reserved=reading(2 * allocated),
        max_memory_allocated=reading(3 * allocated), mem_get_info=lambda device: (40_000 * MiB, 80_000 * MiB))
    return SimpleNamespace(cuda=cuda, asked=asked)


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    torch = _fake_torch(512 * MiB)
    monkeypatch.setitem(sys.modules, "torch", torch)
    return torch


def _scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_the_collector_reads_the_device_at_each_scrape(fake_torch: SimpleNamespace) -> None:
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector("refiner", "cuda:1"))
    assert fake_torch.asked == []  # registering does not touch CUDA
    labels = {"service": "refiner", "device": "cuda:1"}

    def sample(name: str) -> float | None:
        return registry.get_sample_value(f"trellisbox_gpu_memory_{name}_bytes", labels)

    assert sample("allocated") == 512 * MiB
    assert sample("reserved") == 1024 * MiB
    assert sample("peak_allocated") == 1536 * MiB
    assert (sample("free"), sample("total")) == (40_000 * MiB, 80_000 * MiB)
    assert set(fake_torch.asked) == {"cuda:1"}
    fake_torch.cuda.memory_allocated = lambda device: 7
    assert sample("allocated") == 7  # read at each scrape, not a snapshot
    assert 'trellisbox_gpu_memory_allocated_bytes{device="cuda:1",service="refiner"} 7.0' in _scrape(registry)


def test_nothing_is_reported_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector("refiner", "cpu"))
    assert "trellisbox_gpu_memory" not in _scrape(registry)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # never imported just to report memory
    cuda_registry = CollectorRegistry()
    cuda_registry.register(GpuMemoryCollector("refiner", "cuda:0"))
    assert "trellisbox_gpu_memory" not in _scrape(cuda_registry)
    assert "torch" not in sys.modules


@pytest.fixture
def clean_registry() -> Iterator[None]:
    before = set(REGISTRY._collector_to_names)  # type: ignore[attr-defined]
    yield
    for collector in set(REGISTRY._collector_to_names) - before:  # type: ignore[attr-defined]
        REGISTRY.unregister(collector)


@pytest.mark.usefixtures("clean_registry")
def test_a_model_host_on_cuda_exports_its_gpu_memory(fake_torch: SimpleNamespace) -> None:
    host: ModelHost[object] = ModelHost("gpu-memory-test", 1, LeaseSettings())  # type: ignore[type-var]
    try:
        labels = {"service": "gpu-memory-test", "device": "cuda:0"}
        host._publish_placement("cpu")
        assert REGISTRY.get_sample_value("trellisbox_gpu_memory_allocated_bytes", labels) is None
        host._publish_placement("cuda:0")
        host._publish_placement("cuda:0")  # registered once (a second registration would raise)
        assert REGISTRY.get_sample_value("trellisbox_gpu_memory_allocated_bytes", labels) == 512 * MiB
    finally:
        host.worker.shutdown()


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU (none visible here)")
def test_real_cuda_memory_follows_an_allocation() -> None:  # pragma: no cover - GPU machines only
    import torch

    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector("gpu-test", "cuda:0"))

    def allocated() -> float:
        value = registry.get_sample_value("trellisbox_gpu_memory_allocated_bytes",
                                          {"service": "gpu-test", "device": "cuda:0"})
        assert value is not None
        return value

    before = allocated()
    block = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda:0")
    assert allocated() >= before + 64 * MiB
    del block
