"""Start TRELLIS-BOX services as local processes: used by ``make demo``, ``make run``, tests and benchmarks.

Every process is started in its own session on a loopback port and stopped (SIGTERM, then SIGKILL)
when the stack exits, also on failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess  # nosec B404  # starts this project's services and `ss`, argv lists only
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellisbox._domain.contract import GATEWAY_SERVICE, REFINER_SERVICE, TRELLIS_SERVICE
from trellisbox._runtime.security import channel_credentials

#: Ports :func:`free_port` handed out: several picked before any is bound (a stack's gRPC and metrics ports) must
#: differ, and the kernel may offer a port it offered a moment ago once it was released.
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on ``host``, and that this process was not given before."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port that was not handed out already")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on ``host:port`` (or on every address at that port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection in TIME_WAIT is no owner
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def port_owner(port: int) -> str | None:
    """What listens on ``port`` (``pid 123: python -m gateway ...``), when this machine can tell (``ss``)."""
    try:
        # `ss` from PATH, as a person at this machine would run it; a fixed argv, no shell.
        listing = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"],  # nosec B603 B607
                                 capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'users:\(\("([^"]*)",pid=(\d+)', listing)
    if found is None:
        return None
    name, pid = found.groups()
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = name
    return f"pid {pid}: {command[:160] or name}"


class PortTaken(RuntimeError):
    """A port the stack was told to use is taken; the message says which, by what when known, and what to do."""

    def __init__(self, name: str, port: int, hint: str = "") -> None:
        owner = port_owner(port)
        super().__init__(f"port {port} ({name}) is already in use" + (f" by {owner}" if owner else "")
                         + "; stop that process (another `make run`?) or choose another port" + hint)
        self.port = port


def check_ports(ports: dict[str, int], hint: str = "") -> None:
    """Raise :class:`PortTaken` for the first of ``ports`` (by name) that something already listens on."""
    for name, port in ports.items():
        if port and port_in_use(port):
            raise PortTaken(name, port, hint)


def health_status(target: str, service: str, timeout: float = 1.0,
                  credentials: grpc.ChannelCredentials | None = None) -> int:
    """The grpc.health.v1 status of ``service`` at ``target`` (UNKNOWN when unreachable); ``credentials`` for a
    service that serves TLS."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return int(health_pb2.HealthCheckResponse.UNKNOWN)
        return int(response.status)


