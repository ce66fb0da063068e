"""``python -m refiner_service [--port N --backend auto|sdxl|classic --model ID|FOLDER|tiny --device ...]``.

Readiness turns SERVING only after the model is loaded and has refined one small image.
"""

from __future__ import annotations

import sys

import grpc
from PIL import Image

from refiner_service.backends import RefinerBackend, create_backend
from refiner_service.backends.sdxl import SDXLBackend
from refiner_service.config import RefinerSettings
from refiner_service.servicer import SERVICE_LABEL, RefinerServicer
from trellisbox._domain.contract import REFINER_SERVICE
from trellisbox._domain.params import RefineParams
from trellisbox._runtime.config import load_settings
from trellisbox._runtime.model import build_model_runtime
from trellisbox._runtime.observability import configure_logging
from trellisbox._runtime.server import ServiceSpec, run
from trellisbox.v1 import refiner_pb2_grpc

# Small and short (2 UNet steps), yet it runs every sub-model once: kernels and allocator are warm.
_WARM_UP_IMAGE_SIZE = (128, 128)
_WARM_UP_PARAMS = RefineParams(strength=0.5, num_inference_steps=4)


def _warm_up(backend: RefinerBackend) -> None:
    backend.load()
    image = Image.new("RGB", _WARM_UP_IMAGE_SIZE, (127, 127, 127))
    backend.refine([image], _WARM_UP_PARAMS, [0])


def build_spec(settings: RefinerSettings) -> ServiceSpec:
    """Backend, worker and servicer wired into the shared bootstrap."""
    backend = create_backend(settings.backend, settings.model, settings.device, use_fp16=settings.use_fp16,
                             attention_slicing=settings.attention_slicing, cpu_offload=settings.cpu_offload,
                             fixed_latency_ms=settings.fixed_latency_ms)
    if isinstance(backend, SDXLBackend):
        backend.show_progress_bars = False  # loading bars are for terminals, not for a service log
    runtime = build_model_runtime(SERVICE_LABEL, settings.max_queue, settings, lambda: backend)
    servicer = RefinerServicer(backend, runtime.worker, settings)

    def register(server: grpc.aio.Server) -> None:
        refiner_pb2_grpc.add_RefinerServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]

    def warm_up() -> None:
        # On the model thread (the pipeline is only ever touched by that one thread), and under the GPU
        # lease in shared placement: loading is GPU work too.
        runtime.run_in_turn(lambda: _warm_up(backend))
        runtime.publish_placement(backend.device)

    return ServiceSpec(
        name=REFINER_SERVICE,
        register=register,
        warm_up=warm_up,
        describe=lambda: f"{backend.describe()} {settings.lease_summary()}",
        # On the model thread, after any job still running has stopped: never free a model mid-step.
        on_shutdown=lambda: runtime.close(backend.unload),
    )


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(RefinerSettings, sys.argv[1:] if argv is None else argv)
    # Before the backend is chosen, so the WARNING that says which backend runs is formatted and kept.
    configure_logging(SERVICE_LABEL, settings.log_level)
    run(settings, build_spec(settings), SERVICE_LABEL)


if __name__ == "__main__":
    main()
