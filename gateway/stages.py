"""Channels and stubs to the model services, one long-lived channel per stage.

The refiner target is normally ``dns:///<headless service>:port``: with the round_robin policy and
client-side health checking, calls are spread over every replica that reports its readiness service
SERVING, and replicas that appear or disappear are picked up when the servers' max connection age
makes the channel re-resolve.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from gateway.config import GatewaySettings
from trellisbox.stack import REFINER_SERVICE, TRELLIS_SERVICE
from trellisbox.v1 import refiner_pb2_grpc, trellis_pb2_grpc


def service_config(service: str, attempts: int) -> str:
    """Round-robin over healthy backends; retry UNAVAILABLE (a replica that went away) before any reply."""
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": service},
    }
    if attempts > 1:  # gRPC rejects a retry policy with fewer than 2 attempts
        config["methodConfig"] = [{
            "name": [{"service": service}],
            "retryPolicy": {
                "maxAttempts": attempts,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    return json.dumps(config)


def channel_options(settings: GatewaySettings, service: str) -> list[tuple[str, int | str]]:
    return [
        ("grpc.service_config", service_config(service, settings.stage_retries)),
        ("grpc.enable_retries", 1),
        # Requests carry whole images; let retries buffer them instead of committing early.
        ("grpc.per_rpc_retry_buffer_size", settings.max_request_bytes),
        ("grpc.retry_buffer_size", 4 * settings.max_request_bytes),
        ("grpc.max_send_message_length", settings.max_request_bytes),
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


class StageClients:
    """The gateway's stubs for the refiner pool and the TRELLIS service."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._refiner_channel = grpc.aio.insecure_channel(
            settings.refiner_target, options=channel_options(settings, REFINER_SERVICE)
        )
        self._trellis_channel = grpc.aio.insecure_channel(
            settings.trellis_target, options=channel_options(settings, TRELLIS_SERVICE)
        )
        self.refiner = refiner_pb2_grpc.RefinerServiceStub(self._refiner_channel)
        self.trellis = trellis_pb2_grpc.TrellisServiceStub(self._trellis_channel)

    async def close(self) -> None:
        await self._refiner_channel.close(None)
        await self._trellis_channel.close(None)
