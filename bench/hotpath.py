"""Where the served path's added time goes: every step the services take besides running the models, timed one
by one in this process (``time.perf_counter_ns``, median of repeats), on the same 512² image and backends as the
overhead benchmark.

``python -m bench.hotpath [--side 512] [--repeats 15]``. The steps are the same calls the servicers make, in the
order a refine + 3D request meets them: the gateway's parse, budget and validation decode and the refine request
it builds; the refiner's parse and decode, the refined image's encoding and chunking; the gateway's reassembly and
the TRELLIS request it builds; TRELLIS's parse and decode; then the artifact chunks through the gateway's relay
to the client. What the in-process baseline also does (one decode, the models, the GLB export) is listed apart
and is not part of the added time. Transport (HTTP/2, the event loop, thread hops) is not in here: it is the
difference between the overhead benchmark's added time and the sum of these steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.common import object_image, png
from gateway.relay import stage_deserializer
from trellis_service.exporters import encode_asset
from trellisbox._domain.artifacts import Artifact, ArtifactAssembler
from trellisbox._domain.convert import check_images, decode_images
from trellisbox._domain.imaging import HANDOFF_MEDIA_TYPE, ImageLimits
from trellisbox._domain.kinds import ArtifactKind
from trellisbox._domain.params import GenerationParams, RefineParams
from trellisbox._runtime.worker import JobContext
from trellisbox.client import TrellisBoxClient, build_request
from trellisbox.v1 import common_pb2, gateway_pb2, refiner_pb2, trellis_pb2

LIMITS = ImageLimits()


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return statistics.median(samples)


def chunk_messages(artifact: Artifact, response_type: Any) -> list[bytes]:
    """A stage's chunk events on the wire, built as messages and serialized (how the servicers sent them before)."""
    return [response_type(chunk=chunk).SerializeToString() for chunk in artifact.chunks()]


def fresh(artifact: Artifact) -> Artifact:
    """The same artifact with its digest not yet computed (a servicer hashes each artifact once, as it cuts it)."""
    return Artifact(artifact.kind, artifact.data, artifact.index, artifact.media_type)


def gc_costs(repeats: int) -> dict[str, float]:
    """A full cyclic collection in this process (the modules and backends the services load), then with the heap
    frozen as a warm service freezes it (``trellisbox._runtime.allocator.settle_heap``)."""
    import gc

    before = timed(gc.collect, repeats)
    gc.freeze()
    try:
        after = timed(gc.collect, repeats)
    finally:
        gc.unfreeze()
    return {"gc.collect() after a job (before: whole heap)": round(before, 2),
            "gc.collect() after a job, warm heap frozen": round(after, 2)}


