"""A loopback TCP proxy for network faults: connections that can be cut, uploads or downloads at a set rate, and a
bit of the data flipped on its way."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable


class DataBitFlip:
    """Flips the lowest bit of the byte at ``offset`` of the HTTP/2 DATA payload one side sends (for gRPC: its
    messages, each behind a 5-byte prefix), leaving every frame header as it was: damage to the data that only a
    check of the data itself finds, since on loopback nothing below does (TCP's checksum is left to the NIC, and
    HTTP/2 has none)."""

    def __init__(self, offset: int) -> None:
        self._offset = offset
        self._data_seen = 0  # DATA payload bytes passed so far
        self._header = b""  # the frame header being read
        self._left = 0  # payload bytes left in the current frame
        self._is_data = False
        self.done = False

    def __call__(self, chunk: bytes) -> bytes:
        out = bytearray(chunk)
        i = 0
        while i < len(out) and not self.done:
            if self._left == 0:  # a frame header: 3 bytes of length, then type (0: DATA), flags and stream id
                piece = bytes(out[i:i + 9 - len(self._header)])
                self._header += piece
                i += len(piece)
                if len(self._header) == 9:
                    self._left, self._is_data = int.from_bytes(self._header[:3], "big"), self._header[3] == 0
                    self._header = b""
                continue
            take = min(self._left, len(out) - i)
            if self._is_data:
                if self._offset < self._data_seen + take:
                    out[i + self._offset - self._data_seen] ^= 1
                    self.done = True
                self._data_seen += take
            self._left -= take
            i += take
        return bytes(out)


class LoopbackProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``.

    Args:
        target: ``host:port`` to forward to.
        upload_bytes_per_s: Rate of the client-to-server direction (None: as fast as it goes).
        download_bytes_per_s: Rate of the server-to-client direction (None: as fast as it goes).
        flip_download_bit_at: Offset of a byte in the HTTP/2 DATA payload each connection's server sends, whose
            lowest bit is flipped on its way (:class:`DataBitFlip`); None: nothing is changed.
    """

    def __init__(self, target: str, *, upload_bytes_per_s: float | None = None,
                 download_bytes_per_s: float | None = None, flip_download_bit_at: int | None = None) -> None:
        host, port = target.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._rates = (upload_bytes_per_s, download_bytes_per_s)
        self._flip_at = flip_download_bit_at
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
            flip = None if self._flip_at is None else DataBitFlip(self._flip_at)
            threading.Thread(target=self._pipe, args=(client, upstream, upload), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, download, flip), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, rate: float | None,
              change: Callable[[bytes], bytes] | None = None) -> None:
        # Small reads when throttled, so the rate holds over short spans too.
        size = 65536 if rate is None else max(1024, int(rate / 50))
        with contextlib.suppress(OSError):
            while data := source.recv(size):
                sink.sendall(data if change is None else change(data))
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
