"""Property-based fuzzing of the live services: whatever a caller sends, each call ends promptly with OK or a
documented status (never UNKNOWN or INTERNAL), nothing dies, and a good request is served afterwards.

Against the gateway and straight at the model services: raw and mutated bytes at the method level, and
well-formed messages with lying or broken images and NaN, infinite, out-of-range and overlong values.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.images import encode, huge_png_header, png_bytes, truncated_png
from tools.stack import LocalStack
from trellis_service.domain import GenerationState
from trellis_service.exporters import SplatArrays
from trellisbox._domain.contract import GATEWAY_SERVICE, REFINER_SERVICE, TRELLIS_SERVICE
from trellisbox.v1 import common_pb2, gateway_pb2, refiner_pb2, trellis_pb2

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: What the README's status table documents; anything else (UNKNOWN, INTERNAL, ...) is a defect.
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
              # a fuzzed request_id may name a durable request another case sent (GetResult, Cancel: none)
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND}
METHODS = {
    "gateway": f"/{GATEWAY_SERVICE}/Generate",
    "refiner": f"/{REFINER_SERVICE}/Refine",
    "trellis": f"/{TRELLIS_SERVICE}/ImageTo3D",
}
GOOD_PNG = png_bytes(48)
IMAGES = [
    common_pb2.Image(data=GOOD_PNG),
    common_pb2.Image(data=GOOD_PNG, media_type="image/jpeg"),  # lying media type
    common_pb2.Image(data=encode(Image.new("RGB", (40, 40), (9, 9, 9)), "JPEG"), media_type="image/jpeg"),
    common_pb2.Image(data=truncated_png(48)),
    common_pb2.Image(data=huge_png_header()),  # lying header: 30000×30000
    common_pb2.Image(data=b""),
    common_pb2.Image(data=b"GIF89a" + bytes(40)),
    common_pb2.Image(data=GOOD_PNG, media_type="x" * 5000),
]
#: Statuses the fuzz cases got, to check the fuzzing reached the services at all.
SEEN: Counter[grpc.StatusCode] = Counter()
WEIRD_FLOATS = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, -1e-300]),
                         st.floats(min_value=-50, max_value=50))
WEIRD_INTS = st.sampled_from([0, 1, 2, 12, 100, 201, 2**31, 2**32 - 1])
WEIRD_TEXT = st.one_of(st.text(max_size=40), st.just("p" * 2001), st.just("\x00\n\r\u202e" * 30))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("fuzz"), refiner_args=["--backend", "classic"],
                    trellis_args=["--backend", "preview"], ready_timeout=180) as running:
        yield running


def call_raw(target: str, method: str, data: bytes) -> grpc.StatusCode:
    """Send ``data`` as the request's bytes, read the whole stream; the call's final status."""
    with grpc.insecure_channel(target) as channel:
        rpc = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        try:
            for _ in rpc(data, timeout=60):
                pass
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
            SEEN[code] += 1
            return code
    SEEN[grpc.StatusCode.OK] += 1
    return grpc.StatusCode.OK


def targets(stack: LocalStack) -> dict[str, str]:
    return {"gateway": stack.gateway_target, "refiner": stack.processes["refiner"].target,
            "trellis": stack.processes["trellis"].target}


@st.composite
def refine_parameters(draw: st.DrawFn) -> common_pb2.RefineParameters:
    message = common_pb2.RefineParameters()
    for name in ("strength", "guidance_scale", "aesthetic_score", "negative_aesthetic_score"):
        if draw(st.booleans()):
            setattr(message, name, draw(WEIRD_FLOATS))
    if draw(st.booleans()):
        message.num_inference_steps = draw(WEIRD_INTS)
    if draw(st.booleans()):
        message.seed = draw(st.sampled_from([0, 7, 2**32, 2**64 - 1]))
    for name in ("prompt", "negative_prompt"):
        if draw(st.booleans()):
            setattr(message, name, draw(WEIRD_TEXT))
    return message


@st.composite
def generation_parameters(draw: st.DrawFn) -> common_pb2.GenerationParameters:
    message = common_pb2.GenerationParameters()
    if draw(st.booleans()):
        message.seed = draw(st.sampled_from([0, 3, 2**40]))
    if draw(st.booleans()):
        message.mesh_simplify = draw(WEIRD_FLOATS)
    if draw(st.booleans()):
        message.texture_size = draw(st.sampled_from([0, 255, 256, 512, 4097, 2**32 - 1]))
    for stage in ("sparse_structure", "slat"):
        if draw(st.booleans()):
            getattr(message, stage).steps = draw(WEIRD_INTS)
            getattr(message, stage).cfg_strength = draw(WEIRD_FLOATS)
    message.multi_image_mode = draw(st.integers(min_value=0, max_value=4))  # type: ignore[assignment]
    return message


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    # A third are nearly valid (good images, defaults, at most the formats or refine flag odd): they reach the
    # models, so cancellation-free full runs are fuzzed too, not only validation.
    nearly_valid = draw(st.integers(min_value=0, max_value=2)) == 0
    if nearly_valid:
        images = draw(st.lists(st.just(IMAGES[0]), min_size=1, max_size=2))
        service = draw(st.sampled_from(sorted(METHODS)))
        message_types = {"gateway": gateway_pb2.GenerateRequest, "refiner": refiner_pb2.RefineRequest,
                         "trellis": trellis_pb2.ImageTo3DRequest}
        nearly = message_types[service](images=images)
        if service != "refiner":
            nearly.formats.extend(draw(st.lists(st.integers(min_value=0, max_value=3), max_size=2)))  # type: ignore[union-attr]
        if service == "gateway":
            nearly.refine = draw(st.booleans())  # type: ignore[union-attr]
        return service, nearly.SerializeToString()
    images = draw(st.lists(st.sampled_from(IMAGES), max_size=3))
    formats = draw(st.lists(st.integers(min_value=0, max_value=5), max_size=3))
    request_id = draw(st.one_of(st.just(""), st.text(max_size=20), st.just("r" * 300), st.just("a\nb")))
    service = draw(st.sampled_from(sorted(METHODS)))
    message: gateway_pb2.GenerateRequest | refiner_pb2.RefineRequest | trellis_pb2.ImageTo3DRequest
    if service == "gateway":
        message = gateway_pb2.GenerateRequest(images=images, refine=draw(st.booleans()), request_id=request_id,
                                              refine_parameters=draw(refine_parameters()),
                                              generation=draw(generation_parameters()))
        message.formats.extend(formats)  # type: ignore[arg-type]
    elif service == "refiner":
        message = refiner_pb2.RefineRequest(images=images, parameters=draw(refine_parameters()),
                                            request_id=request_id)
    else:
        message = trellis_pb2.ImageTo3DRequest(images=images, parameters=draw(generation_parameters()),
                                               request_id=request_id)
        message.formats.extend(formats)  # type: ignore[arg-type]
    data = message.SerializeToString()
    if draw(st.booleans()):  # mutate the bytes: flip some, cut the end
        mutable = bytearray(data)
        for position in draw(st.lists(st.integers(min_value=0, max_value=max(len(mutable) - 1, 0)), max_size=4)):
            if mutable:
                mutable[position] ^= draw(st.integers(min_value=1, max_value=255))
        data = bytes(mutable[: draw(st.integers(min_value=0, max_value=len(mutable)))])
    return service, data


FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(case=requests())
def test_well_formed_and_mutated_messages_get_documented_statuses(stack: LocalStack, case: tuple[str, bytes]) -> None:
    service, data = case
    code = call_raw(targets(stack)[service], METHODS[service], data)
    assert code in DOCUMENTED, f"{service} answered {code.name} to {data[:120]!r}"


@FUZZ
@given(service=st.sampled_from(sorted(METHODS)), data=st.binary(max_size=300))
def test_raw_bytes_get_documented_statuses(stack: LocalStack, service: str, data: bytes) -> None:
    code = call_raw(targets(stack)[service], METHODS[service], data)
    assert code in DOCUMENTED, f"{service} answered {code.name} to {data[:120]!r}"


def _states() -> list[bytes]:
    """Generation states a RefineGaussians call may carry: a real one (a small ball of Gaussians), and broken ones."""
    count = 64
    rng = np.random.default_rng(0)
    quats = np.tile(np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32), (count, 1))
    splats = SplatArrays(xyz=rng.normal(size=(count, 3)).astype(np.float32) * 0.3,
                         normals=np.zeros((count, 3), np.float32), f_dc=rng.normal(size=(count, 3)).astype(np.float32),
                         opacity=np.full(count, 2.0, np.float32), scale=np.full((count, 3), -2.5, np.float32),
                         rotation=quats)
    good = GenerationState(splats=splats.ply_bytes()).to_bytes()
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("gaussians.ply", b"\0" * 100_000)
    no_ply = GenerationState(splats=b"not a ply").to_bytes()
    return [good, good[: len(good) // 2], b"", b"PK\x03\x04" + bytes(60), deflated.getvalue(), no_ply,
            GenerationState(splats=splats.ply_bytes(), mesh_vertices=np.zeros((3, 2), np.float32),
                            mesh_faces=np.zeros((1, 3), np.int32)).to_bytes()]


STATES = _states()


@st.composite
def refine_gaussians_requests(draw: st.DrawFn) -> bytes:
    """The second call of a novel-view refinement, as the gateway sends it, with its parts broken in turn; a fit
    that does run is one step at 32 px."""
    def camera() -> trellis_pb2.OrbitCamera:
        return trellis_pb2.OrbitCamera(
            yaw_degrees=draw(WEIRD_FLOATS), pitch_degrees=draw(st.sampled_from([10.0, 95.0, math.nan])),
            distance=draw(st.sampled_from([2.4, 0.0, -1.0, math.inf])), size=draw(st.sampled_from([256, 0, 5000])))

    cameras = draw(st.integers(min_value=0, max_value=2))
    views = draw(st.integers(min_value=0, max_value=4))
    hand_over = trellis_pb2.NovelViewHandOver(
        input_cameras=[camera() for _ in range(cameras)],
        silhouette_iou=[0.9] * draw(st.sampled_from([cameras, 1])),
        novel_view_cameras=[camera() for _ in range(draw(st.sampled_from([views, 3])))])
    message = trellis_pb2.RefineGaussiansRequest(
        images=draw(st.lists(st.sampled_from([*IMAGES[:2], IMAGES[3]]), max_size=2)), hand_over=hand_over,
        state=draw(st.sampled_from(STATES)), seed=draw(st.sampled_from([0, 2**64 - 1])),
        novel_views=[common_pb2.Image(data=png_bytes(draw(st.sampled_from([256, 48])))) for _ in range(views)],
        request_id=draw(st.sampled_from(["", "fuzz", "a\nb"])))
    message.formats.extend(draw(st.lists(st.integers(min_value=0, max_value=5), max_size=2)))  # type: ignore[arg-type]
    if draw(st.booleans()):
        message.parameters.gaussian_refinement.CopyFrom(common_pb2.GaussianRefinementParameters(
            enabled=True, novel_views=draw(st.booleans()), steps=1, resolution=32))
    data = message.SerializeToString()
    if draw(st.booleans()):  # cut the end
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    return data


@FUZZ
@given(data=st.one_of(refine_gaussians_requests(), st.binary(max_size=300)))
def test_the_second_call_of_a_novel_view_refinement_gets_documented_statuses(stack: LocalStack, data: bytes) -> None:
    """``RefineGaussians`` takes state that went through the gateway; whatever it holds, the call ends with a
    documented status (a broken state, camera or view: INVALID_ARGUMENT)."""
    code = call_raw(stack.processes["trellis"].target, f"/{TRELLIS_SERVICE}/RefineGaussians", data)
    assert code in DOCUMENTED, f"RefineGaussians answered {code.name} to {data[:120]!r}"


@FUZZ
@given(method=st.sampled_from(["GetResult", "Cancel"]),
       data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(
           lambda text: gateway_pb2.GetResultRequest(request_id=text).SerializeToString())))
def test_the_durable_request_calls_get_documented_statuses(stack: LocalStack, method: str, data: bytes) -> None:
    with grpc.insecure_channel(stack.gateway_target) as channel:
        path = f"/{GATEWAY_SERVICE}/{method}"
        try:
            if method == "Cancel":
                channel.unary_unary(path, request_serializer=None, response_deserializer=None)(data, timeout=30)
            else:
                for _ in channel.unary_stream(path, request_serializer=None, response_deserializer=None)(data,
                                                                                                      timeout=30):
                    pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
    SEEN[code] += 1
    assert code in DOCUMENTED, f"{method} answered {code.name} to {data[:120]!r}"


def test_every_service_still_serves_a_good_request(stack: LocalStack, record: Callable[[str, Any], None]) -> None:
    assert SEEN[grpc.StatusCode.INVALID_ARGUMENT] >= 100, SEEN  # the cases reached the services' validation
    assert SEEN[grpc.StatusCode.OK] >= 5, SEEN  # and some ran through the models
    record("fuzz", {"cases": sum(SEEN.values()), "statuses": {code.name: n for code, n in SEEN.items()},
                    "undocumented": sum(n for code, n in SEEN.items() if code not in DOCUMENTED)})
    good = gateway_pb2.GenerateRequest(images=[common_pb2.Image(data=GOOD_PNG)], refine=True)
    assert call_raw(stack.gateway_target, METHODS["gateway"], good.SerializeToString()) == grpc.StatusCode.OK
    for name, process in stack.processes.items():
        assert process.process.poll() is None, f"{name} died:\n{process.log_tail()}"
        assert "Traceback" not in process.log_tail(5000), f"{name} logged a traceback:\n{process.log_tail(200)}"
