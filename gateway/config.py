"""Gateway configuration (flags or ``TRELLISBOX_GATEWAY_*`` environment variables)."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from trellisbox._runtime.config import ServiceSettings
from trellisbox._runtime.security import TlsMode, is_loopback

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:\d{1,5})?\Z")
_ADDRESS_PORT = re.compile(r"^\[?([0-9A-Fa-f:.]+?)\]?:(\d{1,5})\Z")


def target_hosts(target: str) -> list[str]:
    """The hosts (or addresses) a target names: one, or each of an ``ipv4:``/``ipv6:`` list."""
    scheme, colon, rest = target.partition(":")
    if scheme in ("unix", "unix-abstract") and colon:
        return ["localhost"]  # a socket on this machine
    if scheme == "dns" and colon:
        endpoints = [rest[2:].partition("/")[2] if rest.startswith("//") else rest]
    elif scheme in ("ipv4", "ipv6") and colon:
        endpoints = rest.split(",")
    else:
        endpoints = [target]
    hosts = []
    for endpoint in endpoints:
        found = _ADDRESS_PORT.match(endpoint)
        hosts.append(found.group(1) if found else endpoint.rpartition(":")[0] if ":" in endpoint else endpoint)
    return hosts


def check_target(target: str) -> str:
    """A gRPC target this gateway can dial (gRPC's naming syntax), or ``ValueError`` saying how to write it.

    Caught at start, not on every request: ``dns:///127.0.0.1:A,127.0.0.1:B`` would otherwise fail each call with
    "Misformatted domain name".
    """
    scheme, colon, rest = target.partition(":")
    if scheme == "dns" and colon:
        endpoint = rest[2:].partition("/")[2] if rest.startswith("//") else rest
        if _HOST_PORT.match(endpoint):
            return target
        raise ValueError(f"{target!r}: a dns: target names one host[:port], e.g. dns:///refiner.ns.svc:50052; "
                         "for several fixed addresses use ipv4:10.0.0.1:50052,10.0.0.2:50052")
    if scheme in ("ipv4", "ipv6") and colon:
        for address in rest.split(","):
            found = _ADDRESS_PORT.match(address)
            try:
                ipaddress.ip_address(found.group(1) if found else "")
            except ValueError:
                raise ValueError(f"{target!r}: {address!r} is not an {scheme} address:port "
                                 f"(e.g. {'127.0.0.1:50052' if scheme == 'ipv4' else '[::1]:50052'})") from None
        return target
    if scheme in ("unix", "unix-abstract") and rest:
        return target
    if _HOST_PORT.match(target):
        return target  # host:port, resolved by DNS
    raise ValueError(f"{target!r} is not a gRPC target: use host:port, dns:///host:port, ipv4:addr:port[,addr:port] "
                     "or unix:path")


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
    max_held_bytes: int = Field(
        512 * 2**20, ge=2**20, description="Request bytes the gateway holds at once: a request is read only when "
        "twice max_request_bytes fit (until then HTTP/2 flow control keeps its bytes at the client), then holds twice "
        "its bytes (it and the stage request built from it) until it ends, so a request read is never refused for "
        "room; one that waits longer than receive_timeout_s for room is refused with RESOURCE_EXHAUSTED. The gateway "
        "never decodes images. Bounds the gateway's memory under any number of large uploads (docs/reliability.md)."
    )
    receive_timeout_s: float = Field(
        120.0, gt=0, description="How long a request may take to arrive once the gateway reads it, and to wait for "
        "room in max_held_bytes before that: a slower upload is refused (DEADLINE_EXCEEDED), so slow senders cannot "
        "hold the budget. 120 s lets a 64 MiB request arrive at 0.5 MiB/s."
    )
    default_timeout_s: float = Field(
        900.0, gt=0, description="Deadline applied when the client sets none (refine + generation); a durable "
        "request (one with a request_id) has at least this long, whatever its caller's deadline."
    )
    stage_retries: int = Field(
        3, ge=1, le=5, description="Attempts per stage call when a replica is UNAVAILABLE: before any reply, and "
        "also mid-stream (a replica that died), on another replica and within the caller's deadline, as long as no "
        "artifact chunk of that stage was relayed yet (the refined images are held back until complete)."
    )

    results_dir: Path | None = Field(
        None, description="Where the results of durable requests (those with a request_id) are kept, so that a caller "
        "who lost its connection can fetch them (GetResult); default $XDG_CACHE_HOME/trellisbox/results (or "
        "~/.cache/...). In Kubernetes a volume; gateway replicas that share one (ReadWriteMany) serve each other's "
        "finished results.",
    )
    results_retention_s: float = Field(
        3600.0, ge=0, description="How long a durable request's result is kept after it finished (0: not kept; a "
        "running job can still be attached to)."
    )
    results_max_bytes: int = Field(
        2 * 2**30, ge=0, description="Disk the stored results may take; the oldest are deleted first beyond it."
    )

    token_file: Path | None = Field(
        None, description="Bearer tokens clients must send (metadata authorization: Bearer <token>), one per line, "
        "reread when the file changes (a mounted Secret). Calls without a valid one get UNAUTHENTICATED; health "
        "checks never need one. Unset: no token needed."
    )
    reflection_needs_token: bool = Field(
        False, description="With token_file: server reflection needs a token too (by default grpcurl and GUI clients "
        "may list the API without one)."
    )
    stage_tls: TlsMode | None = Field(
        None, description="Transport to the model services. off: plaintext; on: TLS, their certificates verified "
        "against stage_ca_file; mutual: also present stage_cert_file (the model services run with tls=mutual). Unset: "
        "plaintext, allowed only when both targets are loopback addresses."
    )
    stage_ca_file: Path | None = Field(None, description="PEM CA bundle the model services' certificates chain to.")
    stage_cert_file: Path | None = Field(
        None, description="PEM client certificate the gateway presents to the model services (stage_tls=mutual); "
        "reread when it changes, for new connections."
    )
    stage_key_file: Path | None = Field(None, description="PEM private key of stage_cert_file.")

    @model_validator(mode="after")
    def _check_stage_tls(self) -> Self:
        remote = [t for t in (self.refiner_target, self.trellis_target)
                  if not all(is_loopback(host) for host in target_hosts(t))]
        if self.stage_tls is None and remote:
            raise ValueError(f"{remote[0]} is not on this machine: choose the transport to the model services with "
                             "stage_tls (mutual with stage_ca_file, stage_cert_file and stage_key_file; on with "
                             "stage_ca_file; or off for plaintext)")
        if self.stage_tls in ("on", "mutual") and self.stage_ca_file is None:
            raise ValueError(f"stage_tls={self.stage_tls} needs stage_ca_file (the model services' CA)")
        if self.stage_tls == "mutual" and (self.stage_cert_file is None or self.stage_key_file is None):
            raise ValueError("stage_tls=mutual needs stage_cert_file and stage_key_file (the gateway's certificate)")
        return self

    @property
    def results_path(self) -> Path:
        if self.results_dir is not None:
            return self.results_dir
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trellisbox" / "results"

    @field_validator("refiner_target", "trellis_target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        return check_target(value)
