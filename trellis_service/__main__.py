"""``python -m trellis_service [--port N] [--backend auto|trellis|preview] [--model ID_OR_FOLDER] ...``"""

from __future__ import annotations

import logging
import sys
import time

import grpc
import numpy as np
from PIL import Image

from trellis_service.backends import ImageTo3DBackend, select_backend
from trellis_service.config import TrellisSettings
from trellis_service.servicer import SERVICE_LABEL, BackendSlot, TrellisServicer
from trellisbox._domain.contract import TRELLIS_SERVICE
from trellisbox._domain.errors import ModelUnavailable
from trellisbox._domain.params import GenerationParams, SamplerParams
from trellisbox._runtime.config import load_settings
from trellisbox._runtime.model import NO_MODEL, build_model_runtime
from trellisbox._runtime.server import ServiceSpec, run
from trellisbox._runtime.worker import JobContext
from trellisbox.v1 import common_pb2, trellis_pb2_grpc

_log = logging.getLogger("trellis_service")

#: Warm-up: the whole path (preprocess, both samplers, decode, bake, export) at the smallest settings.
WARM_UP_PARAMS = GenerationParams(seed=0, sparse_structure=SamplerParams(2, 7.5), slat=SamplerParams(2, 3.0),
                                  texture_size=256)


def warm_up_image(side: int = 96) -> Image.Image:
    """A small RGBA object with a real alpha channel (so warm-up never needs background removal)."""
    yy, xx = np.mgrid[0:side, 0:side]
    radius = np.hypot(xx - side / 2, yy - side / 2)
    rgba = np.zeros((side, side, 4), dtype=np.uint8)
    rgba[..., 0] = (xx * 255 // side).astype(np.uint8)
    rgba[..., 1] = (yy * 255 // side).astype(np.uint8)
    rgba[..., 2] = 160
    rgba[..., 3] = np.where(radius < side * 0.35, 255, 0).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(TrellisSettings, sys.argv[1:] if argv is None else argv)
    slot = BackendSlot()
    # The backend is chosen during warm-up; until then there is nothing to move on a turn edge.
    runtime = build_model_runtime(SERVICE_LABEL, settings.max_queue, settings, lambda: slot.backend or NO_MODEL)
    worker = runtime.worker

    def prepare() -> ImageTo3DBackend:
        # Runs on the model thread: the pipeline is created, used and freed by that thread only.
        backend, warnings = select_backend(settings)
        for warning in warnings:
            _log.warning("preflight: %s", warning)
        backend.load()
        start = time.perf_counter()
        backend.generate([warm_up_image()], WARM_UP_PARAMS, {common_pb2.ARTIFACT_KIND_GLB},
                         JobContext("warm-up", None, lambda _: None))
        _log.info("warm-up generation on %s took %.2f s", backend.name, time.perf_counter() - start)
        return backend

    def warm_up() -> None:
        try:
            # Under the GPU lease in shared placement: loading and the first generation are GPU work.
            slot.backend = runtime.run_in_turn(prepare)
        except ModelUnavailable as exc:
            _log.error("TRELLIS service cannot start its model: %s", exc)
            raise
        runtime.publish_placement(slot.backend.device)

    def describe() -> str:
        backend = slot.backend.describe() if slot.backend is not None else f"backend={settings.backend} (not loaded)"
        return f"{backend} {settings.lease_summary()}"

    def register(server: grpc.aio.Server) -> None:
        trellis_pb2_grpc.add_TrellisServiceServicer_to_server(TrellisServicer(settings, worker, slot), server)

    def on_shutdown() -> None:
        backend = slot.backend
        # Free the model on its own thread, unless a job still runs (the process exit frees it anyway).
        idle = worker.in_flight == 0 and worker.queue_depth == 0
        try:
            runtime.close(backend.unload if backend is not None and idle else None)
        except Exception:
            _log.exception("shutting down the model runtime failed")

    spec = ServiceSpec(name=TRELLIS_SERVICE, register=register, warm_up=warm_up, describe=describe,
                       on_shutdown=on_shutdown)
    run(settings, spec, SERVICE_LABEL)


if __name__ == "__main__":
    main()
