"""The TRELLIS service as a real process on loopback, with the preview backend."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.trellis.trellis_helpers import REPO_ROOT, load_glb, object_image, parse_ply, png_bytes, validate_glb
from tools.stack import ServiceProcess, health_status, start_service
from trellis_service.servicer import requested_formats
from trellisbox._domain.artifacts import Artifact, ArtifactAssembler
from trellisbox._domain.contract import TRELLIS_SERVICE
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.kinds import ArtifactKind
from trellisbox.v1 import common_pb2, trellis_pb2, trellis_pb2_grpc

pytestmark = pytest.mark.integration

GLB = common_pb2.ARTIFACT_KIND_GLB
PLY = common_pb2.ARTIFACT_KIND_GAUSSIAN_PLY


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log_dir = tmp_path_factory.mktemp("trellis-logs")
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    process = start_service("trellis", "trellis_service", ["--backend", "preview", "--max-queue", "4"], log_dir,
                            env={"PYTHONPATH": pythonpath})
    try:
        process.wait_ready(TRELLIS_SERVICE, timeout=90)
        yield process
    finally:
        process.stop(grace=5)


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[trellis_pb2_grpc.TrellisServiceStub]:
    with grpc.insecure_channel(service.target) as channel:
        yield trellis_pb2_grpc.TrellisServiceStub(channel)


def call(stub: trellis_pb2_grpc.TrellisServiceStub, request: trellis_pb2.ImageTo3DRequest
         ) -> tuple[list[common_pb2.Progress], dict[int, Artifact], list[int], trellis_pb2.ImageTo3DDone]:
    progress: list[common_pb2.Progress] = []
    artifacts: dict[int, Artifact] = {}
    chunk_counts: dict[int, int] = {}
    done = None
    assembler = ArtifactAssembler()
    for response in stub.ImageTo3D(request, timeout=60):
        event = response.WhichOneof("event")
        assert done is None, "nothing may follow done"
        if event == "progress":
            assert not artifacts, "progress after artifacts started"
            progress.append(response.progress)
        elif event == "chunk":
            chunk_counts[response.chunk.kind] = chunk_counts.get(response.chunk.kind, 0) + 1
            artifact = assembler.feed(response.chunk)
            if artifact is not None:
                artifacts[artifact.kind] = artifact
        else:
            done = response.done
    assert done is not None and not assembler.incomplete
    return progress, artifacts, [chunk_counts[k] for k in sorted(chunk_counts)], done


def test_image_to_3d_streams_progress_artifacts_and_done(stub: trellis_pb2_grpc.TrellisServiceStub,
                                                         tmp_path: Path) -> None:
    request = trellis_pb2.ImageTo3DRequest(
        request_id="it-1",
        images=[common_pb2.Image(data=png_bytes(object_image((512, 512), alpha=True)), media_type="image/png")],
        parameters=common_pb2.GenerationParameters(seed=42, texture_size=512),
        formats=[GLB, PLY],
    )
    progress, artifacts, chunks, done = call(stub, request)

    stages = [p.stage for p in progress]
    assert common_pb2.STAGE_PREPROCESS in stages and common_pb2.STAGE_EXPORT in stages
    assert stages.index(common_pb2.STAGE_PREPROCESS) < stages.index(common_pb2.STAGE_EXPORT)
    assert set(artifacts) == {GLB, PLY}
    assert artifacts[GLB].media_type == "model/gltf-binary"
    assert artifacts[PLY].media_type == "application/x-ply"
    assert chunks[1] >= 2  # the PLY is over 1 MiB: it arrives in several chunks

    path = tmp_path / "asset.glb"
    path.write_bytes(artifacts[GLB].data)
    assert validate_glb(path)["numErrors"] == 0
    mesh = load_glb(artifacts[GLB].data)
    assert mesh.is_watertight and mesh.volume > 0
    assert mesh.visual.material.baseColorTexture.size == (512, 512)
    names, _ = parse_ply(artifacts[PLY].data)
    assert names[:3] == ["x", "y", "z"] and names[-1] == "rot_3"

    assert done.seed == 42
    assert done.backend == "preview" and done.device == "cpu"
    timed = {t.stage: t.seconds for t in done.timings}
    assert {common_pb2.STAGE_QUEUED, common_pb2.STAGE_PREPROCESS, common_pb2.STAGE_EXPORT} == set(timed)
    assert timed[common_pb2.STAGE_QUEUED] >= 0
    assert timed[common_pb2.STAGE_PREPROCESS] > 0 and timed[common_pb2.STAGE_EXPORT] > 0
    assert any("not TRELLIS" in note for note in done.notes)


def test_defaults_glb_only_random_seed_and_multi_image_note(stub: trellis_pb2_grpc.TrellisServiceStub) -> None:
    image = common_pb2.Image(data=png_bytes(object_image()))  # media type sniffed
    request = trellis_pb2.ImageTo3DRequest(images=[image, image])
    _, artifacts, _, done = call(stub, request)
    assert set(artifacts) == {GLB}
    assert 0 <= done.seed < 2**32
    assert any("first of 2 images" in note for note in done.notes)


def _bad_requests() -> list[tuple[str, trellis_pb2.ImageTo3DRequest, str]]:
    png = png_bytes(object_image())
    good = [common_pb2.Image(data=png)]
    return [
        ("not an image", trellis_pb2.ImageTo3DRequest(images=[common_pb2.Image(data=b"hello, not an image")]),
         "images[0] is not a PNG, JPEG or WebP image"),
        ("truncated PNG", trellis_pb2.ImageTo3DRequest(images=[common_pb2.Image(data=png[: len(png) // 2])]),
         "images[0] is truncated or corrupt"),
        ("zero images", trellis_pb2.ImageTo3DRequest(), "no images"),
        ("texture size", trellis_pb2.ImageTo3DRequest(
            images=good, parameters=common_pb2.GenerationParameters(texture_size=10)), "texture_size must be in"),
        ("refined image", trellis_pb2.ImageTo3DRequest(images=good, formats=[common_pb2.ARTIFACT_KIND_REFINED_IMAGE]),
         "comes from the refiner"),
        ("unspecified format", trellis_pb2.ImageTo3DRequest(
            images=good, formats=[common_pb2.ARTIFACT_KIND_UNSPECIFIED]), "ARTIFACT_KIND_UNSPECIFIED is not"),
    ]


@pytest.mark.parametrize(("case", "request_", "message"), _bad_requests(), ids=[c[0] for c in _bad_requests()])
def test_bad_input_is_invalid_argument_and_service_stays_serving(
        stub: trellis_pb2_grpc.TrellisServiceStub, service: ServiceProcess, case: str,
        request_: trellis_pb2.ImageTo3DRequest, message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ImageTo3D(request_, timeout=30))
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, error.details())
    assert message in (error.details() or ""), error.details()
    assert health_status(service.target, TRELLIS_SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_formats_conversion() -> None:
    assert requested_formats([]) == {ArtifactKind.GLB}
    assert requested_formats([PLY, GLB, PLY]) == {ArtifactKind.GLB, ArtifactKind.GAUSSIAN_PLY}
    with pytest.raises(InvalidInput, match="99"):
        requested_formats([99])


def test_failed_preflight_keeps_readiness_not_serving(tmp_path: Path) -> None:
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    process = start_service("trellis-broken", "trellis_service",
                            ["--backend", "trellis", "--model", str(tmp_path / "no-such-model")], tmp_path,
                            env={"PYTHONPATH": pythonpath, "TRELLISBOX_TRELLIS_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 60
        while "cannot start its model" not in process.log_tail() and time.monotonic() < deadline:
            assert process.process.poll() is None, process.log_tail()
            time.sleep(0.2)
        log = process.log_tail()
        assert f"{TRELLIS_SERVICE} cannot start its model and stays NOT_SERVING:" in log, log
        # The actionable cause, not upstream's "Repository Not Found".
        assert "no CUDA GPU is visible" in log or "not importable" in log or "does not exist" in log, log
        assert health_status(process.target, "") == health_pb2.HealthCheckResponse.SERVING
        assert health_status(process.target, TRELLIS_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        # Called anyway: FAILED_PRECONDITION with the cause (retrying cannot help), not UNAVAILABLE "still loading".
        with grpc.insecure_channel(process.target) as channel, pytest.raises(grpc.RpcError) as caught:
            list(trellis_pb2_grpc.TrellisServiceStub(channel).ImageTo3D(
                trellis_pb2.ImageTo3DRequest(images=[common_pb2.Image(data=png_bytes(object_image((64, 64))))]),
                timeout=30))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert "cannot run its model" in (caught.value.details() or "")  # type: ignore[attr-defined]
    finally:
        process.stop(grace=5)
