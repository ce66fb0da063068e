"""The refiner service as a real process on loopback, checked against diffusers called directly.

The model is a tiny random-weight SDXL-refiner pipeline built here, with code and dimensions of its own
(not the project's ``refiner_service.tiny``), so the service is compared with diffusers and not with
itself.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from PIL import Image

from tests.refiner.refiner_helpers import png_bytes, scene, with_alpha
from tools.stack import ServiceProcess, health_status, start_service
from trellisbox._domain.artifacts import ArtifactAssembler
from trellisbox.v1 import common_pb2, refiner_pb2, refiner_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE = "trellisbox.v1.RefinerService"
THREADS = 2  # the same torch thread count in the service and here: CPU kernels then agree bit for bit
CHUNK_BYTES = 16 * 1024  # the smallest allowed: every refined PNG arrives in several chunks
CALL_TIMEOUT = 120.0


def build_reference_refiner(dest: Path, seed: int = 7) -> Path:
    """An SDXL-refiner-shaped pipeline with random weights: CLIP BPE tokenizer written here, projection
    text encoder, text_time UNet with aesthetic-score conditioning, four-block VAE, Euler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    # Byte-level alphabet as in CLIP: printable bytes stand for themselves, the rest map above 255.
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    shifted = iter(range(256, 512))
    alphabet = [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]
    merges = [("v", "a"), ("va", "s"), ("s", "t"), ("st", "u"), ("d", "i"), ("o", "o"), ("h", "t</w>")]
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    # transformers' annotation says list[str]; the BPE tokenizer takes merge pairs as well.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]

    hidden, projection, time_dim = 48, 40, 6
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, projection_dim=projection, max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    ))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_dim * 5 + projection,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 16),
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe: Any = StableDiffusionXLImg2ImgPipeline(  # diffusers' annotations are partial
        vae=vae, text_encoder=None, text_encoder_2=text_encoder, tokenizer=None, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reference_refiner(tmp_path_factory.mktemp("reference-refiner"))


def _start(log_dir: Path, args: list[str], cache: Path) -> ServiceProcess:
    return start_service("refiner", "refiner_service", args, log_dir,
                         env={"HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cache),
                              "OMP_NUM_THREADS": str(THREADS)})


@pytest.fixture(scope="module")
def service(model_folder: Path, tmp_path_factory: pytest.TempPathFactory, cache_home: Path
            ) -> Iterator[ServiceProcess]:
    process = _start(tmp_path_factory.mktemp("sdxl-service"),
                     ["--backend", "sdxl", "--model", str(model_folder), "--device", "cpu",
                      "--chunk-bytes", str(CHUNK_BYTES)], cache_home)
    try:
        process.wait_ready(SERVICE, 120)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[refiner_pb2_grpc.RefinerServiceStub]:
    with grpc.insecure_channel(service.target) as channel:
        yield refiner_pb2_grpc.RefinerServiceStub(channel)


def call(stub: refiner_pb2_grpc.RefinerServiceStub, request: refiner_pb2.RefineRequest, media_type: str = "image/png",
         ) -> tuple[list[common_pb2.Progress], dict[int, Image.Image], refiner_pb2.RefineDone]:
    """One Refine call: progress events, decoded images by index, the done event."""
    progress: list[common_pb2.Progress] = []
    images: dict[int, Image.Image] = {}
    done: refiner_pb2.RefineDone | None = None
    assembler = ArtifactAssembler()
    chunks: dict[int, int] = {}
    for response in stub.Refine(request, timeout=CALL_TIMEOUT):
        kind = response.WhichOneof("event")
        if kind == "progress":
            assert not images, "progress after the first artifact"
            progress.append(response.progress)
        elif kind == "chunk":
            assert response.chunk.kind == common_pb2.ARTIFACT_KIND_REFINED_IMAGE
            assert response.chunk.media_type == media_type
            chunks[response.chunk.index] = chunks.get(response.chunk.index, 0) + 1
            artifact = assembler.feed(response.chunk)
            if artifact is not None:
                images[artifact.index] = Image.open(io.BytesIO(artifact.data))
        else:
            assert done is None
            done = response.done
    assert done is not None and not assembler.incomplete
    assert list(images) == sorted(images), "artifacts out of input order"
    assert all(n > 1 for n in chunks.values()), f"expected multi-chunk artifacts, got {chunks}"
    return progress, images, done


def assert_rate_limited_steps(progress: list[common_pb2.Progress], total: int, images: int) -> None:
    """What the service's default progress interval guarantees however fast the steps come: each image's count
    begins at step 1 and ends at ``total`` (``of total``), rising; steps in between may be left out."""
    assert progress and all(p.stage == common_pb2.STAGE_REFINE and p.total == total for p in progress), progress
    runs: list[list[int]] = []
    for p in progress:
        if p.step == 1:
            runs.append([])
        assert runs, f"the first event is step {p.step}, not 1"
        runs[-1].append(p.step)
    assert [(run[0], run[-1]) for run in runs] == [(1, total)] * images, runs
    assert all(run == sorted(set(run)) for run in runs), runs
    assert [p.message for p in progress if p.step == 1] == [f"image {i}/{images}" for i in range(1, images + 1)]


def direct_diffusers(folder: Path, image: Image.Image, seed: int, **kwargs: Any) -> Image.Image:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    # A plain diffusers call, as the README says to reproduce one: the service slices attention on CUDA only,
    # so on a CPU nothing differs, not even by a grey level.
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return pipe(image=image, generator=torch.Generator(device="cpu").manual_seed(seed), **kwargs).images[0]
    finally:
        torch.set_num_threads(threads)


def test_refine_matches_diffusers_pixel_for_pixel(stub: refiner_pb2_grpc.RefinerServiceStub,
                                                  model_folder: Path) -> None:
    inputs = [scene(128, seed=1), with_alpha(scene(128, seed=2))]
    parameters = common_pb2.RefineParameters(
        seed=1234, strength=0.6, guidance_scale=6.0, num_inference_steps=10,
        prompt="a ceramic vase, studio light", negative_prompt="smudge, noise",
        aesthetic_score=7.0, negative_aesthetic_score=2.0,
    )
    request = refiner_pb2.RefineRequest(
        request_id="pixel-test", parameters=parameters,
        images=[common_pb2.Image(data=png_bytes(image), media_type="image/png") for image in inputs],
    )
    progress, images, done = call(stub, request)

    effective = int(10 * 0.6)
    assert_rate_limited_steps(progress, effective, images=2)
    assert list(done.seeds) == [1234, 1235]
    assert done.backend == "sdxl" and done.device == "cpu"
    assert [t.stage for t in done.timings] == [common_pb2.STAGE_QUEUED, common_pb2.STAGE_REFINE]
    queued, refined = (t.seconds for t in done.timings)
    assert queued >= 0 and refined > 0

    for index, (image, seed) in enumerate(zip(inputs, [1234, 1235], strict=True)):
        expected = direct_diffusers(
            model_folder, image.convert("RGB"), seed, strength=0.6, guidance_scale=6.0, num_inference_steps=10,
            prompt="a ceramic vase, studio light", negative_prompt="smudge, noise",
            aesthetic_score=7.0, negative_aesthetic_score=2.0,
        )
        got = images[index]
        assert got.size == image.size and got.mode == image.mode
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(expected)), f"image {index} differs"
        if image.mode == "RGBA":
            assert np.array_equal(np.asarray(got.getchannel("A")), np.asarray(image.getchannel("A")))


