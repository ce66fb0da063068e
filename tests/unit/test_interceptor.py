"""The one error mapping: a real aio server on loopback with the interceptor, and handlers that fail in every way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from trellisbox._domain.errors import InvalidInput, ModelUnavailable, StageFailed
from trellisbox._runtime.interceptor import ErrorInterceptor
from trellisbox._runtime.observability import REQUESTS
from trellisbox.v1 import common_pb2

METHOD = "/test.Echo/Stream"


async def stream(request: common_pb2.Image, context: grpc.aio.ServicerContext[Any, Any]
                 ) -> AsyncIterator[common_pb2.Progress]:
    yield common_pb2.Progress(step=1, message="started")
    what = request.media_type
    if what == "invalid":
        raise InvalidInput("images[0] is not an image")
    if what == "model":
        raise ModelUnavailable("no weights here")
    if what == "stage":
        raise StageFailed("refiner", "UNAVAILABLE", "Stream removed")
    if what == "bug":
        raise RuntimeError("secret internals")
    if what == "slow":
        await asyncio.sleep(30)
    yield common_pb2.Progress(step=2, message="done")


async def call(data: bytes, deadline_s: float = 10, cancel_after_s: float | None = None
               ) -> tuple[list[bytes], grpc.StatusCode, str]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    handler = grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=common_pb2.Image.FromString,
        response_serializer=common_pb2.Progress.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Stream": handler}),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # Raw bytes in and out: the request may be anything a client sends.
            rpc = channel.unary_stream(METHOD, None, None)
            received: list[bytes] = []
            ongoing = rpc(data, timeout=deadline_s)
            if cancel_after_s is not None:
                asyncio.get_running_loop().call_later(cancel_after_s, ongoing.cancel)
            try:
                async for message in ongoing:
                    received.append(message)
            except grpc.aio.AioRpcError as exc:
                return received, exc.code(), exc.details() or ""
            except asyncio.CancelledError:
                await asyncio.sleep(0.5)  # the server hears of it
                return received, grpc.StatusCode.CANCELLED, ""
            # Health (a handler that writes with context.write) still works through the interceptor.
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
            first = await watch.read()
            watch.cancel()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(0.5)  # the server hears of it
            return received, grpc.StatusCode.OK, ""
    finally:
        await server.stop(None)


def count(code: str) -> float:
    return REQUESTS.labels("Echo", "Stream", code)._value.get()


@pytest.mark.parametrize(("what", "code", "details"), [
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "images[0] is not an image"),
    ("model", grpc.StatusCode.FAILED_PRECONDITION, "no weights here"),
    ("stage", grpc.StatusCode.UNAVAILABLE, "refiner: Stream removed"),
    ("bug", grpc.StatusCode.INTERNAL, "internal error (RuntimeError); see the service log"),
    ("fine", grpc.StatusCode.OK, ""),
])
def test_typed_errors_become_their_status(what: str, code: grpc.StatusCode, details: str) -> None:
    before = count(code.name)
    received, got, message = asyncio.run(call(common_pb2.Image(media_type=what).SerializeToString()))
    assert (got, message) == (code, details)
    assert "secret" not in message
    assert len(received) == (2 if code == grpc.StatusCode.OK else 1)  # what was sent before the error arrived
    assert count(code.name) == before + 1


def test_calls_cut_short_are_counted_as_their_callers_saw_them() -> None:
    """A deadline that passed is DEADLINE_EXCEEDED, not CANCELLED; a caller that cancelled is CANCELLED; a health
    watch, which only ever ends by its caller leaving, is OK (or the error rate rises with every reconnect)."""
    slow = common_pb2.Image(media_type="slow").SerializeToString()
    watches = REQUESTS.labels("Health", "Watch", "OK")._value.get()
    unwatched = REQUESTS.labels("Health", "Watch", "CANCELLED")._value.get()
    before = {code: count(code) for code in ("DEADLINE_EXCEEDED", "CANCELLED")}
    _, got, _ = asyncio.run(call(slow, deadline_s=0.5))
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.5)
    assert (count("DEADLINE_EXCEEDED"), count("CANCELLED")) == (before["DEADLINE_EXCEEDED"] + 1, before["CANCELLED"])
    _, got, _ = asyncio.run(call(slow, cancel_after_s=0.3))
    assert got == grpc.StatusCode.CANCELLED
    assert (count("DEADLINE_EXCEEDED"), count("CANCELLED")) == (before["DEADLINE_EXCEEDED"] + 1,
                                                                before["CANCELLED"] + 1)
    asyncio.run(call(common_pb2.Image(media_type="fine").SerializeToString()))
    assert REQUESTS.labels("Health", "Watch", "OK")._value.get() == watches + 1
    assert REQUESTS.labels("Health", "Watch", "CANCELLED")._value.get() == unwatched


@pytest.mark.parametrize("data", [b"\x0a\xff", b"\x12\x05ab", b"\xff\xff\xff", b"\x12\x02\xff\xfe"])
def test_a_request_that_does_not_parse_is_invalid_argument(data: bytes) -> None:
    before = count("INVALID_ARGUMENT")
    received, code, details = asyncio.run(call(data))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and received == []
    assert details.startswith("the request is not a valid trellisbox.v1.Image")
    assert count("INVALID_ARGUMENT") == before + 1


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_answers_as_v1_and_v1alpha(service: str) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    from trellisbox._runtime.server import enable_reflection

    async def main() -> list[str]:
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        enable_reflection(("trellisbox.v1.RefinerService",), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                rpc = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                call = rpc(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
                response: Any = await call.read()
                return [s.name for s in response.list_services_response.service]
        finally:
            await server.stop(None)

    names = asyncio.run(main())
    assert "trellisbox.v1.RefinerService" in names and "grpc.reflection.v1.ServerReflection" in names
