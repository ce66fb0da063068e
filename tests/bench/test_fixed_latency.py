"""The ``fixed-latency`` refiner backend the scaling benchmark runs (no timing assertions)."""

from __future__ import annotations

import pytest
from PIL import Image

from refiner_service.backends import create_backend
from refiner_service.backends.fixed_latency import FixedLatencyBackend
from refiner_service.config import RefinerBackendConfig, RefinerSettings
from trellisbox._domain.errors import Cancelled
from trellisbox._domain.params import RefineParams
from trellisbox._runtime.config import load_settings
from trellisbox._runtime.worker import JobContext, ProgressEvent


def test_returns_its_input_with_progress_like_the_sdxl_backend() -> None:
    events: list[ProgressEvent] = []
    backend = FixedLatencyBackend(latency_ms=6)
    images = [Image.new("RGBA", (16, 8), (1, 2, 3, 4)), Image.new("RGB", (8, 8))]
    out = backend.refine(images, RefineParams(strength=0.3, num_inference_steps=20), [1, 2],
                         JobContext("t", None, events.append))
    assert out == images and [o.mode for o in out] == ["RGBA", "RGB"]
    assert [(e.step, e.total, e.message) for e in events] == (
        [(s, 6, "image 1/2") for s in range(1, 7)] + [(s, 6, "image 2/2") for s in range(1, 7)]
    )
    assert backend.loaded and backend.device == "none"


def test_a_cancelled_job_stops_before_the_next_slice() -> None:
    ctx = JobContext("t", None, lambda _event: None)
    ctx.cancel()
    with pytest.raises(Cancelled):
        FixedLatencyBackend(1000).refine([Image.new("RGB", (8, 8))], RefineParams(), [0], ctx)


def test_created_by_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = create_backend(RefinerBackendConfig(backend="fixed-latency", fixed_latency_ms=5))
    assert isinstance(backend, FixedLatencyBackend) and backend.latency_ms == 5
    # The setting's environment variable is read by the settings class, like every other setting.
    monkeypatch.setenv("TRELLISBOX_REFINER_FIXED_LATENCY_MS", "75")
    backend = create_backend(load_settings(RefinerSettings, ["--backend", "fixed-latency"]))
    assert isinstance(backend, FixedLatencyBackend) and backend.latency_ms == 75
    with pytest.raises(ValueError):
        FixedLatencyBackend(-1)
