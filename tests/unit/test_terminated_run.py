"""A test run that is terminated (SIGTERM: `timeout`, a CI runner giving up) still tears its fixtures down, so the
service processes the tests started, each in a session of its own, do not outlive it (tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_TEST = '''
import os, subprocess, time
from pathlib import Path

import pytest


@pytest.fixture
def service():
    # Like tools.stack.start_service: a session of its own, so a signal to the run does not reach it.
    process = subprocess.Popen([{python!r}, "-c", "import time; time.sleep(120)"], start_new_session=True)
    Path({pid_file!r}).write_text(str(process.pid))
    yield process
    process.kill()
    process.wait()


def test_runs_long(service):
    time.sleep(120)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        # A zombie is gone for this purpose: a child of the ended run waits there to be reaped by init.
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text() if sys.platform == "linux" else True
    except (ProcessLookupError, FileNotFoundError):  # gone, or reaped between the two looks
        return False


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_terminated_run_stops_the_processes_its_fixtures_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    test = tmp_path / "test_long.py"
    test.write_text(_TEST.format(python=sys.executable, pid_file=str(pid_file)))
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                            str(test)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    child = 0
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert run.poll() is None and time.monotonic() < deadline, "the run never started its fixture"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=60)[0].decode()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), f"the fixture's process outlived the terminated run:\n{output[-2000:]}"
        assert "terminated by signal 15" in output
    finally:
        run.kill()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)