class LogInUse(RuntimeError):
    """Another running stack writes this log: starting here would truncate it."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} belongs to a stack that is still running; stop it first (Ctrl-C in its terminal) "
                         "or use another output folder (--out)")


@dataclass
class ServiceProcess:
    """A running service process.

    Args:
        name: Short name used in logs ("refiner", "trellis", "gateway").
        module: Python module run with ``-m``.
        port: Its gRPC port on 127.0.0.1.
        process: The child process.
        log_path: Where its stdout and stderr go.
        credentials: What a client needs to reach it when it serves TLS (for the health checks).
    """

    name: str
    module: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    credentials: grpc.ChannelCredentials | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, service: str, timeout: float) -> None:
        """Block until ``service`` reports SERVING; raise with the log tail when it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} before it was ready:\n{self.log_tail()}"
                )
            status = health_status(self.target, service, timeout=0.5, credentials=self.credentials)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL the whole process group."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL now (for failure tests)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_service(name: str, module: str, args: Sequence[str], log_dir: Path, *,
                  port: int | None = None, env: dict[str, str] | None = None,
                  exclusive_log: bool = False) -> ServiceProcess:
    """Start ``python -m module --host 127.0.0.1 --port PORT *args`` in its own process group.

    With ``exclusive_log`` the log is locked (``flock``) for the process's life and a log that another running
    process holds is left untouched: :class:`LogInUse` is raised instead of truncating it.
    """
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        if exclusive_log:
            try:
                fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the child's stdout until it exits
            except BlockingIOError:
                raise LogInUse(log_path) from None
        log.truncate(0)
        process = subprocess.Popen(  # nosec B603  # this interpreter and a module of this project, no shell
            [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
    return ServiceProcess(name, module, port, process, log_path)


@dataclass(frozen=True)
class StackSecurity:
    """TLS everywhere and (optionally) a token for a local stack: the gateway serves TLS with ``gateway.crt``, the
    model services require mutual TLS with a certificate from the CA, and the gateway presents ``client.crt``.

    Args:
        cert_dir: A folder written by :func:`tools.devcerts.write_dev_certs`.
        token_file: Bearer tokens the gateway accepts (None: no token needed).
    """

    cert_dir: Path
    token_file: Path | None = None

    @property
    def ca_file(self) -> Path:
        return self.cert_dir / "ca.crt"

    def server_args(self, name: str) -> list[str]:
        """The flags of service ``name``."""
        own = ["--tls-cert-file", str(self.cert_dir / f"{name}.crt"),
               "--tls-key-file", str(self.cert_dir / f"{name}.key")]
        if name != "gateway":
            return ["--tls", "mutual", *own, "--tls-client-ca-file", str(self.ca_file)]
        stage = ["--stage-tls", "mutual", "--stage-ca-file", str(self.ca_file),
                 "--stage-cert-file", str(self.cert_dir / "client.crt"),
                 "--stage-key-file", str(self.cert_dir / "client.key")]
        return ["--tls", "on", *own, *stage, *(["--token-file", str(self.token_file)] if self.token_file else [])]

    def client_options(self) -> dict[str, Any]:
        """:class:`~trellisbox.client.TrellisBoxClient` options for the gateway: its CA and the first token."""
        tokens = self.token_file.read_text().split() if self.token_file else []
        return {"ca_file": self.ca_file, "token": tokens[0] if tokens else None}

    def credentials(self) -> grpc.ChannelCredentials:
        """A client's: trusts the CA and presents ``client.crt`` (which the model services accept)."""
        return channel_credentials(self.ca_file, self.cert_dir / "client.crt", self.cert_dir / "client.key")


@dataclass
class LocalStack:
    """Refiner, TRELLIS and gateway services as local processes.

    Args:
        log_dir: Where each service writes ``<name>.log``.
        refiner_args: Extra flags for ``python -m refiner_service`` (e.g. ``["--backend", "classic"]``).
        trellis_args: Extra flags for ``python -m trellis_service``.
        gateway_args: Extra flags for ``python -m gateway``.
        ports: Fixed ports by name; free ports otherwise.
        ready_timeout: Seconds each service may take to load and warm up.
        env: Extra environment for every process.
        security: TLS and a token for every service (None: plaintext on loopback).
    """

    log_dir: Path
    refiner_args: Sequence[str] = ()
    trellis_args: Sequence[str] = ()
    gateway_args: Sequence[str] = ()
    ports: dict[str, int] = field(default_factory=dict)
    ready_timeout: float = 180.0
    env: dict[str, str] = field(default_factory=dict)
    security: StackSecurity | None = None
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        # Nothing is started (and no log opened) while a fixed port is taken: another stack would answer the
        # health checks and then this one would fail to bind.
        check_ports(self.ports)
        # Model services load in parallel; the gateway starts once both are ready.
        refiner = self._start("refiner", "refiner_service", self.refiner_args)
        trellis = self._start("trellis", "trellis_service", self.trellis_args)
        refiner.wait_ready(REFINER_SERVICE, self.ready_timeout)
        trellis.wait_ready(TRELLIS_SERVICE, self.ready_timeout)
        self.start_gateway()

    def start_gateway(self) -> str:
        """Start the gateway in front of the running model services (again, after a test stopped it); its target."""
        # Durable requests' results live with this stack's logs unless the caller chose a place.
        results = [] if "--results-dir" in self.gateway_args else ["--results-dir", str(self.log_dir / "results")]
        gateway = self._start(
            "gateway", "gateway",
            ["--refiner-target", self.processes["refiner"].target, "--trellis-target",
             self.processes["trellis"].target, *results, *self.gateway_args],
        )
        gateway.wait_ready(GATEWAY_SERVICE, self.ready_timeout)
        return gateway.target

    def _start(self, name: str, module: str, args: Sequence[str]) -> ServiceProcess:
        if self.security is not None:
            args = [*self.security.server_args(name), *args]
        process = start_service(name, module, args, self.log_dir, port=self.ports.get(name), env=self.env,
                                exclusive_log=True)
        if self.security is not None:
            process.credentials = self.security.credentials()
        self.processes[name] = process
        return process

    @property
    def gateway_target(self) -> str:
        return self.processes["gateway"].target

    def stop(self) -> None:
        # A second Ctrl-C while stopping must not leave services running: SIGINT waits until they are down.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for process in reversed(list(self.processes.values())):
                process.stop()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def logs(self) -> Iterator[tuple[str, str]]:
        for name, process in self.processes.items():
            yield name, process.log_tail()
