"""``fixed-latency``: a load-testing refiner backend that returns each input image unchanged after a fixed
wait, using no CPU while it waits.

From the host's point of view this is what a GPU-bound model looks like: the model thread is busy for a
known time per image while the CPU stays free. Benchmarks use it to measure the serving path (gateway
routing, ``dns:///`` + round_robin over replicas, queueing) without the host's cores being what is
measured. Never use it to serve users: it does not refine anything.

The wait is the ``fixed_latency_ms`` setting (``--fixed-latency-ms``) per image, split into as many
slices as the SDXL refiner would run denoising steps (``int(num_inference_steps × strength)``, at least
one), with one progress event per slice and a cancellation check between slices, so the progress stream
and cancellation behave like the real backend's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from PIL import Image

from refiner_service.backends.base import RefinerBackend
from trellisbox._domain.kinds import Stage
from trellisbox._domain.params import RefineParams
from trellisbox._runtime.model import WeightFreeBackend
from trellisbox._runtime.worker import JobContext

_log = logging.getLogger(__name__)

DEFAULT_LATENCY_MS = 200.0


class FixedLatencyBackend(WeightFreeBackend, RefinerBackend):
    """Args:
        latency_ms: Wall time per image, spent sleeping on the model thread.
    """

    name = "fixed-latency"

    def __init__(self, latency_ms: float = DEFAULT_LATENCY_MS) -> None:
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        self.latency_ms = float(latency_ms)

    @property
    def device(self) -> str:
        return "none"

    def describe(self) -> str:
        return f"backend=fixed-latency ({self.latency_ms:g} ms per image, no model: load testing only)"

    def refine(self, images: Sequence[Image.Image], params: RefineParams, seeds: Sequence[int],
               ctx: JobContext | None = None) -> list[Image.Image]:
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        self.load()
        slices = max(1, int(params.num_inference_steps * params.strength))
        pause = self.latency_ms / 1000 / slices
        out = []
        for index, image in enumerate(images):
            label = f"image {index + 1}/{len(images)}"
            for step in range(slices):
                if ctx is not None:
                    ctx.raise_if_stopped()
                time.sleep(pause)
                if ctx is not None:
                    ctx.report(Stage.REFINE, step + 1, slices, label)
            out.append(image)
        return out
