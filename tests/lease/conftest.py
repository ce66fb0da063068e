"""Fixtures for the GPU lease tests: a fake API server and record files."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers import as plain modules

from tests.lease.fake_apiserver import FakeApiServer
from tests.lease.lease_helpers import role_verbs


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    """The fake API server with the namespaces the tests use, granting exactly what the overlay's Role grants."""
    with FakeApiServer(namespaces=("default", "ml", "trellisbox"), verbs=role_verbs()) as server:
        yield server


@pytest.fixture
def record_path(tmp_path: Path) -> Path:
    return tmp_path / "lease.jsonl"
