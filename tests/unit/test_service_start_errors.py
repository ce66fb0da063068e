"""A service started with a mistake in its configuration says what is wrong in one line, naming the flag and its
environment variable, and exits (2 for a value it refuses, 1 for what it cannot do): an operator reading a pod's
log should not have to dig the reason out of a pydantic traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SERVICES = ("gateway", "refiner_service", "trellis_service")


def _start(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("module", SERVICES)
def test_a_refused_value_names_its_flag_and_variable(module: str) -> None:
    prefix = {"gateway": "TRELLISBOX_GATEWAY_", "refiner_service": "TRELLISBOX_REFINER_",
              "trellis_service": "TRELLISBOX_TRELLIS_"}[module]
    for args, env, said in [
        (["--port", "abc"], None, f"--port / {prefix}PORT: Input should be a valid integer"),
        (["--tls", "bogus"], None, f"--tls / {prefix}TLS: Input should be 'off', 'on' or 'mutual' (got 'bogus')"),
        ([], {f"{prefix}MAX_QUEUE": "-3"}, f"--max-queue / {prefix}MAX_QUEUE: Input should be greater than or equal "
                                           "to 0 (got '-3')"),
        (["--host", "0.0.0.0"], None, "host 0.0.0.0 is reachable from other machines: choose the transport"),
    ]:
        completed = _start(module, *args, env=env)
        assert completed.returncode == 2, completed.stderr
        lines = completed.stderr.strip().splitlines()
        assert lines == [lines[0]] and lines[0].startswith(f"python -m {module}: error: "), completed.stderr
        assert said in lines[0]


def test_the_help_names_the_program_and_plain_metavars() -> None:
    completed = _start("gateway", "--help")
    assert completed.returncode == 0
    assert completed.stdout.startswith("usage: python -m gateway ")
    assert "[--tls {off,on,mutual}]" in completed.stdout and "{Path,null}" not in completed.stdout


def test_a_taken_port_is_one_log_line_and_status_1() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        completed = _start("gateway", "--port", str(port))
    assert completed.returncode == 1
    assert f"cannot start: cannot listen on 127.0.0.1:{port}: the port is taken" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_token_file_or_results_folder_that_cannot_be_used_stops_the_start(tmp_path: Path) -> None:
    completed = _start("gateway", "--token-file", str(tmp_path / "missing"))
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert f"error: cannot read the token file {tmp_path / 'missing'}: No such file or directory" in completed.stderr
    (tmp_path / "a-file").write_text("")
    completed = _start("gateway", "--results-dir", str(tmp_path / "a-file" / "results"))
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert f"error: cannot use the results folder {tmp_path / 'a-file' / 'results'}: Not a directory" in \
        completed.stderr
