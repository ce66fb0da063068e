"""Logging with the request id on every line, the Prometheus metrics every service exports, and thread names the
operating system shows."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from trellisbox._domain.kinds import Stage

LogFormat = Literal["plain", "json"]

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: The pipeline stage a log line is written in: a model service's job sets its current stage (``queued`` while it
#: waits for the GPU, then each ``Stage`` label it reports progress in); the gateway the stage it calls (``refine``,
#: ``image_to_3d``). "-" outside one.
STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("stage", default="-")
#: The current trace and span ids (hex), or None outside a traced call; set by :func:`configure_logging`.
TraceIds = Callable[[], tuple[str, str] | None]

REQUESTS = Counter(
    "trellisbox_requests_total", "Finished RPCs by method and status code.", ["service", "method", "code"]
)
STAGE_SECONDS = Histogram(
    "trellisbox_stage_seconds",
    "Wall time per pipeline stage.",
    ["service", "stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
)
QUEUE_DEPTH = Gauge("trellisbox_queue_depth", "Jobs waiting for the model worker (a dynamic batch is one job); at the "
                    "gateway, requests waiting for a slot.", ["service"])
REQUESTS_OUTSTANDING = Gauge(
    "trellisbox_requests_outstanding", "Requests a model service has accepted and not finished (waiting or running; "
    "each request of a dynamic batch counts): the autoscaling signal.", ["service"])
IMAGES_OUTSTANDING = Gauge("trellisbox_images_outstanding", "Images of the outstanding requests.", ["service"])
IN_FLIGHT = Gauge("trellisbox_in_flight", "Jobs the model worker runs now (0 or 1); at the gateway, requests being "
                  "routed.", ["service"])


@contextlib.contextmanager
def outstanding(service: str, images: int) -> Iterator[None]:
    """Count one request (and its images) as outstanding for the body: accepted, waiting or running."""
    REQUESTS_OUTSTANDING.labels(service).inc()
    IMAGES_OUTSTANDING.labels(service).inc(images)
    try:
        yield
    finally:
        REQUESTS_OUTSTANDING.labels(service).dec()
        IMAGES_OUTSTANDING.labels(service).dec(images)


def observe_stages(service: str, timings: Mapping[Stage, float]) -> None:
    """Record each stage's wall time in ``trellisbox_stage_seconds``."""
    for stage, seconds in timings.items():
        STAGE_SECONDS.labels(service, stage.label).observe(seconds)


class _ContextFilter(logging.Filter):
    """Puts the request id, the stage and (when tracing is on) the trace and span ids on every record."""

    def __init__(self, trace_ids: TraceIds | None) -> None:
        super().__init__()
        self._trace_ids = trace_ids

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.stage = STAGE.get()
        ids = self._trace_ids() if self._trace_ids is not None else None
        record.trace_id, record.span_id = ids if ids is not None else ("", "")
        record.trace = f" trace={ids[0]}" if ids is not None else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines: time, level, service, request id, stage, logger, message (and
    the trace and span ids inside a traced call, the exception's traceback when there is one)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "request_id": getattr(record, "request_id", "-"),
            "stage": getattr(record, "stage", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            entry["trace_id"] = trace_id
            entry["span_id"] = getattr(record, "span_id", "")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(service: str, level: str = "INFO", fmt: LogFormat = "plain",
                      trace_ids: TraceIds | None = None) -> None:
    """One log format for every service: ``plain`` (time, service, level, request id, message: for a terminal) or
    ``json`` (one object per line). With ``trace_ids`` (tracing on), lines written inside a traced call carry the
    trace id (plain: ``[request-id trace=<32 hex>]``; json: ``trace_id`` and ``span_id``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter(trace_ids))
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter(service)
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(
            f"%(asctime)s {service} %(levelname)s [%(request_id)s%(trace)s] %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.captureWarnings(True)  # Python warnings too, in the same format, not raw text on stderr
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def start_metrics_server(port: int, host: str) -> None:
    """Serve /metrics on ``host:port`` (the service's own bind address; no-op when the port is 0)."""
    if port:
        start_http_server(port, addr=host.strip("[]"))  # "[::]" is how gRPC spells it; http.server wants "::"


_PR_SET_NAME = 15  # prctl(2)
#: The process's own symbols, the C library's among them, to name threads (Linux); None elsewhere, where threads keep
#: the name the system gives them.
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def name_os_thread() -> None:
    """Give the calling thread its Python name at the operating system's level too (its first 15 bytes), so that
    ``top -H``, ``ps -L``, ``perf`` and ``/proc/<pid>/task/*/comm`` tell the model thread and the encoding threads
    apart (Python leaves every thread named after the process). A ``ThreadPoolExecutor`` initializer."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)
