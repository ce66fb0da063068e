"""The lease record: one JSON line per acquire, release or loss, appended atomically.

Format (one object per line; unknown keys may be added later and must be ignored by readers)::

    {"event": "acquire", "service": "refiner", "holder": "pod-a", "gpu": "gpu-0",
     "token": 7, "t_mono": 12345.678901, "t_wall": 1732550000.123456, "pid": 4242}

- ``event``: ``acquire`` (written *after* the lease is held), ``release`` (written *before* it is
  given up) or ``lost`` (a held lease was lost; the holder's GPU work stops at its next step, and a
  ``release`` follows once it has). So the interval acquire→release of one holder encloses all of
  its GPU work, and two holders' intervals may be compared directly.
- ``t_mono``: ``time.monotonic()`` seconds. On Linux this is ``CLOCK_MONOTONIC``, one clock for
  every process on the host, so records from several processes on one host compare exactly.
- ``t_wall``: ``time.time()`` seconds, for people; never used for ordering.
- ``token``: the fencing token of the acquisition (null only where none was known).

Several processes may append to the same file: the file is opened with ``O_APPEND`` and each line
is written with a single ``write(2)``, which the kernel appends atomically on a local filesystem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

EVENTS = ("acquire", "release", "lost")


class LeaseRecorder:
    """Appends lease events to a JSONL file; safe across threads and processes."""

    def __init__(self, path: Path | str, *, backend: str = "") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._backend = backend
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                       0o644)
        self._warned = False

    def record(self, event: str, *, service: str, holder: str, gpu: str, token: int | None,
               **extra: object) -> None:
        """Append one event; an I/O error is logged once and never raised (records are evidence,
        not a reason to stop serving)."""
        if event not in EVENTS:
            raise ValueError(f"unknown lease event {event!r}; expected one of {EVENTS}")
        entry: dict[str, Any] = {
            "event": event, "service": service, "holder": holder, "gpu": gpu, "token": token,
            "t_mono": time.monotonic(), "t_wall": time.time(), "pid": os.getpid(),
        }
        if self._backend:
            entry["backend"] = self._backend
        entry.update(extra)
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            if self._fd is None:
                return
            try:
                written = os.write(self._fd, line)  # one write: atomic with O_APPEND
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
            except OSError as exc:
                if not self._warned:
                    _log.warning("cannot append to lease record %s: %s", self.path, exc)
                    self._warned = True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def read_records(*paths: Path | str) -> list[dict[str, Any]]:
    """All records from ``paths``, ordered by ``t_mono`` (convenience for tests and tools)."""
    out: list[dict[str, Any]] = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            out.extend(json.loads(line) for line in fh if line.strip())
    out.sort(key=lambda r: float(r["t_mono"]))
    return out