@pytest.mark.parametrize(("images", "parameters", "message"), [
    ([b"this is not an image"], {}, "not a PNG, JPEG or WebP"),
    ([png_bytes(scene(64))[:300]], {}, "truncated or corrupt"),
    ([png_bytes(scene(64))], {"strength": 7.0}, "strength must be in"),
    ([], {}, "no images"),
    ([png_bytes(scene(64))], {"num_inference_steps": 2, "strength": 0.3}, "no denoising step"),
], ids=["not-an-image", "truncated-png", "strength-7", "zero-images", "no-effective-step"])
def test_bad_input_is_invalid_argument(stub: refiner_pb2_grpc.RefinerServiceStub, service: ServiceProcess,
                                       images: list[bytes], parameters: dict[str, Any], message: str) -> None:
    request = refiner_pb2.RefineRequest(
        images=[common_pb2.Image(data=data) for data in images],
        parameters=common_pb2.RefineParameters(**parameters),
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Refine(request, timeout=CALL_TIMEOUT))
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert health_status(service.target, SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_cancel_stops_the_denoising_loop(stub: refiner_pb2_grpc.RefinerServiceStub,
                                         service: ServiceProcess) -> None:
    long_request = refiner_pb2.RefineRequest(
        request_id="to-be-cancelled",
        images=[common_pb2.Image(data=png_bytes(scene(128)))],
        parameters=common_pb2.RefineParameters(seed=1, strength=1.0, num_inference_steps=200),
    )
    responses = stub.Refine(long_request, timeout=CALL_TIMEOUT)
    first = next(iter(responses))
    assert first.WhichOneof("event") == "progress" and first.progress.total == 200
    responses.cancel()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        list(responses)
    assert caught.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]

    # The single model worker serves the next request only after the cancelled job has left it.
    short = refiner_pb2.RefineRequest(
        images=[common_pb2.Image(data=png_bytes(scene(128)))],
        parameters=common_pb2.RefineParameters(seed=2, strength=0.5, num_inference_steps=4),
    )
    _, images, done = call(stub, short)
    assert list(done.seeds) == [2] and 0 in images

    deadline = time.monotonic() + 30
    while not (stopped := re.search(r"\[to-be-cancelled\].*stopping the denoising loop after step (\d+) of (\d+)",
                                    service.log_tail(400))):
        assert time.monotonic() < deadline, service.log_tail()
        time.sleep(0.1)
    step, total = int(stopped.group(1)), int(stopped.group(2))
    assert total == 200 and step < total
    assert re.search(r"\[to-be-cancelled\].*cancelled by the caller", service.log_tail(400))


