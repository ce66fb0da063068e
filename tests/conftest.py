"""Suite-wide settings: no test may reach a model hub; each test starts outside any request's log context."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from trellisbox._runtime.observability import REQUEST_ID, STAGE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Gateways the tests start keep durable results in a directory of this run, never in the user's cache.
if "TRELLISBOX_GATEWAY_RESULTS_DIR" not in os.environ:
    import tempfile

    os.environ["TRELLISBOX_GATEWAY_RESULTS_DIR"] = tempfile.mkdtemp(prefix="trellisbox-test-results-")


@pytest.fixture(autouse=True)
def _outside_any_request() -> Iterator[None]:
    """A test that ran a job's code in the main thread (a backend called directly) left that job's request id and
    stage in the main thread's context; log lines of the next test must not carry them."""
    REQUEST_ID.set("-")
    STAGE.set("-")
    yield
