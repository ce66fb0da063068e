"""``python -m gateway``: serve GatewayService with health and reflection."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator

import grpc

from gateway.admission import Admission, ByteBudget
from gateway.config import GatewaySettings
from gateway.results import DurableJobs, ResultStore
from gateway.router import Router
from gateway.servicer import GatewayServicer, add_gateway_servicer
from gateway.stages import StageClients
from trellisbox._domain.contract import GATEWAY_SERVICE
from trellisbox._runtime.allocator import STREAMING
from trellisbox._runtime.config import refuse_start, settings_or_exit
from trellisbox._runtime.security import TokenFile, TokenInterceptor
from trellisbox._runtime.server import ServiceSpec, run

_log = logging.getLogger("gateway")
#: How often readiness looks at the stages' channels.
STAGE_CHECK_S = 1.0
#: How much sooner than the grace period's end durable requests still running are stopped.
DRAIN_MARGIN_S = 1.0


def main(argv: list[str] | None = None) -> None:
    settings = settings_or_exit(GatewaySettings, sys.argv[1:] if argv is None else argv)
    channels: list[StageClients] = []
    # Made (and checked) before the server starts: an unwritable results directory fails the start, not a request.
    try:
        jobs = DurableJobs(ResultStore(settings.results_path, settings.results_retention_s,
                                       settings.results_max_bytes, stale_after_s=settings.longest_call_s))
    except OSError as exc:
        refuse_start(GatewaySettings, f"cannot use the results folder {settings.results_path}: "
                     f"{exc.strerror or exc}")

    def register(server: grpc.aio.Server) -> None:
        # Channels must be created inside the server's event loop.
        stages = StageClients(settings)
        channels.append(stages)
        budget = ByteBudget(settings.max_held_bytes)
        router = Router(stages, Admission(settings.max_concurrent, settings.max_queue), settings.stage_retries,
                        budget=budget, max_message_bytes=settings.max_request_bytes)
        add_gateway_servicer(GatewayServicer(settings, router, budget, jobs), server)

    async def drain_jobs(grace_s: float) -> None:
        # Durable requests get the calls' grace, less a margin: one stopped then ends its callers' calls with its
        # own CANCELLED message before the server cancels what is left of them.
        await jobs.drain(max(0.0, grace_s - DRAIN_MARGIN_S))

    async def close_channels() -> None:
        for stages in channels:
            await stages.close()

    async def stages_reachable() -> AsyncIterator[bool]:
        # Readiness: every request needs the TRELLIS stage; without a ready refiner only refinement fails (each such
        # request with UNAVAILABLE "refiner: ..."), so the gateway stays ready for the rest and says so in its log.
        missing: list[str] | None = None
        while True:
            now = channels[0].unreachable()
            if now != missing and now:
                _log.warning("no ready replica of %s (refiner %s, trellis %s)%s", " and ".join(now),
                             settings.refiner_target, settings.trellis_target,
                             "" if "trellis" in now else ": requests that ask for refinement fail until one is back")
            missing = now
            yield "trellis" not in now
            await asyncio.sleep(STAGE_CHECK_S)

    interceptors = []
    tokens_in_use = f"bearer tokens from {settings.token_file}" if settings.token_file else "no token needed"
    if settings.token_file is not None:
        # Read now: a missing or empty token file stops the gateway at start instead of refusing every call.
        try:
            tokens = TokenFile(settings.token_file)
        except ValueError as exc:
            refuse_start(GatewaySettings, str(exc))
        interceptors.append(TokenInterceptor(tokens, open_reflection=not settings.reflection_needs_token))
    spec = ServiceSpec(
        name=GATEWAY_SERVICE,
        register=register,
        describe=lambda: (f"refiner={settings.refiner_target} trellis={settings.trellis_target} "
                          f"results={settings.results_path} stage transport={settings.stage_tls or 'off'}; "
                          + tokens_in_use),
        on_drain=drain_jobs,
        on_shutdown=close_channels,
        readiness=stages_reachable,
        interceptors=interceptors,
    )
    # The gateway only relays: its allocator is tuned for message-sized buffers (see tune_malloc).
    run(settings, spec, "gateway", malloc=STREAMING)


if __name__ == "__main__":
    main()
