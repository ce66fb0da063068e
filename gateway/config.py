"""Gateway configuration (flags or ``TRELLISBOX_GATEWAY_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from trellisbox._runtime.config import ServiceSettings


class GatewaySettings(ServiceSettings):
    """Settings of ``python -m gateway``."""

    model_config = SettingsConfigDict(env_prefix="TRELLISBOX_GATEWAY_")  # merged with the base config

    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    refiner_target: str = Field(
        "dns:///127.0.0.1:50052",
        description="Refiner pool. In Kubernetes: dns:///<headless-service>.<ns>.svc.cluster.local:50052, "
        "so requests are spread over every ready replica (round_robin).",
    )
    trellis_target: str = Field("dns:///127.0.0.1:50053", description="TRELLIS service target.")
    max_concurrent: int = Field(
        4, ge=1, description="Requests routed through the stages at once; the rest wait in the queue."
    )
    default_timeout_s: float = Field(
        900.0, gt=0, description="Deadline applied when the client sets none (refine + generation)."
    )
    stage_retries: int = Field(
        3, ge=1, le=5, description="Attempts per stage call when a replica is UNAVAILABLE before any reply."
    )
