"""Suite-wide settings: no test may reach a model hub; each test starts outside any request's log context; a
terminated run still stops the service processes its tests started."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

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


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


# SIGTERM (`timeout`, a CI runner giving up) would end the run at once, past every fixture's teardown, and leave the
# services the tests started (each in a session of its own, so the signal does not reach them) running and holding
# their ports. As an interrupt, pytest stops the run and tears the fixtures down, which stops them.
if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _interrupt)
