"""The ``classic`` backend: weight-free CPU restoration."""

from __future__ import annotations

import numpy as np
import pytest

from refiner_service.backends import classic
from refiner_service.backends.classic import ClassicBackend
from tests.refiner.refiner_helpers import blockiness, jpeg_degraded, pixels, scene, with_alpha
from trellisbox._domain.errors import Cancelled
from trellisbox._domain.kinds import Stage
from trellisbox._domain.params import RefineParams
from trellisbox._runtime.worker import JobContext, ProgressEvent


def refine(image, strength: float = 0.3):  # type: ignore[no-untyped-def]
    return ClassicBackend().refine([image], RefineParams(strength=strength), [0])[0]


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_keeps_size_and_mode(mode: str) -> None:
    image = scene(72) if mode == "RGB" else with_alpha(scene(72))
    out = refine(image.crop((0, 0, 72, 50)))
    assert out.size == (72, 50)
    assert out.mode == mode


def test_alpha_is_kept_exactly() -> None:
    image = with_alpha(jpeg_degraded(scene(96)))
    out = refine(image, 0.8)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(image.getchannel("A")))


def test_deterministic() -> None:
    image = jpeg_degraded(scene(64))
    assert np.array_equal(pixels(refine(image)), pixels(refine(image)))


def test_stronger_strength_changes_more() -> None:
    image = jpeg_degraded(scene(128))
    changes = [np.abs(pixels(refine(image, s)) - pixels(image)).mean() for s in (0.1, 0.3, 0.6, 1.0)]
    assert changes[0] > 0
    assert changes == sorted(changes) and len(set(changes)) == len(changes), changes


def test_reduces_jpeg_blockiness() -> None:
    clean = scene(256)
    degraded = jpeg_degraded(clean, quality=10)
    before = blockiness(degraded)
    assert before > 2 * blockiness(clean)  # the test image really is blocky
    after_default = blockiness(refine(degraded))  # the default strength 0.3 of the original feature
    after_strong = blockiness(refine(degraded, 1.0))
    assert after_default < 0.7 * before, (before, after_default)
    assert after_strong < after_default


def test_default_strength_is_subtle() -> None:
    # The original feature's promise: the default strength does not change the content, only cleans it up.
    clean = scene(128)
    assert np.abs(pixels(refine(clean)) - pixels(clean)).mean() < 5.0


def test_reports_each_pass_and_stops_when_cancelled() -> None:
    events: list[ProgressEvent] = []
    ctx = JobContext("t", None, events.append)
    images = [scene(32), scene(32, seed=1)]
    out = ClassicBackend().refine(images, RefineParams(), [0, 1], ctx)
    assert len(out) == 2
    assert [(e.stage, e.step, e.total) for e in events] == [(Stage.REFINE, s, 4) for s in (1, 2, 3, 4)] * 2
    assert events[-1].message.startswith("image 2/2")

    def cancel_after_first(event: ProgressEvent) -> None:
        events.append(event)
        ctx.cancel()

    events.clear()
    ctx = JobContext("t", None, cancel_after_first)
    with pytest.raises(Cancelled):
        ClassicBackend().refine(images, RefineParams(), [0, 1], ctx)
    assert len(events) == 1


@pytest.mark.parametrize("band_rows", [8, 24, 64])
def test_band_by_band_is_the_same_as_the_whole_image(band_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    image = jpeg_degraded(scene(203, seed=4), quality=15)  # 203 rows: bands that end off the block grid too
    whole = ClassicBackend().refine([image], RefineParams(strength=0.7), [0])[0]
    monkeypatch.setattr(classic, "BAND_ROWS", band_rows)
    banded = ClassicBackend().refine([image], RefineParams(strength=0.7), [0])[0]
    assert np.array_equal(pixels(whole), pixels(banded))


def test_a_large_image_stops_within_a_band(monkeypatch: pytest.MonkeyPatch) -> None:
    # The caller cancels while the 3rd band computes; the job must stop at the end of that band.
    checks: list[int] = []
    ctx = JobContext("stop-test", None, lambda _: None)

    def counting_check() -> None:
        checks.append(len(checks))
        JobContext.raise_if_stopped(ctx)
        if len(checks) == 3:
            ctx.cancel()

    monkeypatch.setattr(ctx, "raise_if_stopped", counting_check)
    monkeypatch.setattr(classic, "BAND_ROWS", 64)
    with pytest.raises(Cancelled):
        ClassicBackend().refine([scene(1024)], RefineParams(), [0], ctx)
    assert len(checks) == 4  # the check after the one that asked to stop raised: one band, 64 of 1024 rows
