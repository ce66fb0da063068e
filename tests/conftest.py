"""Suite-wide settings: no test may reach a model hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Gateways the tests start keep durable results in a directory of this run, never in the user's cache.
if "TRELLISBOX_GATEWAY_RESULTS_DIR" not in os.environ:
    import tempfile

    os.environ["TRELLISBOX_GATEWAY_RESULTS_DIR"] = tempfile.mkdtemp(prefix="trellisbox-test-results-")
