"""``python -m trellis_service [--port N] [--backend auto|trellis|preview] [--model ID_OR_FOLDER] ...``

Readiness turns SERVING only after the backend is chosen, loaded and has generated one small asset.
"""

from __future__ import annotations

import sys

from trellis_service.backends import choose_backend
from trellis_service.config import TrellisSettings
from trellis_service.servicer import TrellisServicer, add_trellis_servicer
from trellisbox._domain.contract import TRELLIS_SERVICE
from trellisbox._runtime.model import ModelService, serve_model

SERVICE = ModelService(
    name=TRELLIS_SERVICE,
    label="trellis",
    settings=TrellisSettings,
    choose_backend=choose_backend,
    servicer=TrellisServicer,
    register=add_trellis_servicer,
)


def main(argv: list[str] | None = None) -> None:
    serve_model(SERVICE, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
