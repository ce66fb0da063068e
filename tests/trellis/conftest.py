"""Fixtures of the TRELLIS service tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.trellis.trellis_standin import purge_modules

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