def test_missing_weights_keep_readiness_off(tmp_path: Path, cache_home: Path) -> None:
    empty = tmp_path / "no-model-here"
    empty.mkdir()
    process = _start(tmp_path, ["--backend", "sdxl", "--model", str(empty), "--device", "cpu"], cache_home)
    try:
        deadline = time.monotonic() + 120
        while "cannot start its model" not in process.log_tail(200):
            assert process.process.poll() is None, process.log_tail()
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.1)
        assert "model_index.json" in process.log_tail(200)
        assert health_status(process.target, "") == health_pb2.HealthCheckResponse.SERVING  # alive
        assert health_status(process.target, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING  # not ready
    finally:
        process.stop()


def test_classic_service(tmp_path: Path, cache_home: Path) -> None:
    # Every step as it happens (the sdxl service above runs with the default interval): the flag reaches the worker.
    process = _start(tmp_path, ["--backend", "classic", "--chunk-bytes", str(CHUNK_BYTES),
                                "--progress-interval-s", "0"], cache_home)
    try:
        process.wait_ready(SERVICE, 60)
        with grpc.insecure_channel(process.target) as channel:
            image = with_alpha(scene(160))
            progress, images, done = call(refiner_pb2_grpc.RefinerServiceStub(channel), refiner_pb2.RefineRequest(
                images=[common_pb2.Image(data=png_bytes(image))],
                parameters=common_pb2.RefineParameters(seed=9),
            ))
        assert done.backend == "classic" and list(done.seeds) == [9]
        assert [(p.stage, p.step) for p in progress] == [(common_pb2.STAGE_REFINE, s) for s in (1, 2, 3, 4)]
        assert images[0].mode == "RGBA" and images[0].size == image.size
        assert "refiner backend: classic" in process.log_tail(200)
        # The hand-off form the gateway asks for when only TRELLIS sees the result: the same pixels, uncompressed TIFF.
        with grpc.insecure_channel(process.target) as channel:
            stub = refiner_pb2_grpc.RefinerServiceStub(channel)
            _, handed_off, _ = call(stub, refiner_pb2.RefineRequest(
                images=[common_pb2.Image(data=png_bytes(image))], parameters=common_pb2.RefineParameters(seed=9),
                output_media_type="image/tiff"), media_type="image/tiff")
            with pytest.raises(grpc.RpcError) as refused:
                call(stub, refiner_pb2.RefineRequest(images=[common_pb2.Image(data=png_bytes(image))],
                                                     output_media_type="image/gif"))
        assert handed_off[0].format == "TIFF" and handed_off[0].tobytes() == images[0].tobytes()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "output_media_type 'image/gif' is not image/png or image/tiff" in str(refused.value.details())
    finally:
        process.stop()
