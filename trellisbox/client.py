"""Python client for the gateway (public API).

    from trellisbox import TrellisBoxClient

    with TrellisBoxClient("127.0.0.1:50051") as client:
        result = client.generate(["chair.png"], refine=True, refine_params={"strength": 0.3})
        Path("chair.glb").write_bytes(result.glb)

The keys of ``refine_params`` and ``generation`` are the request parameters' names (``docs/parameters.md``);
anything left out takes the server's default.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from PIL import Image

from trellisbox._domain.artifacts import Artifact, ArtifactAssembler, read_chunk_frame
from trellisbox._domain.artifacts import ArtifactProtocolError as ArtifactProtocolError  # public: what collect raises
from trellisbox._domain.contract import GATEWAY_SERVICE
from trellisbox._domain.convert import kinds_to_proto, params_message, stage_name
from trellisbox._domain.imaging import encode_png
from trellisbox._domain.kinds import ArtifactKind
from trellisbox._domain.params import GenerationParams, RefineParams
from trellisbox._runtime.security import channel_credentials
from trellisbox.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

ImageInput = bytes | bytearray | memoryview | str | Path | Image.Image

#: The ``formats`` names the client takes.
FORMATS: dict[str, ArtifactKind] = {
    "glb": ArtifactKind.GLB,
    "ply": ArtifactKind.GAUSSIAN_PLY,
    "refined": ArtifactKind.REFINED_IMAGE,
    "novel_views": ArtifactKind.NOVEL_VIEW,
}


@dataclass(frozen=True)
class ProgressUpdate:
    """A progress event: ``step`` of ``total`` in ``stage`` (e.g. "REFINE", "SLAT")."""

    stage: str
    step: int
    total: int
    message: str


@dataclass
class GenerationResult:
    """Everything one Generate call returned."""

    request_id: str = ""
    artifacts: list[Artifact] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    refine_seeds: list[int] = field(default_factory=list)
    generation_seed: int = 0
    refiner_backend: str = ""
    generator_backend: str = ""
    notes: list[str] = field(default_factory=list)
    #: What the Gaussian refinement did (recovered cameras, PSNR/SSIM before and after), when it was asked for.
    gaussian_refinement: common_pb2.GaussianRefinementReport | None = None

    def _first(self, kind: ArtifactKind) -> bytes | None:
        return next((a.data for a in self.artifacts if a.kind == kind), None)

    @property
    def glb(self) -> bytes | None:
        return self._first(ArtifactKind.GLB)

    @property
    def gaussian_ply(self) -> bytes | None:
        return self._first(ArtifactKind.GAUSSIAN_PLY)

    def _all(self, kind: ArtifactKind) -> list[bytes]:
        return [a.data for a in sorted((a for a in self.artifacts if a.kind == kind), key=lambda a: a.index)]

    @property
    def refined_images(self) -> list[bytes]:
        return self._all(ArtifactKind.REFINED_IMAGE)

    @property
    def novel_views(self) -> list[bytes]:
        """The novel views of a Gaussian refinement with ``novel_views``, as the refiner tier refined them (PNG)."""
        return self._all(ArtifactKind.NOVEL_VIEW)


#: How the gateway's messages name a failing stage ("refiner: ...", "trellis: ...").
STAGE_PREFIXES = ("refiner:", "trellis:")


def without_stage(details: str) -> str:
    """A message without the name of the stage that sent it (``trellis: images[0] is ...``): for a person, when the
    message names the caller's image or field itself (INVALID_ARGUMENT)."""
    for prefix in STAGE_PREFIXES:
        if details.startswith(prefix):
            return details[len(prefix):].lstrip()
    return details


def connection_lost(exc: grpc.RpcError) -> bool:
    """The call broke between the client and the gateway (UNAVAILABLE not caused by a stage), so the request may
    still be running there."""
    return (exc.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            and not (exc.details() or "").startswith(STAGE_PREFIXES))  # type: ignore[attr-defined]


