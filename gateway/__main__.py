"""``python -m gateway``: serve GatewayService with health and reflection."""

from __future__ import annotations

import sys

import grpc

from gateway.admission import Admission
from gateway.config import GatewaySettings
from gateway.router import Router
from gateway.servicer import GatewayServicer, add_gateway_servicer
from gateway.stages import StageClients
from trellisbox._domain.contract import GATEWAY_SERVICE
from trellisbox._runtime.config import load_settings
from trellisbox._runtime.server import ServiceSpec, run


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(GatewaySettings, sys.argv[1:] if argv is None else argv)
    channels: list[StageClients] = []

    def register(server: grpc.aio.Server) -> None:
        # Channels must be created inside the server's event loop.
        stages = StageClients(settings)
        channels.append(stages)
        router = Router(stages, Admission(settings.max_concurrent, settings.max_queue))
        add_gateway_servicer(GatewayServicer(settings, router), server)

    async def close_channels() -> None:
        for stages in channels:
            await stages.close()

    spec = ServiceSpec(
        name=GATEWAY_SERVICE,
        register=register,
        describe=lambda: f"refiner={settings.refiner_target} trellis={settings.trellis_target}",
        on_shutdown=close_channels,
    )
    # The gateway only relays: its allocator is tuned for message-sized buffers (see tune_malloc).
    run(settings, spec, "gateway", streaming_malloc=True)


if __name__ == "__main__":
    main()