def profile(side: int, repeats: int) -> dict[str, Any]:
    from refiner_service.backends.classic import ClassicBackend
    from refiner_service.servicer import encode_refined
    from trellis_service.backends.preview import PreviewBackend

    data = png(object_image(side))
    ctx = JobContext("bench", None, lambda _event: None)
    refiner, preview = ClassicBackend(), PreviewBackend()
    refiner.load()
    preview.load()
    refine_params, generation = RefineParams(seed=1), GenerationParams(seed=1)
    wire = build_request([data], refine=True, refine_params={"seed": 1}, formats=["glb"]).SerializeToString()
    request = gateway_pb2.GenerateRequest.FromString(wire)
    decoded = decode_images(request.images, LIMITS, 8)
    refined = refiner.refine(decoded, refine_params, [1], ctx)
    refined_artifact = encode_refined(refined)[0]
    handoff_artifact = encode_refined(refined, HANDOFF_MEDIA_TYPE)[0]
    refine_frames = list(handoff_artifact.frames())
    asset = preview.generate(refined, generation, {ArtifactKind.GLB}, ctx)
    glb = encode_asset(asset)[0]
    refine_wire = refiner_pb2.RefineRequest(images=request.images).SerializeToString()
    png_images = [common_pb2.Image(data=refined_artifact.data, media_type="image/png")]
    refined_images = [common_pb2.Image(data=handoff_artifact.data, media_type=HANDOFF_MEDIA_TYPE)]
    trellis_wire = trellis_pb2.ImageTo3DRequest(images=refined_images).SerializeToString()
    trellis_frames = list(glb.frames())
    relay = stage_deserializer(trellis_pb2.ImageTo3DResponse)
    refine_relay = stage_deserializer(refiner_pb2.RefineResponse)

    def reassemble_refined() -> None:
        assembler = ArtifactAssembler()
        for frame in refine_frames:
            assembler.feed(*refine_relay(frame).chunk())

    def reassemble_refined_parsed() -> None:
        assembler = ArtifactAssembler()
        for frame in refine_frames:
            assembler.feed(refine_relay(frame).message.chunk)

    def client_collect() -> None:
        TrellisBoxClient.collect(iter(trellis_frames))

    def client_collect_parsed() -> None:
        TrellisBoxClient.collect(iter([gateway_pb2.GenerateResponse.FromString(f) for f in trellis_frames]))

    gateway_steps = {
        "parse GenerateRequest": lambda: gateway_pb2.GenerateRequest.FromString(wire),
        "byte budget: ByteSize": request.ByteSize,
        "image check (headers, PNG checksums; no decode)": lambda: check_images(request.images, LIMITS, 8),
        "build + serialize RefineRequest": lambda: refiner_pb2.RefineRequest(
            images=request.images).SerializeToString(),
        "refined chunks: read (data as a view) + reassemble": reassemble_refined,
        "build + serialize ImageTo3DRequest": lambda: trellis_pb2.ImageTo3DRequest(
            images=refined_images).SerializeToString(),
        "relay artifact chunks (frame header only)": lambda: [relay(f).relay() for f in trellis_frames],
    }
    refiner_steps = {
        "parse RefineRequest": lambda: refiner_pb2.RefineRequest.FromString(refine_wire),
        "decode input": lambda: decode_images(request.images, LIMITS, 8),
        "encode refined image: hand-off TIFF": lambda: encode_refined(refined, HANDOFF_MEDIA_TYPE),
        "chunk frames of the refined image": lambda: list(fresh(handoff_artifact).frames()),
    }
    trellis_steps = {
        "parse ImageTo3DRequest": lambda: trellis_pb2.ImageTo3DRequest.FromString(trellis_wire),
        "decode refined image: hand-off TIFF": lambda: decode_images(refined_images, LIMITS, 8, handoff=True),
        "chunk frames of the GLB (sha256, crc32c included)": lambda: list(fresh(glb).frames()),
    }
    before = {  # what the steps above replaced
        "refiner: encode refined image as PNG (now only when the caller asks for it)": lambda: encode_refined(refined),
        "trellis: decode refined PNG": lambda: decode_images(png_images, LIMITS, 8),
        "trellis: chunk messages of the GLB, built and serialized (sha256, crc32c included)": lambda: chunk_messages(
            fresh(glb), trellis_pb2.ImageTo3DResponse),
        "refiner: chunk messages of the refined image, built and serialized": lambda: chunk_messages(
            fresh(handoff_artifact), refiner_pb2.RefineResponse),
        "gateway: refined chunks parsed + reassembled": reassemble_refined_parsed,
        "client: GLB chunks parsed + reassembled + checked": client_collect_parsed,
    }
    client_steps = {"read chunk frames (data as views) + reassemble + crc32c per chunk": client_collect}
    baseline = {
        "decode input once": lambda: decode_images(request.images, LIMITS, 8),
        "classic refine": lambda: refiner.refine(decoded, refine_params, [1], ctx),
        "preview generate": lambda: preview.generate(refined, generation, {ArtifactKind.GLB}, ctx),
        "GLB export": lambda: encode_asset(asset),
    }
    out: dict[str, Any] = {
        "image": f"{side}x{side} RGBA PNG ({len(data)} bytes); refined image {len(refined_artifact.data)} bytes "
                 f"as PNG, {len(handoff_artifact.data)} as TIFF; GLB {len(glb.data)} bytes",
        "repeats": repeats,
    }
    for name, steps in (("gateway", gateway_steps), ("refiner", refiner_steps), ("trellis", trellis_steps),
                        ("client", client_steps), ("replaced (before)", before),
                        ("in-process baseline (not added)", baseline)):
        out[name] = {step: round(timed(fn, repeats), 2) for step, fn in steps.items()}
    out["replaced (before)"].update(gc_costs(repeats))
    added = [ms for name in ("gateway", "refiner", "trellis", "client") for ms in out[name].values()]
    # The refiner's decode of the input is the one decode the in-process baseline makes as well.
    out["sum of added steps, refine + 3D (ms)"] = round(sum(added) - out["refiner"]["decode input"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(json.dumps(profile(args.side, args.repeats), indent=2))


if __name__ == "__main__":
    main()
