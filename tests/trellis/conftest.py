"""Fixtures of the TRELLIS service tests."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.trellis.trellis_standin import purge_modules, write_fake_torch, write_model_folder

_KNOBS = ("ATTN_BACKEND", "SPARSE_ATTN_BACKEND", "SPARSE_BACKEND", "SPCONV_ALGO", "HF_HUB_OFFLINE")


@pytest.fixture
def clean_trellis_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No TRELLIS env knobs set; whatever a test (or the adapter) sets is undone afterwards."""
    for key in _KNOBS:
        monkeypatch.delenv(key, raising=False)
    purge_modules()
    yield monkeypatch
    purge_modules()
    for key in _KNOBS:  # the adapter writes os.environ directly
        os.environ.pop(key, None)


@pytest.fixture
def standin_root(tmp_path: Path, clean_trellis_env: pytest.MonkeyPatch) -> Path:
    """An empty folder on sys.path for the generated stand-in (removed from sys.path afterwards)."""
    root = tmp_path / "site"
    root.mkdir()
    clean_trellis_env.syspath_prepend(str(root))
    return root


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_folder(tmp_path / "TRELLIS-image-large")


@pytest.fixture
def torch_home(tmp_path: Path, clean_trellis_env: pytest.MonkeyPatch) -> Path:
    """A TORCH_HOME with DINOv2 in place, and a U2NET_HOME with u2net.onnx."""
    home = tmp_path / "torch"
    (home / "hub" / "facebookresearch_dinov2_main").mkdir(parents=True)
    (home / "hub" / "checkpoints").mkdir()
    (home / "hub" / "checkpoints" / "dinov2_vitl14_reg4_pretrain.pth").write_bytes(b"")
    u2net = tmp_path / "u2net"
    u2net.mkdir()
    (u2net / "u2net.onnx").write_bytes(b"")
    clean_trellis_env.setenv("TORCH_HOME", str(home))
    clean_trellis_env.setenv("U2NET_HOME", str(u2net))
    return home


@pytest.fixture
def fake_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Installs a fake CUDA torch (:func:`write_fake_torch`, same arguments) as ``sys.modules['torch']`` for this
    test, and returns its folder for a subprocess's PYTHONPATH. The real torch is back afterwards."""

    def install(**kwargs: Any) -> Path:
        root = write_fake_torch(tmp_path / "fake-torch", **kwargs)
        spec = importlib.util.spec_from_file_location("torch", root / "torch" / "__init__.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setitem(sys.modules, "torch", module)
        return root

    return install
