"""Gateway → refiner (tiny SDXL through diffusers) → TRELLIS service (preview), over loopback."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import trimesh
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from tests.e2e.conftest import validate_glb
from tests.images import encode, png_bytes, rgba_object
from tests.proxy import LoopbackProxy
from tools.stack import LocalStack, health_status
from trellisbox import ArtifactProtocolError
from trellisbox._domain.contract import GATEWAY_SERVICE, REFINER_SERVICE, TRELLIS_SERVICE
from trellisbox.client import ProgressUpdate, TrellisBoxClient, build_request
from trellisbox.v1 import common_pb2

pytestmark = pytest.mark.integration


def _all_serving(stack: LocalStack) -> bool:
    names = {"gateway": GATEWAY_SERVICE, "refiner": REFINER_SERVICE, "trellis": TRELLIS_SERVICE}
    return all(health_status(p.target, names[n]) == 1 for n, p in stack.processes.items())


def test_refine_then_generate_streams_progress_artifacts_and_done(stack: LocalStack, tmp_path: Path) -> None:
    updates: list[ProgressUpdate] = []
    source = rgba_object(160)
    with TrellisBoxClient(stack.gateway_target, timeout=180) as client:
        result = client.generate(
            [encode(source)], refine=True, refine_params={"seed": 1234, "strength": 0.5},
            generation={"seed": 99}, formats=["glb", "refined", "ply"], on_progress=updates.append,
        )
    stages = [u.stage for u in updates]
    assert "REFINE" in stages and "EXPORT" in stages
    assert stages.index("REFINE") < stages.index("EXPORT")
    # The services' progress gate (0.1 s by default) may leave out fast steps in between, never a stage's first
    # step or its last.
    refine_steps = [u for u in updates if u.stage == "REFINE"]
    assert refine_steps[0].step == 1 and refine_steps[-1].step == refine_steps[-1].total == int(20 * 0.5)
    assert [(u.step, u.total) for u in updates if u.stage == "PREPROCESS"] == [(0, 1), (1, 1)]
    export_steps = [(u.step, u.total) for u in updates if u.stage == "EXPORT"]
    assert export_steps[0] == (0, 4) and (4, 4) in export_steps  # the GLB and the PLY: 4 steps, then writing

    assert result.refiner_backend == "sdxl" and result.generator_backend == "preview"
    assert result.refine_seeds == [1234] and result.generation_seed == 99
    assert result.timings["REFINE"] > 0 and "EXPORT" in result.timings
    assert len(result.request_id) >= 8

    (refined_png,) = result.refined_images
    refined = Image.open(io.BytesIO(refined_png))
    assert refined.mode == "RGBA" and refined.size == source.size
    # The input's alpha is put back on the refined image.
    assert np.array_equal(np.asarray(refined.getchannel("A")), np.asarray(source.getchannel("A")))

    glb_path = tmp_path / "out.glb"
    glb_path.write_bytes(result.glb or b"")
    validate_glb(glb_path)
    mesh = trimesh.load(glb_path, force="mesh")
    assert isinstance(mesh, trimesh.Trimesh)
    assert mesh.is_watertight and len(mesh.faces) > 100
    ply = result.gaussian_ply or b""
    assert ply.startswith(b"ply\n") and b"f_dc_0" in ply[:2000]


def test_same_seeds_give_the_same_bytes(stack: LocalStack) -> None:
    options: dict[str, Any] = dict(refine=True, refine_params={"seed": 7}, generation={"seed": 3},
                                   formats=["glb", "refined"])
    with TrellisBoxClient(stack.gateway_target, timeout=180) as client:
        first = client.generate([png_bytes(96)], **options)
        second = client.generate([png_bytes(96)], **options)
    assert first.refined_images == second.refined_images
    assert first.glb == second.glb
    # Without the refined image in the reply it reaches TRELLIS in the lossless hand-off form (TIFF, not PNG): the
    # same pixels, so the same model.
    with TrellisBoxClient(stack.gateway_target, timeout=180) as client:
        handed_off = client.generate([png_bytes(96)], **{**options, "formats": ["glb"]})
    assert handed_off.refined_images == [] and handed_off.glb == first.glb


def test_unset_seeds_are_random_and_echoed(stack: LocalStack) -> None:
    with TrellisBoxClient(stack.gateway_target, timeout=180) as client:
        a = client.generate([png_bytes(64)], refine=True)
        b = client.generate([png_bytes(64)], refine=True)
    assert (a.refine_seeds, a.generation_seed) != (b.refine_seeds, b.generation_seed)
    assert a.refined_images, "refined image is returned by default when refining"


def test_without_refine_the_refiner_is_not_called(stack: LocalStack) -> None:
    with TrellisBoxClient(stack.gateway_target, timeout=180) as client:
        result = client.generate([png_bytes(64)])
    assert result.refiner_backend == "" and result.refine_seeds == []
    assert result.glb is not None and result.refined_images == []


def test_an_artifact_damaged_on_its_way_is_refused_not_returned(stack: LocalStack) -> None:
    """One bit flipped in the middle of the GLB between the gateway and the client, framing left intact (nothing
    below checks the data on loopback): the CRC-32C of its chunk, set where TRELLIS cut it, refuses it at the client."""
    with TrellisBoxClient(stack.gateway_target, timeout=180) as client:
        glb = client.generate([png_bytes(64)], generation={"seed": 3}).glb
    assert glb is not None and len(glb) > 20_000  # the progress events before it are a few kB: the flip lands in it
    with LoopbackProxy(stack.gateway_target, flip_download_bit_at=len(glb) // 2) as proxy, \
            TrellisBoxClient(proxy.target, timeout=180) as client:
        with pytest.raises(ArtifactProtocolError, match=r"crc32c mismatch for ARTIFACT_KIND_GLB\[0\] in the chunk "
                                                        r"at offset 0"):
            client.generate([png_bytes(64)], generation={"seed": 3})
        assert client.generate([png_bytes(64)], generation={"seed": 3}).glb == glb  # one flip per connection: done


def test_several_views_use_the_first_for_preview_and_say_so(stack: LocalStack) -> None:
    with TrellisBoxClient(stack.gateway_target, timeout=180) as client:
        result = client.generate([png_bytes(64), png_bytes(64), png_bytes(64)],
                                 generation={"multi_image_mode": "multidiffusion"})
    assert result.glb is not None
    assert any("first" in note for note in result.notes), result.notes


def test_bad_input_through_the_stack_keeps_every_service_up(stack: LocalStack) -> None:
    with TrellisBoxClient(stack.gateway_target, timeout=60) as client:
        cases: list[tuple[list[bytes], dict[str, Any]]] = [
            ([b"not an image"], {}), ([png_bytes()[:100]], {}), ([], {}),
            ([png_bytes()], {"refine": True, "refine_params": {"strength": 7.0}}),
        ]
        for images, options in cases:
            with pytest.raises(grpc.RpcError) as info:
                client.generate(images, **options)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert _all_serving(stack)


@pytest.mark.parametrize("refine,stage", [(True, "refiner"), (False, "trellis")])
def test_what_only_decoding_finds_is_refused_by_the_first_stage_before_its_model_runs(
        stack: LocalStack, refine: bool, stage: str) -> None:
    # The gateway checks images without decoding them; a JPEG cut short opens and passes there, and the stage that
    # reads the pixels first refuses it while decoding, before queueing a job: no stage progress, one clear error.
    jpeg = encode(rgba_object(256).convert("RGB"), "JPEG")
    request = build_request([jpeg[: len(jpeg) * 3 // 4]], refine=refine)
    events: list[Any] = []
    with TrellisBoxClient(stack.gateway_target, timeout=60) as client, pytest.raises(grpc.RpcError) as info:
        events.extend(client.stream(request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert info.value.details().startswith(f"{stage}: images[0] is truncated or corrupt")  # type: ignore[attr-defined]
    assert not [event for event in events if event.WhichOneof("event") != "progress"
                or event.progress.stage != common_pb2.STAGE_QUEUED], events
    assert _all_serving(stack)


def test_deadline_is_propagated(stack: LocalStack) -> None:
    with TrellisBoxClient(stack.gateway_target, timeout=0.3) as client, pytest.raises(grpc.RpcError) as info:
        client.generate([png_bytes(256)], refine=True, refine_params={"num_inference_steps": 200, "strength": 1.0})
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert _all_serving(stack)


def test_client_cancel_stops_the_refiner(stack: LocalStack) -> None:
    request = build_request([png_bytes(256)], refine=True, refine_params={"num_inference_steps": 200, "strength": 1.0})
    with TrellisBoxClient(stack.gateway_target, timeout=120) as client:
        stream = client.stream(request)
        for response in stream:
            if response.HasField("progress") and response.progress.stage == common_pb2.STAGE_REFINE:
                break
        stream.close()  # cancels the call
        # The refiner stops at its next step, so a small request right after is served promptly.
        started = time.monotonic()
        client.generate([png_bytes(64)], refine=True)
        after_cancel = time.monotonic() - started
    log = stack.processes["refiner"].log_tail(200)
    assert "CANCELLED" in log or "cancelled" in log, log
    assert after_cancel < 60


def test_reflection_client_without_project_stubs_can_call_generate(stack: LocalStack) -> None:
    with grpc.insecure_channel(stack.gateway_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        names = {s.name for s in listed.list_services_response.service}
        assert {"trellisbox.v1.GatewayService", "grpc.health.v1.Health"} <= names

        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("trellisbox.v1.GatewayService").FindMethodByName("Generate")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request: Any = request_class()  # a class built at run time from the reflected descriptors
        image = request.images.add()
        image.data = png_bytes(64)
        call = channel.unary_stream(
            "/trellisbox.v1.GatewayService/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        events = [r.WhichOneof("event") for r in call(request, timeout=120)]
    assert events[-1] == "done" and "chunk" in events and "progress" in events


def test_cli_writes_the_glb_refined_png_and_ply(stack: LocalStack, tmp_path: Path) -> None:
    source = tmp_path / "chair.png"
    source.write_bytes(png_bytes(96))
    completed = subprocess.run(
        [sys.executable, "-m", "trellisbox.cli", "generate", str(source), "-o", str(tmp_path / "chair.glb"),
         "--target", stack.gateway_target, "--refine", "--strength", "0.3", "--prompt", "a red ball",
         "--refined-png", str(tmp_path / "chair.refined.png"), "--ply", str(tmp_path / "chair.ply"),
         "--seed", "5"],
        capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr
    assert "generation seed=5" in completed.stderr and "refiner=sdxl" in completed.stderr
    validate_glb(tmp_path / "chair.glb")
    assert Image.open(tmp_path / "chair.refined.png").size == (96, 96)
    assert (tmp_path / "chair.ply").read_bytes().startswith(b"ply")


def test_cli_reports_bad_input_readably(stack: LocalStack, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    completed = subprocess.run(
        [sys.executable, "-m", "trellisbox.cli", "generate", str(bad), "-o", str(tmp_path / "x.glb"),
         "--target", stack.gateway_target],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 1
    # The CLI names the caller's file, not the request's images[0].
    assert "INVALID_ARGUMENT: notes.png is not a PNG, JPEG or WebP image" in completed.stderr
