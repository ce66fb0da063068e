"""Docs that are generated from code must match it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_matches_the_settings_classes() -> None:
    rendered = subprocess.run([sys.executable, str(ROOT / "tools" / "configdoc.py")], capture_output=True,
                              text=True, check=True, timeout=120).stdout
    assert rendered == (ROOT / "docs" / "configuration.md").read_text(), (
        "docs/configuration.md is stale: python tools/configdoc.py > docs/configuration.md"
    )


def test_readme_opens_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head
