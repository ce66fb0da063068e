"""The `trellisbox` command and the launcher as a newcomer meets them: Ctrl-C, an unreachable gateway, a file
that is not an image, a second `make run` while one is running."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.stack import LocalStack, LogInUse, free_port, start_service
from trellisbox.cli import name_images
from webui.app import EXAMPLE_IMAGE

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "trellisbox.cli"]


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A listening socket that never answers: a call to it hangs until cancelled."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def test_ctrl_c_says_cancelled_and_exits_130_without_a_traceback(silent_server: socket.socket,
                                                                 tmp_path: Path) -> None:
    port = int(silent_server.getsockname()[1])
    # As a terminal starts it in the foreground: SIGINT at its default. A suite started in the background by a
    # non-interactive shell has SIGINT ignored, and an ignored signal stays ignored across exec (Python then
    # installs no KeyboardInterrupt handler), so the CLI would rightly never see this Ctrl-C.
    process = subprocess.Popen([*CLI, "generate", str(EXAMPLE_IMAGE), "-o", str(tmp_path / "x.glb"),
                                "--target", f"127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        silent_server.settimeout(60)
        connection, _ = silent_server.accept()  # the CLI has started its call: past imports, waiting on the reply
        with connection:
            time.sleep(0.5)
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "cancelled" in stderr and "Traceback" not in stderr


def test_an_unreachable_gateway_says_how_to_start_one(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    completed = subprocess.run([*CLI, "generate", str(EXAMPLE_IMAGE), "-o", str(tmp_path / "x.glb"),
                                "--target", target, "--timeout", "20"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert f"cannot reach the gateway at {target}" in completed.stderr
    assert "make run" in completed.stderr and "--target" in completed.stderr


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    completed = subprocess.run([*CLI, "generate", "chair.png", "-o", str(tmp_path / "x.glb")],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "chair.png: no such file" in completed.stderr


def test_messages_name_the_file_not_its_index() -> None:
    assert name_images("images[1] is 4097×4097 = 16,785,409 pixels", ["a.png", "chair.png"]) == \
        "chair.png is 4097×4097 = 16,785,409 pixels"
    assert name_images("images[5] is empty", ["a.png"]) == "images[5] is empty"


def test_a_taken_port_is_named_before_anything_starts_and_logs_are_left_alone(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "gateway.log").write_text("the running stack's log\n")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        completed = subprocess.run(
            [sys.executable, "-m", "tools.demo", "--serve", "--out", str(tmp_path), "--gateway-port", str(port),
             "--web-port", "-1"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert f"port {port} (gateway) is already in use" in completed.stderr
    assert "stack ready" not in completed.stderr
    assert (logs / "gateway.log").read_text() == "the running stack's log\n"


def test_a_second_stack_does_not_truncate_the_running_ones_log(tmp_path: Path) -> None:
    args = ["--refiner-target", f"127.0.0.1:{free_port()}", "--trellis-target", f"127.0.0.1:{free_port()}"]
    first = start_service("gateway", "gateway", args, tmp_path, exclusive_log=True)
    try:
        deadline = time.monotonic() + 60
        while not first.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        written = first.log_path.read_text()
        assert written
        with pytest.raises(LogInUse, match="still running"):
            start_service("gateway", "gateway", args, tmp_path, exclusive_log=True)
        assert first.log_path.read_text().startswith(written)
    finally:
        first.stop()
    start_service("gateway", "gateway", args, tmp_path, exclusive_log=True).stop()  # free again once it exits


def test_the_classic_refiner_says_it_ignored_the_prompt(tmp_path: Path) -> None:
    with LocalStack(tmp_path / "logs", refiner_args=["--backend", "classic"], trellis_args=["--backend", "preview"],
                    ready_timeout=120) as stack:
        completed = subprocess.run(
            [*CLI, "generate", str(EXAMPLE_IMAGE), "-o", str(tmp_path / "mug.glb"), "--target", stack.gateway_target,
             "--refine", "--prompt", "a ceramic mug"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "classic refiner: only strength applies; prompts, guidance, steps and seed are ignored" in \
        " ".join(completed.stderr.split())


@pytest.mark.parametrize(("args", "said"), [
    (["{image}", "-o", "{tmp}"], "{tmp} is a folder; give a file name"),
    (["{image}", "-o", "{tmp}/a-file/x.glb"], "cannot write {tmp}/a-file/x.glb: {tmp}/a-file is not a folder"),
    (["{image}", "-o", "{tmp}/x.glb", "--ply", "{tmp}"], "{tmp} is a folder; give a file name"),
    (["{image}", "-o", "{tmp}/x.glb", "--timeout", "-5"], "--timeout: must be a positive number of seconds, got -5"),
    (["{image}", "-o", "{tmp}/x.glb", "--timeout", "nan"], "--timeout: must be a positive number of seconds, got nan"),
    (["{image}", "-o", "{tmp}/x.glb", "--strength", "0.5", "--steps", "3"], "--strength, --steps need --refine"),
    (["{tmp}/[/x].png", "-o", "{tmp}/x.glb"], "{tmp}/[/x].png: no such file"),
])
def test_what_cannot_work_is_refused_before_anything_is_sent(tmp_path: Path, args: list[str], said: str) -> None:
    """Exit status 2 and one line naming the problem, before a request is sent (so no GPU time is spent on a
    result that cannot be written); file names are printed as they are, brackets included."""
    (tmp_path / "a-file").write_text("")
    fill = {"image": str(EXAMPLE_IMAGE), "tmp": str(tmp_path)}
    completed = subprocess.run([*CLI, "generate", *(arg.format(**fill) for arg in args),
                                "--target", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2, completed.stderr
    assert said.format(**fill) in completed.stderr and "Traceback" not in completed.stderr


def test_an_output_that_fails_to_write_is_named_and_the_others_are_kept(tmp_path: Path) -> None:
    """A write that fails after the model ran (here a full device) is an error line and status 1, not a traceback;
    what could be written is, and its line says so. Names with brackets are files, not markup."""
    folder = tmp_path / "[/y]"
    with LocalStack(tmp_path / "logs", refiner_args=["--backend", "classic"], trellis_args=["--backend", "preview"],
                    ready_timeout=120) as stack:
        completed = subprocess.run(
            [*CLI, "generate", str(EXAMPLE_IMAGE), "-o", str(folder / "[bold]m.glb"), "--ply", "/dev/full",
             "--target", stack.gateway_target], capture_output=True, text=True, timeout=120)
        assert completed.returncode == 1, completed.stderr
        assert "error: cannot write /dev/full: No space left on device" in completed.stderr
        assert "Traceback" not in completed.stderr
        assert f"wrote {folder / '[bold]m.glb'}" in " ".join(completed.stderr.split())
        assert (folder / "[bold]m.glb").read_bytes()[:4] == b"glTF"

        completed = subprocess.run(
            [*CLI, "generate", str(EXAMPLE_IMAGE), "-o", str(folder / "[red]n.glb"), "--target",
             stack.gateway_target], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert (folder / "[red]n.glb").read_bytes()[:4] == b"glTF"
