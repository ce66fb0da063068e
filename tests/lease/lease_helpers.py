"""Helpers shared by the lease tests."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RBAC = REPO / "k8s" / "overlays" / "shared-gpu-k8s-lease" / "rbac.yaml"


def role_verbs() -> set[str]:
    """The verbs on coordination.k8s.io leases that the shared-gpu-k8s-lease overlay's Role grants."""
    import yaml

    verbs: set[str] = set()
    for doc in yaml.safe_load_all(RBAC.read_text()):
        if doc and doc.get("kind") == "Role":
            for rule in doc.get("rules", []):
                if "coordination.k8s.io" in rule.get("apiGroups", []) and "leases" in rule.get("resources", []):
                    verbs.update(rule.get("verbs", []))
    assert verbs, f"no Role rule on leases in {RBAC}"
    return verbs


def child_env() -> dict[str, str]:
    """Environment for helper subprocesses: the repository on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def load_checker() -> ModuleType:
    """tools/check_lease_records.py as a module (it is a standalone script, not a package)."""
    if "check_lease_records" in sys.modules:
        return sys.modules["check_lease_records"]
    spec = importlib.util.spec_from_file_location("check_lease_records",
                                                  REPO / "tools" / "check_lease_records.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_lease_records"] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def check_records(*paths: Path) -> dict[str, Any]:
    """Run the record checker on ``paths``; fail the test on any overlap."""
    checker = load_checker()
    records = checker.load([str(p) for p in paths])
    turns, problems, _ = checker.build_turns(records)
    overlaps = checker.find_overlaps(turns)
    assert not overlaps, "\n".join(f"{a.describe()} overlaps {b.describe()}" for a, b, _ in overlaps)
    return {"summary": checker.summarize(turns), "problems": problems, "turns": turns, "records": records}


class Occupancy:
    """An independent witness of mutual exclusion inside one process: enter() fails loudly when
    somebody else is already in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside: str | None = None
        self.violations: list[str] = []
        self.entries = 0

    def enter(self, who: str) -> None:
        with self._lock:
            if self.inside is not None:
                self.violations.append(f"{who} entered while {self.inside} was inside")
            self.inside = who
            self.entries += 1

    def leave(self, who: str) -> None:
        with self._lock:
            if self.inside == who:
                self.inside = None


def wait_until(predicate: Any, timeout: float, interval: float = 0.005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
