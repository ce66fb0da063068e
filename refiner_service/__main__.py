"""``python -m refiner_service [--port N --backend auto|sdxl|classic --model ID|FOLDER|tiny --device ...]``.

Readiness turns SERVING only after the backend is chosen, loaded and has refined one small image.
"""

from __future__ import annotations

import sys

from refiner_service.backends import RefinerBackend, create_backend
from refiner_service.config import RefinerSettings
from refiner_service.servicer import RefinerServicer, add_refiner_servicer
from trellisbox._domain.contract import REFINER_SERVICE
from trellisbox._runtime.model import ModelService, serve_model


def _choose_backend(settings: RefinerSettings) -> RefinerBackend:
    return create_backend(settings, show_progress_bars=False)  # bars are for terminals, not a service log


SERVICE = ModelService(
    name=REFINER_SERVICE,
    label="refiner",
    settings=RefinerSettings,
    choose_backend=_choose_backend,
    servicer=RefinerServicer,
    register=add_refiner_servicer,
)


def main(argv: list[str] | None = None) -> None:
    serve_model(SERVICE, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