#: The events of a Generate or GetResult call (the same fields), or one of them as it arrived (serialized).
Response = gateway_pb2.GenerateResponse | gateway_pb2.GetResultResponse | bytes
R = TypeVar("R", gateway_pb2.GenerateResponse, gateway_pb2.GetResultResponse, bytes)


def _cancelling(call: grpc.CallIterator[R]) -> Generator[R, None, None]:
    """The responses of a streaming call, cancelling it when the consumer stops early."""
    try:
        yield from call
    finally:
        call.cancel()  # type: ignore[no-untyped-call]


def to_image_message(image: ImageInput) -> common_pb2.Image:
    """Encoded bytes are sent as they are (the server sniffs the type); PIL images go as PNG.

    Raises:
        TypeError: ``image`` is none of those.
        OSError: a path that cannot be read.
    """
    if isinstance(image, Image.Image):
        return common_pb2.Image(data=encode_png(image), media_type="image/png")
    if isinstance(image, (str, Path)):
        return common_pb2.Image(data=Path(image).read_bytes())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return common_pb2.Image(data=bytes(image))
    raise TypeError(f"an image is a path, encoded bytes or a PIL image, not {type(image).__name__}")


def build_request(images: ImageInput | Sequence[ImageInput], *, refine: bool = False,
                  refine_params: Mapping[str, Any] | None = None,
                  generation: Mapping[str, Any] | None = None,
                  formats: Sequence[str] = (), request_id: str = "") -> gateway_pb2.GenerateRequest:
    """A GenerateRequest. Parameters left out take the server's defaults.

    Args:
        images: One image, or several views of one object: paths, encoded bytes or PIL images.
        refine: Run the refiner first.
        refine_params: Any parameter of ``RefineParams`` by name: strength, guidance_scale,
            num_inference_steps, prompt, negative_prompt, seed, aesthetic_score, negative_aesthetic_score.
        generation: Any parameter of ``GenerationParams`` by name: seed, mesh_simplify, texture_size,
            multi_image_mode ("stochastic" | "multidiffusion"), sparse_structure / slat (mappings of steps,
            cfg_strength), gaussian_refinement (a mapping: enabled, steps, colours, opacities, positions,
            scales, regularisation, resolution, novel_views, novel_view_strength).
        formats: Any of "glb", "ply", "refined", "novel_views"; empty for the server default.
        request_id: Optional id (letters, digits, ``. _ : -``; at most 128). With one the request is durable: the
            gateway finishes it even when the call breaks, and the same request with the same id, or
            :meth:`TrellisBoxClient.fetch`, gets its result (see :meth:`TrellisBoxClient.generate`).

    Raises:
        ValueError: an unknown parameter name, enum value or format, or a value its field cannot hold, named
            (other ranges are checked by the server: INVALID_ARGUMENT).
        TypeError: an image that is not a path, bytes or a PIL image (named: ``images[1]``).
        OSError: an image path that cannot be read.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown formats {unknown}; use {', '.join(FORMATS)}")
    if isinstance(images, (str, Path, bytes, bytearray, memoryview, Image.Image)):
        images = [images]  # one image, not a sequence of characters or byte values
    messages = []
    for index, image in enumerate(images):
        try:
            messages.append(to_image_message(image))
        except TypeError as exc:
            raise TypeError(f"images[{index}]: {exc}") from None
    message = gateway_pb2.GenerateRequest(
        images=messages,
        refine=refine,
        formats=kinds_to_proto(FORMATS[f] for f in formats),
        request_id=request_id,
    )
    params_message(RefineParams, message.refine_parameters, refine_params or {}, "refine_params")
    params_message(GenerationParams, message.generation, generation or {}, "generation")
    return message


class TrellisBoxClient:
    """A synchronous client of ``GatewayService``.

    Args:
        target: Gateway address, e.g. ``"127.0.0.1:50051"``.
        timeout: Deadline in seconds for a whole Generate call (None: the gateway's default).
        max_message_bytes: Largest request message (images are sent in the request).
        token: Bearer token sent with every call (the gateway's ``--token-file`` holds the accepted ones).
        tls: Connect with TLS; implied by ``ca_file``. Without ``ca_file`` the server's certificate is checked
            against gRPC's bundled public roots.
        ca_file: PEM CA bundle the gateway's certificate chains to (e.g. a private CA).
        cert_file: PEM client certificate, for a gateway that requires one (``tls=mutual``); with ``key_file``.
        key_file: Its PEM private key.

    Raises:
        ValueError: a timeout that is not a positive number, a certificate without its key (or the reverse), or a
            TLS file that cannot be read or is not PEM.
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = 900.0,
                 max_message_bytes: int = 64 * 2**20, token: str | None = None, tls: bool = False,
                 ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                 key_file: str | Path | None = None) -> None:
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if timeout is not None and not timeout > 0:  # NaN too
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if tls or ca_file is not None or cert_file is not None or key_file is not None:
            credentials = channel_credentials(*(Path(f) if f is not None else None
                                                for f in (ca_file, cert_file, key_file)))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        # Generate with its events left serialized: collect() reads artifact chunks without copying their bytes.
        self._generate_frames = self._channel.unary_stream(
            f"/{GATEWAY_SERVICE}/Generate", request_serializer=gateway_pb2.GenerateRequest.SerializeToString,
            response_deserializer=None)
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def __enter__(self) -> TrellisBoxClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(self, request: gateway_pb2.GenerateRequest) -> Generator[gateway_pb2.GenerateResponse, None, None]:
        """The raw response stream; cancel it by closing the iterator."""
        yield from _cancelling(self._stub.Generate(request, timeout=self._timeout, metadata=self._metadata))

    def frames(self, request: gateway_pb2.GenerateRequest) -> Generator[bytes, None, None]:
        """The response stream with each event as it arrived (a serialized ``GenerateResponse``), for
        :meth:`collect`, which reads artifact chunks from these without copying them; cancel it by closing the
        iterator."""
        yield from _cancelling(self._generate_frames(request, timeout=self._timeout, metadata=self._metadata))

    def generate(self, images: ImageInput | Sequence[ImageInput], *,
                 on_progress: Callable[[ProgressUpdate], None] | None = None,
                 reconnects: int = 3, **options: Any) -> GenerationResult:
        """Run one Generate call to completion; ``options`` are those of :func:`build_request`.

        With a ``request_id`` the request is durable: when the connection breaks (UNAVAILABLE not from a stage), the
        same request is sent again up to ``reconnects`` times, which attaches to the job still running at the gateway
        or returns its stored result (artifacts come again from their first byte), so nothing is computed twice.

        Raises:
            ValueError, TypeError, OSError: a request that cannot be built (see :func:`build_request`); nothing
                is sent.
            grpc.RpcError: with the server's status code and message (e.g. INVALID_ARGUMENT).
            ArtifactProtocolError: an artifact arrived damaged (a chunk whose CRC-32C does not match its data) or
                out of order; it is not returned.
        """
        request = build_request(images, **options)
        for attempt in range(reconnects + 1):
            try:
                return self.collect(self.frames(request), on_progress)
            except grpc.RpcError as exc:
                if not request.request_id or attempt == reconnects or not connection_lost(exc):
                    raise
                if on_progress is not None:
                    on_progress(ProgressUpdate("QUEUED", 0, 0, f"connection lost ({exc.details()}); attaching "  # type: ignore[attr-defined]
                                               f"to request {request.request_id} again"))
                time.sleep(min(0.5 * 2**attempt, 5.0))
        raise AssertionError("unreachable")

    def fetch(self, request_id: str, *,
              on_progress: Callable[[ProgressUpdate], None] | None = None) -> GenerationResult:
        """The result of the durable request ``request_id``: followed to its end while it runs, the stored result
        once it finished (within the gateway's retention).

        Raises:
            grpc.RpcError: NOT_FOUND when the gateway has neither (a failed request is not kept: send it again).
        """
        request = gateway_pb2.GetResultRequest(request_id=request_id)
        return self.collect(_cancelling(self._stub.GetResult(request, timeout=self._timeout, metadata=self._metadata)),
                            on_progress)

    def cancel(self, request_id: str) -> str:
        """Stop the durable request ``request_id`` (``"stopped"``) or delete its stored result (``"deleted"``).

        Raises:
            grpc.RpcError: NOT_FOUND when the gateway has neither.
        """
        response = self._stub.Cancel(gateway_pb2.CancelRequest(request_id=request_id), timeout=30,
                                     metadata=self._metadata)
        return "stopped" if response.outcome == gateway_pb2.CancelResponse.OUTCOME_STOPPED else "deleted"

    @staticmethod
    def collect(responses: Iterable[Response],
                on_progress: Callable[[ProgressUpdate], None] | None = None) -> GenerationResult:
        """Reassemble artifacts (checking order, size and each chunk's CRC-32C) and read the done event.
        ``responses``: messages (:meth:`stream`) or serialized events (:meth:`frames`: their chunks are read without
        copying the data)."""
        result = GenerationResult()
        assembler = ArtifactAssembler()
        for response in responses:
            if isinstance(response, bytes):
                framed = read_chunk_frame(response)
                if framed is not None:
                    artifact = assembler.feed(*framed)
                    if artifact is not None:
                        result.artifacts.append(artifact)
                    continue
                response = gateway_pb2.GenerateResponse.FromString(response)
            event = response.WhichOneof("event")
            if event == "progress" and on_progress is not None:
                p = response.progress
                on_progress(ProgressUpdate(stage_name(p.stage), p.step, p.total, p.message))
            elif event == "chunk":
                artifact = assembler.feed(response.chunk)
                if artifact is not None:
                    result.artifacts.append(artifact)
            elif event == "done":
                done = response.done
                result.request_id = done.request_id
                result.timings = {stage_name(t.stage): t.seconds for t in done.timings}
                result.refine_seeds = list(done.refine_seeds)
                result.generation_seed = done.generation_seed
                result.refiner_backend = done.refiner_backend
                result.generator_backend = done.generator_backend
                result.notes = list(done.notes)
                if done.HasField("gaussian_refinement"):
                    result.gaussian_refinement = done.gaussian_refinement
        return result


def refinement_lines(report: common_pb2.GaussianRefinementReport | None) -> list[str]:
    """The Gaussian refinement's figures as lines for a person (empty when there was none)."""
    if report is None:
        return []
    lines = [f"gaussian refinement: {report.steps} steps{' (stopped early)' if report.stopped_early else ''}, "
             f"{report.gaussians} Gaussians at {report.resolution} px, rasteriser {report.rasterizer}"
             + (f", {report.novel_views} refined novel views as extra targets" if report.novel_views else "")]
    for view in report.views:
        lines.append(f"  image {view.image_index}: camera yaw {view.yaw_degrees:.1f}° pitch {view.pitch_degrees:.1f}° "
                     f"distance {view.distance:.2f}, silhouette IoU {view.silhouette_iou:.3f}; "
                     f"PSNR {view.psnr_before:.2f} → {view.psnr_after:.2f} dB, "
                     f"SSIM {view.ssim_before:.3f} → {view.ssim_after:.3f}")
    for held in report.held_out:
        lines.append(f"  held-out view yaw {held.yaw_degrees:.0f}° pitch {held.pitch_degrees:.0f}°: "
                     f"{held.psnr:.2f} dB PSNR, SSIM {held.ssim:.3f} against the unrefined render")
    return lines
