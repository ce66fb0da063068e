"""Shared helpers of the serving benchmarks: statistics, machine description, test images, processes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import platform
import signal
import statistics
import subprocess  # nosec B404 - benchmark children: this interpreter, fixed module names
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tools.stack import ServiceProcess, health_status, start_service
from trellisbox._domain.contract import GATEWAY_SERVICE
from trellisbox._domain.imaging import synthetic_object

REPO = Path(__file__).resolve().parents[1]
SERVING = 1  # grpc.health.v1 HealthCheckResponse.SERVING


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 1])."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """Median with p10–p90 and min–max of repeated measurements."""
    values = [float(v) for v in values]
    return {
        "median": round(statistics.median(values), digits),
        "p10": round(percentile(values, 0.10), digits),
        "p90": round(percentile(values, 0.90), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): how busy the shared host was."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a result file whole or not at all (a run stopped midway leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (versions read from package metadata: no torch import)."""
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": usable_cores(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "diffusers": _version("diffusers"),
        "load_average_at_start": load_average() or [0.0, 0.0, 0.0],
    }


def object_image(side: int = 256, seed: int = 0, noisy: bool = False) -> Image.Image:
    """An RGBA object: a disc on a transparent background, smooth shading or (``noisy``) random pixels.

    Noise makes the preview backend's baked texture incompressible, which is how the transport benchmark
    gets a large GLB out of the real TRELLIS service.
    """
    return synthetic_object(side, seed if noisy else None, noisy=noisy)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def wait_serving(target: str, service: str, timeout: float, process: ServiceProcess | None = None,
                 poll_s: float = 0.05) -> float:
    """Poll readiness until ``service`` at ``target`` is SERVING; returns the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.process.returncode}:\n{process.log_tail()}")
        if health_status(target, service, timeout=0.5) == SERVING:
            return time.monotonic()
        time.sleep(poll_s)
    tail = process.log_tail() if process is not None else ""
    raise TimeoutError(f"{service} at {target} not SERVING after {timeout:.0f} s\n{tail}")


def exit_on_sigterm() -> None:
    """Make SIGTERM end this benchmark through ``SystemExit``, so that its ``with Processes(...)`` and ``LocalStack``
    blocks stop the service processes they started. Python's default for SIGTERM ends the process at once, without
    running any ``finally``, and leaves them running."""

    def exit_now(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)


@dataclass
class Processes:
    """Service processes started by one benchmark section; all stopped on exit."""

    log_dir: Path

    def __post_init__(self) -> None:
        self.started: list[ServiceProcess] = []

    def start(self, name: str, module: str, args: Sequence[str], *, port: int | None = None,
              env: dict[str, str] | None = None) -> ServiceProcess:
        process = start_service(name, module, args, self.log_dir, port=port, env=env)
        self.started.append(process)
        return process

    def stop(self, process: ServiceProcess) -> None:
        process.stop()
        with contextlib.suppress(ValueError):
            self.started.remove(process)

    def close(self) -> None:
        while self.started:
            self.started.pop().stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_raw_relay(procs: Processes, upstream: str, *args: str, name: str = "raw-relay") -> ServiceProcess:
    """``bench/stubs.py --mode relay`` in front of ``upstream`` (a ``TrellisService/ImageTo3D``), SERVING;
    ``args``: more of its flags (``--forward-request``, ``--grpc-args``)."""
    relay = procs.start(name, "bench.stubs", ["--mode", "relay", "--upstream", upstream, *args])
    wait_serving(relay.target, GATEWAY_SERVICE, 60, relay)
    return relay


def start_bare_and_relay(procs: Processes, name: str, file: Path, progress: int, *bare_args: str
                         ) -> tuple[ServiceProcess, ServiceProcess]:
    """The gRPC floor's two stand-ins, SERVING: ``bench/stubs.py --mode bare`` streaming ``file`` after ``progress``
    events (``bare_args``: more of its flags, e.g. ``--chunk-bytes``), and a raw relay in front of it that forwards
    the caller's request (:func:`start_raw_relay`). Their process names start with ``name``."""
    bare = procs.start(f"{name}-bare", "bench.stubs", ["--mode", "bare", "--file", str(file), "--progress",
                                                       str(progress), *bare_args])
    wait_serving(bare.target, GATEWAY_SERVICE, 60, bare)
    return bare, start_raw_relay(procs, bare.target, "--forward-request", name=f"{name}-relay")


def run_child(module: str, args: Sequence[str], env: dict[str, str] | None = None,
              timeout: float = 1200) -> dict[str, Any]:
    """Run ``python -m <module> <args>`` in a fresh process and return the JSON object its last output line holds.

    The child starts with glibc's allocator defaults plus ``env``: any ``MALLOC_*`` or ``GLIBC_TUNABLES`` of this
    process is left out, so that what the child measures does not depend on how the benchmark itself was started.
    """
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,  # nosec B603
                          check=True, cwd=REPO, env=child_env(env), timeout=timeout)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a benchmark's child process: this one's, less any ``MALLOC_*`` or ``GLIBC_TUNABLES``
    (glibc's allocator defaults), plus ``env``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return {**inherited, **(env or {})}


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (``None``: this one, all its threads)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def minor_faults(pid: int | None = None) -> int:
    """Minor page faults of a process so far (``None``: this one): each first touch of a fresh page."""
    stat = Path(f"/proc/{pid if pid is not None else 'self'}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[7])


def thread_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds of a process's live threads, to the nanosecond (``/proc/<pid>/task/*/schedstat``; ``stat`` counts
    in 10 ms ticks, too coarse for one request). ``None``: this process."""
    if pid is None:
        return time.process_time()
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9
