"""A tiny authoritative DNS server on loopback, so ``dns:///`` resolution over several replicas can be
benchmarked on one machine: ``dns://127.0.0.1:<dns port>/refiner.bench.test:<port>`` with
``GRPC_DNS_RESOLVER=ares`` (c-ares honours the DNS server named in the target's authority).

It answers A queries for its names with the addresses currently configured (they can be changed
between runs), and an empty NOERROR answer to anything else (AAAA, TXT), like a zone without those
records.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.queries = 0
        self._lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        with self._lock:
            self.queries += 1
            addresses = list(self.records.get(name, ()))
        if request.q.qtype == QTYPE.A:
            for address in addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=30))
        return reply


class LoopbackDns:
    """Serve A records on ``127.0.0.1:<port>`` (UDP and TCP) from a thread; use as a context manager."""

    def __init__(self, port: int = 0) -> None:
        self._resolver = _Resolver()
        if port == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
        self.port = port
        quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        self._servers = [DNSServer(self._resolver, port=port, address="127.0.0.1", tcp=tcp, logger=quiet)
                         for tcp in (False, True)]

    def set(self, name: str, addresses: Sequence[str]) -> None:
        with self._resolver._lock:
            self._resolver.records[name.rstrip(".").lower()] = list(addresses)

    @property
    def queries(self) -> int:
        return self._resolver.queries

    def target(self, name: str, port: int) -> str:
        """The gRPC target that resolves ``name`` through this server."""
        return f"dns://127.0.0.1:{self.port}/{name}:{port}"

    def __enter__(self) -> LoopbackDns:
        for server in self._servers:
            server.start_thread()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()


logging.getLogger("dnslib").setLevel(logging.WARNING)
