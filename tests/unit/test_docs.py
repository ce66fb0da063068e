"""Docs that are generated from code must match it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("tool", "page"), [("configdoc.py", "configuration.md"), ("paramdoc.py", "parameters.md")])
def test_generated_references_match_the_code(tool: str, page: str) -> None:
    rendered = subprocess.run([sys.executable, str(ROOT / "tools" / tool)], capture_output=True,
                              text=True, check=True, timeout=120).stdout
    assert rendered == (ROOT / "docs" / page).read_text(), f"docs/{page} is stale: python tools/{tool} > docs/{page}"


def test_readme_opens_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


def test_the_reliability_report_renders_every_recorded_scenario() -> None:
    from tools.reliability_report import render

    report = {"when": "now", "machine": "here", "passed": True, "facts": {
        "burst 3D only": {"sent": 60, "capacity": 6, "completed": 6, "refused": 54, "lost": 0,
                          "gateway_peak_rss_mib": 75},
        "fuzz": {"cases": 240, "statuses": {"INVALID_ARGUMENT": 226, "OK": 14}, "undocumented": 0},
        "large and slow uploads": {"sent": 20, "upload_mib": 18, "max_held_mib": 128, "outcomes": {
            "valid": {"OK": 6}, "not an image": {"INVALID_ARGUMENT": 6}}, "gateway_idle_rss_mib": 90,
            "gateway_peak_rss_mib": 300, "ceiling_mib": 410, "seconds": 9.5},
    }}
    page = render(report)
    assert "| burst 3D only | 60 requests at once" in page and "INVALID_ARGUMENT 226, OK 14" in page
    assert "valid: 6 OK; not an image: 6 INVALID_ARGUMENT" in page and "peak 300 MiB (ceiling 410 MiB)" in page
    assert "Requests lost in all: 0." in page and "## The gateway's memory ceiling" in page
