"""What every servicer does the same way: name the request, decode its images off the event loop, read its
deadline, relay a job's progress, and encode its outputs off the event loop and off the model thread.

Servicers convert protobuf to domain objects and back; nothing here chooses a status code (the
interceptor does), and nothing here runs a model.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Generic, TypeVar

import grpc
from PIL import Image

from trellisbox._domain.artifacts import Artifact
from trellisbox._domain.convert import check_images, decode_images, progress_to_proto
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.imaging import header_pixels
from trellisbox._runtime import tracing
from trellisbox._runtime.config import ServiceSettings
from trellisbox._runtime.observability import REQUEST_ID, name_os_thread
from trellisbox._runtime.worker import Finished, ProgressEvent
from trellisbox.v1 import common_pb2

T = TypeVar("T")

MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]+\Z")


def bind_request_id(given: str) -> str:
    """The request's id (``given``, or a new one when empty), set for every log line of this call.

    Raises:
        InvalidInput: ``given`` is too long or has characters outside ``A-Z a-z 0-9 . _ : -`` (it is written
            to logs and metrics, so it must not be able to forge or flood them).
    """
    if not given:
        request_id = uuid.uuid4().hex[:16]
    elif len(given) <= MAX_REQUEST_ID_CHARS and _REQUEST_ID.match(given):
        request_id = given
    else:
        raise InvalidInput(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} characters from A-Z a-z 0-9 . _ : - "
                           f"(got {len(given)} characters)")
    REQUEST_ID.set(request_id)  # this RPC's task only: contextvars are per task
    tracing.tag_request(request_id)
    return request_id


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The caller's deadline as ``time.monotonic()`` seconds, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


#: Image work on at most this many pixels in all runs on the event loop: decoding a request's images (read from their
#: headers; also at most _INLINE_BYTES encoded, the bound under which the gateway checks a request's images on the
#: loop too) and writing the refined images' hand-off form. That is up to ~10 ms,
#: against the ~1 ms a hand-off to a thread and back costs on a loaded host (measured: a 512² PNG took 3-6 ms
#: through a thread, 2.6 ms inline). Larger work goes to a thread, so the loop never stalls long on one request.
INLINE_PIXELS = 1024 * 1024
_INLINE_BYTES = 2**20


async def decode_request_images(images: Sequence[common_pb2.Image], settings: ServiceSettings, *,
                                handoff: bool = False, field: str = "images") -> list[Image.Image]:
    """Decode (and so validate) a request's images: small ones on the event loop, others in a thread, so other calls
    and health checks stay responsive meanwhile. ``handoff``: also accept the refiner's hand-off format (TRELLIS);
    ``field``: the request field errors name."""
    decode = partial(decode_images, images, settings.image_limits, settings.max_images, handoff=handoff, field=field)
    # ByteSize first: reading ``image.data`` copies the bytes, which is cheap only for small images.
    if (sum(image.ByteSize() for image in images) <= _INLINE_BYTES
            and sum(header_pixels(image.data) for image in images) <= INLINE_PIXELS):
        return decode()
    return await asyncio.to_thread(decode)


async def check_request_images(images: Sequence[common_pb2.Image], settings: ServiceSettings, size: int) -> None:
    """Check a request's images without decoding them (:func:`~trellisbox._domain.imaging.check_image`): for a
    service that only forwards the caller's bytes (the gateway). ``size``: the request's bytes."""
    check = partial(check_images, images, settings.image_limits, settings.max_images)
    if size <= _INLINE_BYTES:  # headers and PNG checksums, ~0.4 ms per MiB: less than a thread hand-off below that
        check()
    else:
        await asyncio.to_thread(check)


def passthrough_serializer(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A response serializer that sends events already in wire form (``bytes``, e.g. :meth:`Artifact.frames`) as
    they are and serializes messages with ``serialize``."""

    def serializer(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serializer


def add_streaming_servicer(server: grpc.aio.Server, service: str,
                           methods: Mapping[str, tuple[Callable[..., AsyncIterator[Any]], Any]],
                           response_type: Any) -> None:
    """Register a service's server-streaming methods (name: handler and request message class) like a generated
    ``add_..._to_server`` does, with a response serializer that sends pre-encoded events (``bytes``, e.g.
    :meth:`Artifact.frames`) as they are and serializes ``response_type`` messages."""
    serializer = passthrough_serializer(response_type.SerializeToString)
    handlers = {
        method: grpc.unary_stream_rpc_method_handler(
            handler, request_deserializer=request_type.FromString, response_serializer=serializer)
        for method, (handler, request_type) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]  # stubs lag


class JobEvents(Generic[T]):
    """A job's stream (from the model worker or the refiner's batcher): progress as proto, then its result.

    Usage::

        job = JobEvents(host.worker.run(fn, request_id=..., deadline=...))
        async for progress in job.progress():
            yield Response(progress=progress)
        finished = job.finished
    """

    def __init__(self, events: AsyncIterator[ProgressEvent | Finished[T]]) -> None:
        self._events = events
        self._finished: Finished[T] | None = None

    async def progress(self) -> AsyncIterator[common_pb2.Progress]:
        async for event in self._events:
            if isinstance(event, Finished):
                self._finished = event
            else:
                yield progress_to_proto(event.stage, event.step, event.total, event.message)

    @property
    def finished(self) -> Finished[T]:
        if self._finished is None:  # the worker always ends with Finished or raises
            raise RuntimeError("the model worker ended without a result")
        return self._finished


#: The threads that encode outputs (PNG, TIFF, GLB, PLY): off the event loop, and off the model thread, which can start
#: the next job meanwhile.
_ENCODERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="encode", initializer=name_os_thread)


def start_encoding(encode: Callable[[], list[Artifact]]) -> Future[tuple[list[Artifact], float]]:
    """Start an output encoder in an encoding thread; the future gives the artifacts, hashed, and the seconds encoding
    and hashing took. Callable from any thread: a model job calls it as it returns, so encoding does not wait for the
    event loop to hear that the job finished (about a millisecond on a loaded host).

    The SHA-256 the last chunk carries is computed here rather than as the chunks are sent: the event loop, which
    every call of the service shares, then spends on an artifact only what sending it costs (0.67 ms less per MiB
    on it; docs/benchmarks.md)."""
    return _ENCODERS.submit(contextvars.copy_context().run, _encoded, encode)  # log lines keep the request id


async def encode_outputs(encode: Callable[[], list[Artifact]], *, inline: bool = False
                         ) -> tuple[list[Artifact], float]:
    """Run an output encoder and hash its artifacts; returns them and the seconds it took. In an encoding thread
    (:func:`start_encoding`): neither the event loop nor the model thread waits for it; or, with ``inline``, on the
    event loop, for an encoder that only copies pixels out (the hand-off form of at most :data:`INLINE_PIXELS`),
    which costs less than the trip to a thread and back."""
    if inline:
        return _encoded(encode)
    return await asyncio.wrap_future(start_encoding(encode))


def _encoded(encode: Callable[[], list[Artifact]]) -> tuple[list[Artifact], float]:
    started = time.perf_counter()
    artifacts = encode()
    for artifact in artifacts:
        artifact.sha256  # noqa: B018 - hashed once, while the bytes are fresh: sending them is then all that is left
    return artifacts, time.perf_counter() - started
