"""Typed service errors and the one place where they become gRPC status codes.

Backends and domain code raise these; servicers never pick status codes themselves. The mapping is
applied by :func:`error_boundary`, which every streaming handler in every service goes through.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from functools import wraps
from typing import Any, ClassVar, TypeVar

import grpc

_log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base class: an error whose message is safe and useful to show to the caller."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL


class InvalidInput(ServiceError):
    """The request is wrong (bad image, out-of-range parameter); retrying it unchanged cannot help."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class QueueFull(ServiceError):
    """Admission refused: the bounded queue is full. Retry later or on another replica."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """The service is draining, still loading, or a downstream stage is unreachable."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    """The caller cancelled; the work was stopped."""

    code = grpc.StatusCode.CANCELLED


class ModelUnavailable(ServiceError):
    """The configured model cannot run here (missing weights, CUDA or extensions)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StageFailed(ServiceError):
    """A downstream stage failed; carries its status code through the gateway unchanged."""

    def __init__(self, stage: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{stage}: {details}")
        self.stage = stage
        self.status_code = code


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for ``exc``."""
    if isinstance(exc, StageFailed):
        return exc.status_code, str(exc)
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the service log"


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Handler = Callable[[Any, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_Resp]]


def error_boundary(handler: _Handler[_Req, _Resp]) -> _Handler[_Req, _Resp]:
    """Wrap a server-streaming handler so that any exception ends the call with the mapped status."""

    @wraps(handler)
    async def wrapped(
        self: Any, request: _Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_Resp]:
        try:
            async for response in handler(self, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the one place where errors become statuses
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                _log.exception("unhandled error in %s", handler.__qualname__)
            else:
                _log.info("%s ended with %s: %s", handler.__qualname__, code.name, message)
            await context.abort(code, message)

    return wrapped
