"""``ImageRefiner`` (the Python API of the original TRELLIS-BOX feature) and the ``sdxl`` backend, with the tiny
model on the CPU."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refiner_service import ImageRefiner
from refiner_service.backends.sdxl import SDXLBackend
from tests.refiner.refiner_helpers import pixels, scene, with_alpha
from trellisbox._domain.errors import Cancelled, DeadlineExceeded, InvalidInput, ModelUnavailable
from trellisbox._domain.kinds import Stage
from trellisbox._domain.params import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, MAX_SEED, RefineParams
from trellisbox._runtime.worker import JobContext, ProgressEvent

FAST: dict[str, Any] = {"num_inference_steps": 4, "strength": 0.5}  # two UNet steps: enough to prove the plumbing


@pytest.fixture(scope="module")
def refiner(cache_home: Path) -> Iterator[ImageRefiner]:
    refiner = ImageRefiner(model="tiny", device="cpu")
    yield refiner
    refiner.unload()


def test_defaults_are_the_seeds() -> None:
    init = inspect.signature(ImageRefiner.__init__).parameters
    assert {k: init[k].default for k in list(init)[1:]} == {
        "model": "stabilityai/stable-diffusion-xl-refiner-1.0",
        "device": "auto",
        "use_fp16": True,
        "backend": "sdxl",
        "enable_attention_slicing": True,
        "enable_cpu_offload": True,
        "fall_back_to_input": True,
    }
    refine = inspect.signature(ImageRefiner.refine).parameters
    assert {k: refine[k].default for k in list(refine)[2:]} == {
        "strength": 0.3,
        "guidance_scale": 7.5,
        "num_inference_steps": 20,
        "prompt": "high quality, detailed, sharp",
        "negative_prompt": "blurry, low quality, distorted",
        "seed": None,
        "aesthetic_score": 6.0,
        "negative_aesthetic_score": 2.5,
    }
    # One source of truth: the API's defaults are the shared RefineParams'.
    assert (refine["prompt"].default, refine["negative_prompt"].default) == (DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT)
    batch = inspect.signature(ImageRefiner.refine_batch).parameters
    assert {k: batch[k].default for k in list(batch)[2:]} == {k: refine[k].default for k in list(refine)[2:]}


def test_lazy_load_and_default_refine(refiner: ImageRefiner) -> None:
    refiner.unload()
    assert not refiner.loaded
    image = scene(64)
    out = refiner.refine(image, seed=3)  # the original defaults: 20 steps × 0.3
    assert refiner.loaded and refiner.device == "cpu"
    assert out.mode == "RGB" and out.size == image.size
    assert refiner.last_seeds == [3]
    assert not np.array_equal(pixels(out), pixels(image))


def test_same_seed_same_pixels_other_seed_other_pixels(refiner: ImageRefiner) -> None:
    image = scene(64)
    a = refiner.refine(image, seed=11, **FAST)
    b = refiner.refine(image, seed=11, **FAST)
    c = refiner.refine(image, seed=12, **FAST)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_random_seed_is_recorded(refiner: ImageRefiner) -> None:
    image = scene(64)
    first = refiner.refine(image, **FAST)
    (seed,) = refiner.last_seeds
    assert np.array_equal(pixels(first), pixels(refiner.refine(image, seed=seed, **FAST)))


def test_alpha_is_kept(refiner: ImageRefiner) -> None:
    image = with_alpha(scene(64))
    out = refiner.refine(image, seed=1, **FAST)
    assert out.mode == "RGBA" and out.size == image.size
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(image.getchannel("A")))


def test_size_not_a_multiple_of_8_is_kept(refiner: ImageRefiner) -> None:
    image = with_alpha(scene(70)).crop((0, 0, 70, 61))
    out = refiner.refine(image, seed=1, **FAST)
    assert out.size == (70, 61)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(image.getchannel("A")))


def test_refine_batch_uses_seed_plus_i(refiner: ImageRefiner) -> None:
    images = [scene(64, seed=0), with_alpha(scene(64, seed=1)), scene(64, seed=2)]
    batch = refiner.refine_batch(images, seed=MAX_SEED - 1, **FAST)
    assert refiner.last_seeds == [MAX_SEED - 1, MAX_SEED, 0]  # wraps inside the 32-bit seed range
    for image, seed, out in zip(images, [MAX_SEED - 1, MAX_SEED, 0], batch, strict=True):
        assert np.array_equal(pixels(out), pixels(refiner.refine(image, seed=seed, **FAST)))


def test_unload_then_reload_gives_the_same_pixels(refiner: ImageRefiner) -> None:
    image = scene(64)
    before = refiner.refine(image, seed=5, **FAST)
    refiner.unload()
    assert not refiner.loaded
    refiner.unload()  # idempotent
    after = refiner.refine(image, seed=5, **FAST)
    assert refiner.loaded
    assert np.array_equal(pixels(before), pixels(after))


def test_invalid_parameters_are_raised_not_swallowed(refiner: ImageRefiner) -> None:
    with pytest.raises(InvalidInput, match="strength"):
        refiner.refine(scene(32), strength=7)
    with pytest.raises(InvalidInput, match="no denoising step"):
        refiner.refine(scene(32), num_inference_steps=1, strength=0.3)


def test_fall_back_to_input_on_failure(cache_home: Path, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    image = with_alpha(scene(32))
    with caplog.at_level(logging.WARNING):
        out = ImageRefiner(model=str(empty), device="cpu").refine(image, **FAST)
    assert out is image or np.array_equal(pixels(out), pixels(image))
    assert "refinement failed" in caplog.text and "model_index.json" in caplog.text

    with pytest.raises(ModelUnavailable, match=r"model_index\.json"):
        ImageRefiner(model=str(empty), device="cpu", fall_back_to_input=False).refine(image, **FAST)


def test_cancellation_is_never_swallowed(refiner: ImageRefiner, monkeypatch: pytest.MonkeyPatch) -> None:
    def cancelled(*args: object, **kwargs: object) -> None:
        raise Cancelled("cancelled by the caller")

    monkeypatch.setattr(refiner.backend, "refine", cancelled)
    with pytest.raises(Cancelled):
        refiner.refine(scene(32))


def test_classic_backend_through_the_api() -> None:
    refiner = ImageRefiner(backend="classic")
    out = refiner.refine(with_alpha(scene(32)))
    assert out.mode == "RGBA" and refiner.backend.name == "classic"


def test_sdxl_progress_counts_effective_steps(cache_home: Path) -> None:
    backend = SDXLBackend("tiny", "cpu")
    events: list[ProgressEvent] = []
    params = RefineParams(num_inference_steps=10, strength=0.7)
    backend.refine([scene(32), scene(32, seed=1)], params, [1, 2], JobContext("t", None, events.append))
    assert [(e.stage, e.step, e.total) for e in events] == [(Stage.REFINE, s, 7) for s in range(1, 8)] * 2
    assert events[0].message == "image 1/2" and events[-1].message == "image 2/2"
    backend.unload()


def test_sdxl_stops_at_the_next_step(cache_home: Path) -> None:
    backend = SDXLBackend("tiny", "cpu")
    events: list[ProgressEvent] = []

    def cancel_after_two(event: ProgressEvent) -> None:
        events.append(event)
        if len(events) == 2:
            ctx.cancel()

    ctx = JobContext("t", None, cancel_after_two)
    with pytest.raises(Cancelled):
        backend.refine([scene(32), scene(32)], RefineParams(num_inference_steps=50, strength=1.0), [0, 1], ctx)
    assert len(events) == 2  # stopped right there: no further step, no second image

    expired = JobContext("t", 0.0, events.append)  # a deadline long gone
    with pytest.raises(DeadlineExceeded):
        backend.refine([scene(32)], RefineParams(), [0], expired)
    # A stopped run leaves the pipeline usable.
    assert backend.refine([scene(32)], RefineParams(**FAST), [0])[0].size == (32, 32)
    backend.unload()
