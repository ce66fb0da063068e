"""Typed errors: what went wrong, in words the caller can act on.

Backends, the domain and the servicers raise these; none of them picks a status code. Each class names
its canonical status code (the gRPC code names, which HTTP gateways share), and the one server
interceptor (:mod:`trellisbox._runtime.interceptor`) turns it into the gRPC status of the call.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: an error whose message is safe and useful to show to the caller.

    Args:
        message: What went wrong, in words the caller can act on.
        retry_after_s: When retrying later can help: how long to wait (sent as gRPC's retry pushback).
    """

    #: Canonical status code name, e.g. ``"INVALID_ARGUMENT"``.
    code: str = "INTERNAL"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidInput(ServiceError):
    """The request is wrong (bad image, out-of-range parameter); retrying it unchanged cannot help."""

    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    """What the request names does not exist (e.g. no job or stored result with this request id)."""

    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    """The request id is taken by a different request."""

    code = "ALREADY_EXISTS"


class QueueFull(ServiceError):
    """Admission refused: the bounded queue is full. Retry later or on another replica."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    """The service is draining, still loading, or a downstream stage is unreachable."""

    code = "UNAVAILABLE"


class Unauthenticated(ServiceError):
    """The call carries no valid credentials (a bearer token); the message never repeats what was sent."""

    code = "UNAUTHENTICATED"


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work finished."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    """The caller cancelled; the work was stopped."""

    code = "CANCELLED"


class ModelUnavailable(ServiceError):
    """The configured model cannot run here (missing weights, CUDA or extensions)."""

    code = "FAILED_PRECONDITION"


class StageFailed(ServiceError):
    """A downstream stage failed; the gateway passes its status code on unchanged, naming the stage.

    Args:
        stage: ``"refiner"`` or ``"trellis"``.
        code: The stage's status code name.
        details: The stage's message.
    """

    def __init__(self, stage: str, code: str, details: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{stage}: {details}", retry_after_s=retry_after_s)
        self.stage = stage
        self.code = code
