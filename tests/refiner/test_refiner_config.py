"""Refiner settings and the backend choice (``auto``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from refiner_service import backends
from refiner_service.backends import create_backend, resolve_backend, weights_available
from refiner_service.config import DEFAULT_MODEL, RefinerBackendConfig, RefinerSettings
from trellisbox._runtime.config import load_settings


def test_defaults() -> None:
    s = load_settings(RefinerSettings, [])
    assert (s.port, s.backend, s.model, s.device) == (50052, "auto", DEFAULT_MODEL, "auto")
    assert (s.use_fp16, s.attention_slicing, s.cpu_offload) == (True, True, True)
    assert s.max_queue == 16  # the shared fields are still there
    for name in ("backend", "model", "device", "use_fp16", "attention_slicing", "cpu_offload"):
        assert RefinerSettings.model_fields[name].description


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRELLISBOX_REFINER_MODEL", "tiny")
    monkeypatch.setenv("TRELLISBOX_REFINER_DEVICE", "cuda:1")
    s = load_settings(RefinerSettings, ["--backend", "classic", "--no-use-fp16", "--no-cpu-offload", "--port", "7"])
    assert (s.backend, s.model, s.device, s.port) == ("classic", "tiny", "cuda:1", 7)
    assert (s.use_fp16, s.cpu_offload, s.attention_slicing) == (False, False, True)


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="device must be"):
        RefinerSettings(device="gpu")
    with pytest.raises(ValidationError):
        RefinerSettings(backend="magic")  # type: ignore[arg-type]


def test_weights_available(tmp_path: Path) -> None:
    assert weights_available("tiny")[0]
    assert not weights_available(str(tmp_path))[0]  # a folder without model_index.json
    (tmp_path / "model_index.json").write_text("{}")
    assert weights_available(str(tmp_path))[0]
    # HF_HUB_OFFLINE is set for the tests: this looks only at the local cache.
    ok, why = weights_available("nobody/no-such-refiner")
    assert not ok and "cache" in why


def test_auto_without_gpu_is_classic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    assert resolve_backend("auto", "tiny", "auto") == ("classic", "no CUDA GPU is visible")
    assert resolve_backend("auto", "tiny", "cpu")[0] == "classic"
    assert resolve_backend("sdxl", "tiny", "cpu") == ("sdxl", "configured explicitly")


def test_auto_with_gpu_needs_local_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    assert resolve_backend("auto", "tiny", "auto")[0] == "sdxl"
    name, why = resolve_backend("auto", "nobody/no-such-refiner", "cuda")
    assert name == "classic" and "cache" in why
    assert resolve_backend("auto", "nobody/no-such-refiner", "cpu")[0] == "classic"


def test_the_choice_is_logged_loudly(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        backend = create_backend(RefinerBackendConfig())
    assert backend.name == "classic"
    assert any(r.levelno == logging.WARNING and "refiner backend: classic" in r.getMessage()
               and "no CUDA GPU" in r.getMessage() for r in caplog.records)
