"""Lease settings both model services inherit.

Mixed into each model service's settings class, so the fields take that service's environment
prefix, e.g. ``TRELLISBOX_REFINER_PLACEMENT=shared``, ``TRELLISBOX_TRELLIS_LEASE_DIR=/lease``::

    class RefinerSettings(ServiceSettings, LeaseSettings):
        model_config = SettingsConfigDict(env_prefix="TRELLISBOX_REFINER_", ...)
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

Placement = Literal["dedicated", "shared"]
LeaseBackend = Literal["flock", "kubernetes"]
Residency = Literal["resident", "offload", "unload"]

# Kubernetes object names: DNS-1123 subdomain (also safe as a file name: no "/").
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?\Z")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


def default_holder() -> str:
    """``<hostname>-<pid>``: the hostname is the pod name inside Kubernetes."""
    return f"{socket.gethostname()}-{os.getpid()}"


def default_lease_dir() -> Path:
    return Path(tempfile.gettempdir()) / "trellisbox-lease"


class LeaseSettings(BaseModel):
    """Where a model service runs relative to its GPU, and how it shares that GPU.

    ``placement=dedicated`` (the default) ignores every other field: the service owns its GPU.
    """

    placement: Placement = Field(
        default="dedicated", description="dedicated: this service owns its GPU; shared: it time-shares one GPU "
        "with the other model service under a lease.")
    lease_backend: LeaseBackend = Field(
        default="flock", description="flock: a lock file in lease_dir (emptyDir in one pod, hostPath on one node); "
        "kubernetes: a coordination.k8s.io/v1 Lease object (no hostPath needed).")
    lease_dir: Path = Field(
        default_factory=default_lease_dir,
        description="flock backend: directory both contenders mount; one <lease_name>.lock per GPU "
        "(default: <temp dir>/trellisbox-lease).")
    lease_name: str = Field(default="gpu-0", description="The GPU's lease name: the lock file stem or the Lease "
                            "object name. Both services sharing a GPU must use the same name.")
    lease_namespace: str = Field(default="default", description="kubernetes backend: namespace of the Lease.")
    lease_holder: str = Field(
        default_factory=default_holder,
        description="This contender's identity (holderIdentity): the pod name in Kubernetes; must differ "
        "between the two contenders (default: <hostname>-<pid>).")
    lease_duration_s: int = Field(default=15, ge=1, le=3600, description="kubernetes backend: leaseDurationSeconds.")
    renew_deadline_s: float = Field(default=10.0, gt=0, description="kubernetes backend: a holder that cannot "
                                    "renew for this long marks the lease lost and stops GPU work.")
    retry_period_s: float = Field(default=2.0, gt=0, description="kubernetes backend: renew and poll interval.")
    residency: Residency = Field(
        default="offload", description="Where the model waits between GPU turns: resident (stays in VRAM), "
        "offload (host RAM), unload (freed; reloaded from disk).")
    max_hold_s: float = Field(
        default=20.0, ge=0, le=3600, description="Hand-off batching: keep the GPU while this service's queue has "
        "work, up to this long since acquisition when the peer waits; 0 yields after every job.")
    lease_wait_s: float = Field(default=300.0, gt=0, description="Longest a job waits for its GPU turn before "
                                "failing with UNAVAILABLE (the job's own deadline may end it sooner).")
    lease_record: Path | None = Field(
        default=None, description="Append every acquire/release/lost as a JSON line to this file (several "
        "processes may share it).")

    @field_validator("lease_name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if len(value) > 253 or not _SUBDOMAIN.match(value):
            raise ValueError(
                f"lease_name must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', starting "
                f"and ending with a letter or digit, at most 253 characters), e.g. 'gpu-0'; got {value!r}")
        return value

    @field_validator("lease_namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if len(value) > 63 or not _LABEL.match(value):
            raise ValueError(f"lease_namespace must be a DNS-1123 label (lowercase letters, digits and '-', "
                             f"at most 63 characters); got {value!r}")
        return value

    @field_validator("lease_holder")
    @classmethod
    def _check_holder(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 253 or any(not ch.isprintable() or ch.isspace() for ch in value):
            raise ValueError(f"lease_holder must be 1-253 printable characters without spaces (the pod "
                             f"name in Kubernetes); got {value!r}")
        return value

    @field_validator("lease_dir")
    @classmethod
    def _check_dir(cls, value: Path) -> Path:
        value = value.expanduser()
        if str(value).strip() in ("", "."):
            raise ValueError("lease_dir must name a directory, e.g. /var/run/trellisbox/lease")
        if value.exists() and not value.is_dir():
            raise ValueError(f"lease_dir {value} exists and is not a directory")
        return value

    @field_validator("lease_record")
    @classmethod
    def _check_record(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if value.is_dir():
            raise ValueError(f"lease_record must be a file path, but {value} is a directory")
        return value

    @model_validator(mode="after")
    def _check_timing(self) -> LeaseSettings:
        d, r, p = self.lease_duration_s, self.renew_deadline_s, self.retry_period_s
        if not d > r > 1.2 * p:
            raise ValueError(
                "lease timing must satisfy lease_duration_s > renew_deadline_s > 1.2 × retry_period_s "
                f"(client-go rule); got lease_duration_s={d:g}, renew_deadline_s={r:g}, "
                f"retry_period_s={p:g} (1.2 × {p:g} = {1.2 * p:g})")
        return self

    @property
    def shared(self) -> bool:
        return self.placement == "shared"

    def lease_summary(self) -> str:
        """One line for the startup log."""
        if not self.shared:
            return "placement=dedicated (no GPU lease)"
        where = (f"dir={self.lease_dir}" if self.lease_backend == "flock"
                 else f"namespace={self.lease_namespace} duration={self.lease_duration_s}s "
                      f"renew_deadline={self.renew_deadline_s:g}s retry={self.retry_period_s:g}s")
        return (f"placement=shared backend={self.lease_backend} lease={self.lease_name} {where} "
                f"holder={self.lease_holder} residency={self.residency} max_hold={self.max_hold_s:g}s")
