"""The one place where errors become gRPC status codes: a server interceptor around every RPC.

As in text-generation-inference's ``ExceptionInterceptor``, the mapping wraps every method handler the
server registers, so a new RPC cannot forget it:

- a request that does not parse is ``INVALID_ARGUMENT`` naming the message type (gRPC's default would be
  ``UNKNOWN`` "Unexpected DecodeError");
- a :class:`~trellisbox._domain.errors.ServiceError` ends the call with its code and message;
- a downstream ``AioRpcError`` keeps its code and details;
- anything else is ``INTERNAL`` with a generic message (the traceback goes to the log, never to the caller);
- an error that says when a retry can help (``retry_after_s``: a full queue) sends ``grpc-retry-pushback-ms``.

It also counts every finished call in ``trellisbox_requests_total{service,method,code}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from trellisbox._domain.errors import InvalidInput, ServiceError
from trellisbox._runtime.observability import REQUESTS

_log = logging.getLogger(__name__)

#: Trailing metadata a server sends to tell a client's retry policy when to retry (gRPC's A6 design).
PUSHBACK_KEY = "grpc-retry-pushback-ms"

Context = grpc.aio.ServicerContext[Any, Any]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for ``exc``."""
    if isinstance(exc, ServiceError):
        return grpc.StatusCode[exc.code], str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the service log"


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it with a status."""

    error: InvalidInput


def _undecodable(message_type: str, exc: Exception) -> InvalidInput:
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return InvalidInput(f"the request is not a valid {message_type}: {reason}")


_DECODE_ERRORS = (DecodeError, UnicodeDecodeError, ValueError)
M = TypeVar("M", bound=Message)


def parse_request(message_type: type[M], data: bytes) -> M:
    """``data`` parsed as ``message_type``, for a handler that reads its request itself (a request stream).

    Raises:
        InvalidInput: the bytes do not parse.
    """
    try:
        return message_type.FromString(data)
    except _DECODE_ERRORS as exc:
        raise _undecodable(message_type.DESCRIPTOR.full_name, exc) from None


def _tolerant(deserializer: Callable[[bytes], Any] | None, message_type: str) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except _DECODE_ERRORS as exc:
            return _Undecodable(_undecodable(message_type, exc))

    return deserialize


def _forget_frames(exc: BaseException) -> None:
    """Clear the locals of the frames ``exc`` and the exceptions it chains passed through.

    They hold the request (up to 64 MiB: the received bytes, the image a decoder was reading) and the exception
    lives on in reference cycles with grpc's call objects until the cycle collector happens to run: measured, each
    refused 30 MiB upload kept about 50 MiB of the gateway's memory that way.
    """
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]


#: Streams that only ever end by the caller cancelling them (a health watch): counted OK, or the error rate
#: (``code!="OK"``) would rise each time a gateway reconnects.
_ENDED_BY_THE_CALLER = {("Health", "Watch")}
#: A call cancelled with less than this left of its deadline ended by the deadline.
_DEADLINE_SLACK_S = 0.05


class _Call:
    """Bookkeeping of one call: its labels and how it ended."""

    def __init__(self, method: str) -> None:
        service, _, name = method.lstrip("/").partition("/")
        self.service = service.rpartition(".")[2] or service
        self.method = name

    def count(self, code: grpc.StatusCode) -> None:
        REQUESTS.labels(self.service, self.method, code.name).inc()

    def cancelled_as(self, context: Context) -> grpc.StatusCode:
        """How a call that was cancelled under its handler ended, as its caller saw it."""
        if (self.service, self.method) in _ENDED_BY_THE_CALLER:
            return grpc.StatusCode.OK  # a watch has no end of its own: the caller leaving is how it ends
        remaining = context.time_remaining()
        if remaining is not None and remaining < _DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    async def fail(self, exc: BaseException, context: Context) -> None:
        code, message = status_for(exc)
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:  # gRPC clients with a retry policy wait this long, then retry by themselves
            context.set_trailing_metadata(((PUSHBACK_KEY, str(round(retry_after_s * 1000))),))
        if code == grpc.StatusCode.INTERNAL:
            _log.error("unhandled error in %s/%s", self.service, self.method, exc_info=exc)
        else:
            _log.info("%s/%s ended with %s: %s", self.service, self.method, code.name, message)
        self.count(code)
        _forget_frames(exc)
        await context.abort(code, message)

    @contextlib.asynccontextmanager
    async def outcome(self, request: Any, context: Context) -> AsyncIterator[None]:
        """Around the handler: refuse an undecodable request, map what it raises, count how it ended."""
        try:
            if isinstance(request, _Undecodable):
                raise request.error
            yield
        except grpc.aio.AbortError:  # the handler (or a library it calls) chose the status itself
            self.count(context.code() or grpc.StatusCode.UNKNOWN)
            raise
        except asyncio.CancelledError:  # the caller went away, or its deadline passed
            self.count(self.cancelled_as(context))
            raise
        except Exception as exc:
            await self.fail(exc, context)
        else:
            self.count(grpc.StatusCode.OK)


if TYPE_CHECKING:  # generic in the stubs only
    Handler = grpc.RpcMethodHandler[Any, Any]
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    ServerInterceptor = grpc.aio.ServerInterceptor


class ErrorInterceptor(ServerInterceptor):
    """Maps errors to status codes and counts calls, for every method of every service on the server."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: UNIMPLEMENTED
        call = _Call(handler_call_details.method)
        # The concrete handlers are namedtuples; an aio server's behaviours are coroutine functions.
        behaviours: Any = handler
        if handler.request_streaming:
            # A handler that reads its requests itself (the gateway's Generate, reflection) parses them with
            # parse_request, or uses its library's own deserializer.
            if handler.response_streaming and inspect.isasyncgenfunction(behaviours.stream_stream):
                return behaviours._replace(stream_stream=_streaming(call, behaviours.stream_stream))  # type: ignore[no-any-return]
            return handler
        deserializer = _tolerant(handler.request_deserializer, _request_type(handler))
        if handler.response_streaming:
            stream = behaviours.unary_stream
            # Streaming handlers either yield (this project's servicers) or await context.write() (grpcio's own
            # health Watch): keep each in its own style.
            wrapped = _streaming(call, stream) if inspect.isasyncgenfunction(stream) else _unary(call, stream)
            return behaviours._replace(  # type: ignore[no-any-return]
                unary_stream=wrapped, request_deserializer=deserializer)
        return behaviours._replace(  # type: ignore[no-any-return]
            unary_unary=_unary(call, behaviours.unary_unary), request_deserializer=deserializer)


def _request_type(handler: Handler) -> str:
    owner = getattr(handler.request_deserializer, "__self__", None)  # Message.FromString is a classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


def _streaming(call: _Call, behavior: Callable[[Any, Context], AsyncIterator[Any]]
               ) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
        async with call.outcome(request, context):
            async for response in behavior(request, context):
                yield response

    return wrapped


def _unary(call: _Call, behavior: Callable[[Any, Context], Awaitable[Any]]
           ) -> Callable[[Any, Context], Awaitable[Any]]:
    async def wrapped(request: Any, context: Context) -> Any:
        async with call.outcome(request, context):
            return await behavior(request, context)

    return wrapped
