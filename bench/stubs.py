"""Stand-in servers for the benchmarks, run as processes: ``python -m bench.stubs --mode trellis|bare``.

``trellis``: a TrellisService that returns a fixed artifact of ``--artifact-bytes`` at once, through the
    project's own server bootstrap and ``Artifact.frames`` (what the real servicer does after its model
    ran). Used where the real preview backend's CPU time would be what is measured instead of the
    gateway (refiner scaling, gateway memory).
``bare``: the transport baseline. A plain ``grpc.aio.server()`` with default options that serves
    ``GatewayService/Generate`` by writing the bytes of ``--file`` as pre-encoded ``GenerateResponse``
    chunk messages, ``--chunk-bytes`` each: no validation, no stage, no protobuf work per request. It serves
    the same messages as ``TrellisService/ImageTo3D`` too, so a ``relay`` can stand in front of it.
``relay``: the least a relay can do: ``GatewayService/Generate`` forwards ``--upstream``'s
    ``TrellisService/ImageTo3D`` messages as raw bytes, with ``--grpc-args`` (JSON list of [name, value])
    on both its channel and its server. The benchmarks put it in front of ``bare``: two hops with nothing but
    gRPC on them, the reference the served path is measured against; experiments use it to vary transport arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from trellis_service.servicer import add_trellis_servicer
from trellisbox._domain.artifacts import Artifact
from trellisbox._domain.contract import GATEWAY_SERVICE, TRELLIS_SERVICE
from trellisbox._runtime.config import ServiceSettings
from trellisbox._runtime.server import ServiceSpec, serve
from trellisbox.v1 import common_pb2, gateway_pb2, trellis_pb2


def payload(size: int) -> bytes:
    """Deterministic, incompressible bytes (a GLB with a noisy texture compresses about as badly)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "little")).digest() * 64
        counter += 1
    return bytes(out[:size])


class StubTrellis:
    def __init__(self, artifact_bytes: int, chunk_bytes: int) -> None:
        self._artifact = Artifact(common_pb2.ARTIFACT_KIND_GLB, payload(artifact_bytes))
        self._chunk_bytes = chunk_bytes

    async def ImageTo3D(self, request: trellis_pb2.ImageTo3DRequest,
                        context: grpc.aio.ServicerContext[Any, Any]
                        ) -> AsyncIterator[trellis_pb2.ImageTo3DResponse | bytes]:
        yield trellis_pb2.ImageTo3DResponse(progress=common_pb2.Progress(stage=common_pb2.STAGE_EXPORT, step=1,
                                                                         total=1, message="stub"))
        for frame in self._artifact.frames(self._chunk_bytes):
            yield frame
        yield trellis_pb2.ImageTo3DResponse(done=trellis_pb2.ImageTo3DDone(seed=0, backend="stub", device="none"))

    async def RefineGaussians(self, request: trellis_pb2.RefineGaussiansRequest,
                              context: grpc.aio.ServicerContext[Any, Any]
                              ) -> AsyncIterator[trellis_pb2.ImageTo3DResponse | bytes]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the stub TRELLIS serves ImageTo3D only")
        yield b""  # never reached: makes this the async generator the handler expects


def serve_trellis(host: str, port: int, artifact_bytes: int, chunk_bytes: int) -> None:
    settings = ServiceSettings(host=host, port=port, max_queue=1024, grace_s=0.5)
    servicer = StubTrellis(artifact_bytes, chunk_bytes)

    def register(server: grpc.aio.Server) -> None:
        add_trellis_servicer(servicer, server)

    asyncio.run(serve(settings, ServiceSpec(name=TRELLIS_SERVICE, register=register)))


def gateway_malloc() -> str:
    """The gateway's allocator settings (``trellisbox._runtime.allocator.tune_malloc``), where this tree has them."""
    try:
        from trellisbox._runtime.allocator import tune_malloc
    except ImportError:  # a tree from before the tuning: glibc's defaults, like its gateway
        return "malloc: default"
    return tune_malloc()


