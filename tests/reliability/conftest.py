"""Reliability scenarios record what they measured; ``make reliability`` turns that into docs/reliability.md.

With ``TRELLISBOX_RELIABILITY_OUT=<file>`` set, the facts each scenario recorded through the ``record`` fixture
are written there as JSON when the session ends (``tools/reliability_report.py`` renders them).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

FACTS: dict[str, Any] = {}


@pytest.fixture(scope="session")
def record() -> Callable[[str, Any], None]:
    """``record(name, value)``: keep a measured fact for the reliability report."""
    return FACTS.__setitem__


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get("TRELLISBOX_RELIABILITY_OUT")
    if not out or not FACTS:
        return
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} cores, "
              f"{platform.machine()}, Python {platform.python_version()}", "passed": exitstatus == 0, "facts": FACTS}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")
