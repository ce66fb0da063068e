"""Fixtures for the GPU lease tests: a fake API server and record files."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers import as plain modules

from tests.lease.fake_apiserver import FakeApiServer


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def record_path(tmp_path: Path) -> Path:
    return tmp_path / "lease.jsonl"
