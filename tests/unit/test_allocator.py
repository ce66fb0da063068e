"""The allocator profiles (trellisbox/_runtime/allocator.py): what each asks glibc for, that the receiving one makes a
process reuse the pages of an artifact it let go, and that the environment's own settings win."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trellisbox import cli
from trellisbox._runtime import allocator
from trellisbox._runtime.allocator import MODEL, RECEIVING, STREAMING, MallocProfile

REPO = Path(__file__).resolve().parents[2]


def _glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


needs_glibc = pytest.mark.skipif(not _glibc(), reason="glibc's allocator only")

#: In a fresh process: tune (or not) as argv[1] says, let go of one 48 MiB block, then count the minor page faults of
#: allocating and filling the next one. 48 MiB is above the highest mmap threshold glibc takes (32 MiB).
_REUSE = """
import resource, sys
from trellisbox._runtime.allocator import RECEIVING, tune_malloc
print(tune_malloc(RECEIVING) if sys.argv[1] == "tune" else "not tuned")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = b"x" * (48 << 20)
del block
before = faults()
block = b"x" * (48 << 20)
print(faults() - before)
"""


def _faults_of_second_block(how: str, env: dict[str, str]) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", _REUSE, how], capture_output=True, text=True, check=True, timeout=60,
                          cwd=REPO, env={**clean, **env})
    said, faults = done.stdout.strip().splitlines()
    return said, int(faults)


def test_each_profile_names_the_settings_glibc_reads_from_the_environment() -> None:
    mib = 2**20
    assert STREAMING.environment() == {"MALLOC_MMAP_THRESHOLD_": str(4 * mib), "MALLOC_TRIM_THRESHOLD_": str(16 * mib)}
    assert MODEL.environment() == {"MALLOC_MMAP_THRESHOLD_": str(32 * mib), "MALLOC_TRIM_THRESHOLD_": str(128 * mib),
                                   "MALLOC_ARENA_MAX": "1"}
    assert RECEIVING.environment() == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20)}
    assert RECEIVING.describe() == "malloc (receiving): no mmap, trim threshold 256 MiB"
    # Every name the profiles write is one tune_malloc defers to when the operator set it.
    for profile in (STREAMING, MODEL, RECEIVING):
        assert set(profile.environment()) <= set(allocator._MALLOC_ENV)


@needs_glibc
def test_the_receiving_profile_reuses_the_pages_of_the_last_artifact() -> None:
    said, tuned = _faults_of_second_block("tune", {})
    assert said == RECEIVING.describe()
    _, untuned = _faults_of_second_block("plain", {"TRELLISBOX_MALLOC": "default"})
    _, from_environment = _faults_of_second_block("plain", RECEIVING.environment())
    pages = (48 << 20) // 4096
    assert untuned > pages * 0.9, "glibc's defaults map a fresh region, every page faulted in"
    assert tuned < pages * 0.05, f"{tuned} faults: the freed block was not reused"
    assert from_environment < pages * 0.05, f"{from_environment} faults with {RECEIVING.environment()}"


@needs_glibc
@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"},
                                 {"TRELLISBOX_MALLOC": "default"}])
def test_the_environment_s_own_settings_are_kept(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    said = allocator.tune_malloc(RECEIVING)
    assert said.startswith("malloc:") and ("kept" in said or "defaults" in said), said


def test_the_command_line_client_applies_the_receiving_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[MallocProfile] = []

    def record(profile: MallocProfile) -> str:
        applied.append(profile)
        return profile.describe()

    monkeypatch.setattr(cli, "tune_malloc", record)
    monkeypatch.setattr(cli, "run_cancel", lambda args: 0)
    assert cli.main(["cancel", "some-request"]) == 0
    assert applied == [RECEIVING]
