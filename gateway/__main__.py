"""``python -m gateway``: serve GatewayService with health and reflection."""

from __future__ import annotations

import sys

import grpc

from gateway.admission import Admission
from gateway.config import GatewaySettings
from gateway.router import Router
from gateway.servicer import GatewayServicer
from gateway.stages import StageClients
from trellisbox.config import load_settings
from trellisbox.server import ServiceSpec, run
from trellisbox.stack import GATEWAY_SERVICE
from trellisbox.v1 import gateway_pb2_grpc


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(GatewaySettings, sys.argv[1:] if argv is None else argv)

    def register(server: grpc.aio.Server) -> None:
        # Channels must be created inside the server's event loop.
        stages = StageClients(settings)
        router = Router(stages, Admission(settings.max_concurrent, settings.max_queue))
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(settings, router), server)

    spec = ServiceSpec(
        name=GATEWAY_SERVICE,
        register=register,
        describe=lambda: f"refiner={settings.refiner_target} trellis={settings.trellis_target}",
    )
    run(settings, spec, "gateway")


if __name__ == "__main__":
    main()