async def _serve_raw_generate(host: str, port: int,
                              generate: Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]],
                              grpc_args: list[tuple[str, Any]] | None = None,
                              also_image_to_3d: bool = False) -> None:
    """A bare grpcio server (none of the project's bootstrap) whose ``GatewayService/Generate`` yields raw
    frames: the baseline of the transport benchmark and the relay of the grpc-args experiment;
    ``also_image_to_3d``: ``TrellisService/ImageTo3D`` yields the same (an upstream for a relay)."""
    method = grpc.unary_stream_rpc_method_handler(generate, request_deserializer=lambda b: b,
                                                  response_serializer=lambda b: b)
    handlers = [grpc.method_handlers_generic_handler(GATEWAY_SERVICE, {"Generate": method})]
    if also_image_to_3d:
        handlers.append(grpc.method_handlers_generic_handler(TRELLIS_SERVICE, {"ImageTo3D": method}))
    server = grpc.aio.server(options=grpc_args or [])
    server.add_generic_rpc_handlers(handlers)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await health.set(GATEWAY_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    if also_image_to_3d:  # a gateway in front of it asks before routing
        await health.set(TRELLIS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


def _legacy(chunk: common_pb2.ArtifactChunk) -> common_pb2.ArtifactChunk:
    """The chunk as a server older than the ``crc32c`` field sent it."""
    chunk.ClearField("crc32c")
    return chunk


async def _serve_bare(host: str, port: int, files: list[Path], chunk_bytes: int, progress: int = 0,
                      legacy: bool = False) -> None:
    kinds = (common_pb2.ARTIFACT_KIND_GLB, common_pb2.ARTIFACT_KIND_GAUSSIAN_PLY)
    frames = [
        gateway_pb2.GenerateResponse(progress=common_pb2.Progress(stage=common_pb2.STAGE_SLAT, step=step,
                                                                  total=progress, message="bare")).SerializeToString()
        for step in range(1, progress + 1)
    ] + [
        gateway_pb2.GenerateResponse(chunk=_legacy(chunk) if legacy else chunk).SerializeToString()
        for kind, path in zip(kinds, files, strict=False)
        for chunk in Artifact(kind, path.read_bytes()).chunks(chunk_bytes)
    ]
    frames.append(gateway_pb2.GenerateResponse(done=gateway_pb2.GenerateDone(request_id="bare")).SerializeToString())

    async def generate(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        for frame in frames:
            yield frame

    await _serve_raw_generate(host, port, generate, also_image_to_3d=True)


async def _serve_relay(host: str, port: int, upstream: str, grpc_args: list[tuple[str, Any]],
                       forward_request: bool = False) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=grpc_args)
    image_to_3d = channel.unary_stream(f"/{TRELLIS_SERVICE}/ImageTo3D", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)

    async def generate(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        async for message in image_to_3d(request if forward_request else b"", timeout=120):
            yield message

    await _serve_raw_generate(host, port, generate, grpc_args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("trellis", "bare", "relay"), required=True)
    parser.add_argument("--upstream", help="relay: the TrellisService target")
    parser.add_argument("--grpc-args", default="[]", help="relay: JSON list of [name, value] channel arguments")
    parser.add_argument("--artifact-bytes", type=int, default=8 * 2**20)
    parser.add_argument("--chunk-bytes", type=int, default=2**20)
    parser.add_argument("--file", type=Path, nargs="+", help="bare: GLB (and PLY) whose bytes it streams")
    parser.add_argument("--progress", type=int, default=0, help="bare: progress events sent before the artifacts")
    parser.add_argument("--legacy-chunks", action="store_true",
                        help="bare: chunks without their CRC-32C, as servers older than that field send them")
    parser.add_argument("--forward-request", action="store_true",
                        help="relay: send the request's bytes upstream as they came (else an empty request)")
    args = parser.parse_args()
    if args.mode == "relay":
        gateway_malloc()  # it stands in for the gateway
        asyncio.run(_serve_relay(args.host, args.port, args.upstream,
                                 [(name, value) for name, value in json.loads(args.grpc_args)],
                                 args.forward_request))
    elif args.mode == "trellis":
        serve_trellis(args.host, args.port, args.artifact_bytes, args.chunk_bytes)
    else:
        if args.file is None:
            parser.error("--mode bare needs --file")
        asyncio.run(_serve_bare(args.host, args.port, args.file, args.chunk_bytes, args.progress,
                                args.legacy_chunks))


if __name__ == "__main__":
    main()
