"""Lease records (atomic JSONL appends) and the standalone checker, tools/check_lease_records.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.lease.lease_helpers import REPO, child_env
from trellisbox._runtime.lease import LeaseRecorder, read_records

pytestmark = pytest.mark.timeout(60)
CHECKER = REPO / "tools" / "check_lease_records.py"


def _write(path: Path, events: list[tuple[str, str, str, float, int]], gpu: str = "gpu-0") -> Path:
    """events: (event, service, holder, t_mono, token)"""
    with open(path, "a", encoding="utf-8") as fh:
        for event, service, holder, t, token in events:
            fh.write(json.dumps({"event": event, "service": service, "holder": holder, "gpu": gpu,
                                 "t_mono": t, "t_wall": 1.7e9 + t, "token": token}) + "\n")
    return path


def _check(*paths: Path, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECKER), *flags, *map(str, paths)], capture_output=True,
                          text=True, timeout=30)


def test_recorder_writes_one_json_line_per_event(tmp_path: Path) -> None:
    rec = LeaseRecorder(tmp_path / "sub" / "r.jsonl", backend="flock")
    rec.record("acquire", service="refiner", holder="pod-a", gpu="gpu-0", token=3)
    rec.record("lost", service="refiner", holder="pod-a", gpu="gpu-0", token=3, reason="renewal failed")
    rec.close()
    rows = read_records(tmp_path / "sub" / "r.jsonl")
    assert [r["event"] for r in rows] == ["acquire", "lost"]
    assert set(rows[0]) >= {"service", "holder", "gpu", "event", "t_mono", "t_wall", "token", "pid", "backend"}
    assert rows[1]["reason"] == "renewal failed" and rows[0]["t_mono"] <= rows[1]["t_mono"]
    with pytest.raises(ValueError, match="unknown lease event"):
        LeaseRecorder(tmp_path / "x.jsonl").record("grab", service="s", holder="h", gpu="g", token=1)


def test_appends_are_atomic_across_processes(tmp_path: Path) -> None:
    path, per_process, procs = tmp_path / "shared.jsonl", 400, 4
    script = (
        "import sys\n"
        "from trellisbox._runtime.lease import LeaseRecorder\n"
        "rec = LeaseRecorder(sys.argv[1])\n"
        "for i in range(int(sys.argv[2])):\n"
        "    rec.record('acquire', service='s' + sys.argv[3], holder='h' * 300, gpu='gpu-0', token=i)\n"
    )
    children = [subprocess.Popen([sys.executable, "-c", script, str(path), str(per_process), str(i)],
                                 env=child_env()) for i in range(procs)]
    assert [c.wait(timeout=40) for c in children] == [0] * procs
    lines = path.read_text().splitlines()
    assert len(lines) == procs * per_process
    rows = [json.loads(line) for line in lines]  # no torn or interleaved line
    for i in range(procs):
        assert sorted(r["token"] for r in rows if r["service"] == f"s{i}") == list(range(per_process))


def test_checker_accepts_alternating_turns_and_summarizes(tmp_path: Path) -> None:
    refiner, trellis = tmp_path / "refiner.jsonl", tmp_path / "trellis.jsonl"
    _write(refiner, [("acquire", "refiner", "pod-r", 1.0, 1), ("release", "refiner", "pod-r", 2.0, 1),
                     ("acquire", "refiner", "pod-r", 5.0, 3), ("release", "refiner", "pod-r", 5.5, 3)])
    _write(trellis, [("acquire", "trellis", "pod-t", 2.0, 2), ("release", "trellis", "pod-t", 4.5, 2)])
    result = _check(refiner, trellis)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 turns, 0 overlaps" in result.stdout
    assert "2 alternations" in result.stdout and "max hold 2.500 s (trellis@pod-t)" in result.stdout
    summary = json.loads(_check(refiner, trellis, flags=("--json",)).stdout)
    assert summary["gpus"]["gpu-0"]["holders"]["refiner@pod-r"] == {"turns": 2, "active_s": 1.5,
                                                                    "max_hold_s": 1.0}


def test_checker_fails_on_overlap_and_prints_the_pair(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", [
        ("acquire", "refiner", "pod-r", 1.0, 1), ("acquire", "trellis", "pod-t", 1.8, 2),
        ("release", "refiner", "pod-r", 2.0, 1), ("release", "trellis", "pod-t", 3.0, 2)])
    result = _check(path)
    assert result.returncode == 1
    assert "OVERLAP on gpu-0 (200.000 ms)" in result.stdout
    assert "refiner@pod-r [t_mono 1.000000 → 2.000000, token 1]" in result.stdout
    assert "trellis@pod-t [t_mono 1.800000 → 3.000000, token 2]" in result.stdout


def test_checker_separates_gpus_and_tolerates_touching_turns(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.jsonl", [("acquire", "refiner", "a", 1.0, 1), ("release", "refiner", "a", 2.0, 1),
                                         ("acquire", "trellis", "b", 2.0, 2), ("release", "trellis", "b", 3.0, 2)])
    _write(path, [("acquire", "trellis", "b", 1.5, 1), ("release", "trellis", "b", 1.7, 1)], gpu="gpu-1")
    result = _check(path)
    assert result.returncode == 0, result.stdout
    assert "gpu-1: 1 turns" in result.stdout


def test_checker_lost_and_unreleased_turns(tmp_path: Path) -> None:
    # A holder lost its lease but its GPU work ran on until its release, after the peer took over.
    late = _write(tmp_path / "late.jsonl", [
        ("acquire", "trellis", "a", 1.0, 1), ("lost", "trellis", "a", 5.0, 1),
        ("acquire", "refiner", "b", 6.0, 2), ("release", "trellis", "a", 6.5, 1),
        ("release", "refiner", "b", 7.0, 2)])
    assert _check(late).returncode == 1
    # A killed holder never releases: reported, not an overlap (its end is unknown) unless --strict.
    killed = _write(tmp_path / "killed.jsonl", [("acquire", "trellis", "a", 1.0, 1),
                                                ("acquire", "refiner", "b", 3.0, 2),
                                                ("release", "refiner", "b", 4.0, 2)])
    result = _check(killed)
    assert result.returncode == 0 and "never released" in result.stderr
    assert _check(killed, flags=("--strict",)).returncode == 1


def test_checker_flags_tokens_that_do_not_increase(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.jsonl", [("acquire", "refiner", "a", 1.0, 5), ("release", "refiner", "a", 2.0, 5),
                                         ("acquire", "trellis", "b", 3.0, 5), ("release", "trellis", "b", 4.0, 5)])
    result = _check(path)
    assert result.returncode == 0 and "fencing token did not increase" in result.stderr
    assert _check(path, flags=("--strict",)).returncode == 1


@pytest.mark.parametrize("line", ["not json", '{"event": "grab", "gpu": "g", "holder": "h", "t_mono": 1}',
                                  '{"event": "acquire", "gpu": "g", "t_mono": 1}', "[1, 2]"])
def test_checker_rejects_malformed_records(tmp_path: Path, line: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(line + "\n")
    result = _check(path)
    assert result.returncode == 2 and "m.jsonl:1" in result.stderr


def test_checker_needs_no_project_imports(tmp_path: Path) -> None:
    """It is a standalone script: it runs from anywhere with only the standard library."""
    path = _write(tmp_path / "r.jsonl", [("acquire", "s", "a", 1.0, 1), ("release", "s", "a", 2.0, 1)])
    env: dict[str, Any] = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-I", str(CHECKER), str(path)], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
