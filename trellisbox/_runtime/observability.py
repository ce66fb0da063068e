"""Logging with the request id on every line, and the Prometheus metrics every service exports."""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from trellisbox._domain.kinds import Stage

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

REQUESTS = Counter(
    "trellisbox_requests_total", "Finished RPCs by method and status code.", ["service", "method", "code"]
)
STAGE_SECONDS = Histogram(
    "trellisbox_stage_seconds",
    "Wall time per pipeline stage.",
    ["service", "stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
)
QUEUE_DEPTH = Gauge("trellisbox_queue_depth", "Requests waiting for the model worker.", ["service"])
IN_FLIGHT = Gauge("trellisbox_in_flight", "Requests the model worker is running now (0 or 1).", ["service"])


def observe_stages(service: str, timings: Mapping[Stage, float]) -> None:
    """Record each stage's wall time in ``trellisbox_stage_seconds``."""
    for stage, seconds in timings.items():
        STAGE_SECONDS.labels(service, stage.label).observe(seconds)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging(service: str, level: str = "INFO") -> None:
    """One log format for every service: time, service, level, request id, message."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {service} %(levelname)s [%(request_id)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def start_metrics_server(port: int, host: str) -> None:
    """Serve /metrics on ``host:port`` (the service's own bind address; no-op when the port is 0)."""
    if port:
        start_http_server(port, addr=host.strip("[]"))  # "[::]" is how gRPC spells it; http.server wants "::"
