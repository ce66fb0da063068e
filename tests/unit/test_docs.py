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
