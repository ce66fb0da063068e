"""A loopback TCP proxy for network faults: connections that can be cut, and uploads or downloads at a set rate."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class LoopbackProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``.

    Args:
        target: ``host:port`` to forward to.
        upload_bytes_per_s: Rate of the client-to-server direction (None: as fast as it goes).
        download_bytes_per_s: Rate of the server-to-client direction (None: as fast as it goes).
    """

    def __init__(self, target: str, *, upload_bytes_per_s: float | None = None,
                 download_bytes_per_s: float | None = None) -> None:
        host, port = target.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._rates = (upload_bytes_per_s, download_bytes_per_s)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> LoopbackProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                return
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            upload, download = self._rates
            threading.Thread(target=self._pipe, args=(client, upstream, upload), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, download), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, rate: float | None) -> None:
        # Small reads when throttled, so the rate holds over short spans too.
        size = 65536 if rate is None else max(1024, int(rate / 50))
        with contextlib.suppress(OSError):
            while data := source.recv(size):
                sink.sendall(data)
                if rate is not None:
                    time.sleep(len(data) / rate)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Break every open connection, as a network failure would."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()
