"""LeaseSettings: defaults, environment prefixes of the services that inherit it, validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from tests.lease.lease_helpers import child_env
from trellisbox._runtime.config import ServiceSettings, load_settings
from trellisbox._runtime.lease import LeaseSettings


class RefinerLikeSettings(ServiceSettings, LeaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRELLISBOX_REFINER_", extra="forbid", cli_kebab_case=True,
                                      cli_implicit_flags=True)


def test_defaults_are_dedicated_and_valid() -> None:
    s = LeaseSettings()
    assert (s.placement, s.lease_backend, s.lease_name, s.lease_namespace) == ("dedicated", "flock", "gpu-0",
                                                                               "default")
    assert (s.lease_duration_s, s.renew_deadline_s, s.retry_period_s) == (15, 10.0, 2.0)
    assert s.residency == "offload" and s.max_hold_s > 0 and s.lease_record is None
    assert s.lease_holder and " " not in s.lease_holder
    assert not s.shared and "dedicated" in s.lease_summary()


def test_service_env_prefix_and_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRELLISBOX_REFINER_PLACEMENT", "shared")
    monkeypatch.setenv("TRELLISBOX_REFINER_LEASE_BACKEND", "kubernetes")
    monkeypatch.setenv("TRELLISBOX_REFINER_LEASE_HOLDER", "refiner-7d9f-abcde")
    monkeypatch.setenv("TRELLISBOX_REFINER_LEASE_RECORD", str(tmp_path / "lease.jsonl"))
    s = load_settings(RefinerLikeSettings, ["--residency", "unload", "--max-hold-s", "4.5"])
    assert s.shared and s.lease_backend == "kubernetes" and s.lease_holder == "refiner-7d9f-abcde"
    assert s.residency == "unload" and s.max_hold_s == 4.5 and s.lease_record == tmp_path / "lease.jsonl"
    assert "backend=kubernetes" in s.lease_summary()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lease_duration_s": 10, "renew_deadline_s": 10}, "client-go"),
        ({"renew_deadline_s": 2, "retry_period_s": 2}, "1.2 × retry_period_s"),
        ({"retry_period_s": 0}, "greater than 0"),
        ({"lease_name": "GPU_0"}, "DNS-1123"),
        ({"lease_name": "gpu/0"}, "DNS-1123"),
        ({"lease_namespace": "a.b"}, "DNS-1123 label"),
        ({"lease_holder": "two words"}, "lease_holder"),
        ({"lease_holder": "  "}, "lease_holder"),
        ({"residency": "swap"}, "resident"),
        ({"placement": "both"}, "dedicated"),
        ({"lease_backend": "etcd"}, "flock"),
        ({"max_hold_s": -1}, "greater than or equal"),
        ({"lease_wait_s": 0}, "greater than 0"),
    ],
)
def test_invalid_values_are_refused_with_a_clear_message(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LeaseSettings.model_validate(fields)


def test_paths_are_checked(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValidationError, match="not a directory"):
        LeaseSettings(lease_dir=a_file)
    with pytest.raises(ValidationError, match="is a directory"):
        LeaseSettings(lease_record=tmp_path)
    assert LeaseSettings(lease_dir=tmp_path / "new").lease_dir == tmp_path / "new"


def test_importing_the_lease_package_does_not_import_kubernetes() -> None:
    """Services on the flock backend (and anything importing trellisbox._runtime.lease) skip the k8s client."""
    code = ("import sys, trellisbox._runtime.lease as lease\n"
            "assert 'kubernetes' not in sys.modules, 'kubernetes imported eagerly'\n"
            "assert lease.KubernetesLease.__name__ == 'KubernetesLease'\n")
    result = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
