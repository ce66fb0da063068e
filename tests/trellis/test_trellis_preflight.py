"""The TRELLIS preflight module: one verdict for the service and the container entrypoint.

The adapter tests (test_trellis_adapter.py) check what the service raises for each broken piece, and
tests/k8s/test_images.py what the entrypoint prints and exits with; here: the module on its own (standard
library only, the GPU probe, the Hugging Face cache lookup) and that both callers agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.trellis.trellis_standin import MODELS, REPO_ROOT, run_preflight_module, write_model_folder, write_standin
from trellis_service.backends.trellis import TrellisBackend
from trellis_service.config import TrellisSettings
from trellis_service.preflight import Check, PreflightConfig, PreflightResult, run_preflight
from trellisbox._domain.errors import ModelUnavailable

HUB_ID = "example-org/TRELLIS-cached"


def named(result: PreflightResult, name: str) -> Check:
    (check,) = [c for c in result.checks if c.name == name]
    return check


def test_imports_only_the_standard_library() -> None:
    """It must run where the service's own dependencies (pydantic, grpc, trellisbox, torch) are broken."""
    script = "import sys; before = set(sys.modules); import trellis_service.preflight; " \
             "print(' '.join(sorted(set(sys.modules) - before)))"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    imported = {name.split(".")[0] for name in proc.stdout.split()}
    assert imported - set(sys.stdlib_module_names) == {"trellis_service"}, imported


@pytest.mark.parametrize("env", [
    {},
    {"TRELLISBOX_TRELLIS_MODEL": "/weights/models/TRELLIS-image-large", "TRELLISBOX_TRELLIS_DEVICE": "cuda:1"},
    {"TRELLISBOX_TRELLIS_OFFLINE": "true", "TRELLISBOX_TRELLIS_ATTN_BACKEND": "xformers",
     "TRELLISBOX_TRELLIS_SPARSE_ATTN_BACKEND": "xformers", "TRELLISBOX_TRELLIS_SPARSE_BACKEND": "torchsparse",
     "TRELLISBOX_TRELLIS_SPCONV_ALGO": "native"},
    {"HF_HUB_OFFLINE": "1", "TRELLISBOX_TRELLIS_ATTN_BACKEND": "sdpa"},
    {"HF_HUB_OFFLINE": "0", "TRELLISBOX_TRELLIS_OFFLINE": "0"},
])
def test_entrypoint_config_is_the_service_config(env: dict[str, str], clean_trellis_env: pytest.MonkeyPatch) -> None:
    """The entrypoint reads the environment itself (no pydantic); the two must never drift apart."""
    for key in list(os.environ):
        if key.startswith("TRELLISBOX_"):
            clean_trellis_env.delenv(key)
    for key, value in env.items():
        clean_trellis_env.setenv(key, value)
    service = TrellisBackend.from_settings(TrellisSettings()).preflight_config
    assert PreflightConfig.from_environment(os.environ) == service


# -- the GPU probe (torch asked directly: what the container and the service both run) -------------------------


def gpu_checks(config: PreflightConfig) -> tuple[str, dict[str, Check]]:
    result = run_preflight(config)
    return result.device, {c.name: c for c in result.checks if c.name.startswith("gpu")}


def test_gpu_probe_passes_on_a_large_ampere_gpu(fake_torch: Callable[..., Path],
                                                clean_trellis_env: pytest.MonkeyPatch) -> None:
    fake_torch(gpus=2, memory_gib=24, capability=(8, 9))
    device, checks = gpu_checks(PreflightConfig(device="cuda:1"))
    assert device == "cuda:1"
    assert set(checks) == {"gpu", "gpu:flash_attn"} and all(c.ok for c in checks.values())
    assert "2 GPU(s); cuda:1 = NVIDIA L4, 24.0 GiB, compute 8.9" in checks["gpu"].detail


def test_gpu_probe_warns_about_memory_and_fails_flash_attn_on_turing(fake_torch: Callable[..., Path],
                                                                    clean_trellis_env: pytest.MonkeyPatch) -> None:
    fake_torch(memory_gib=12, capability=(7, 5))
    device, checks = gpu_checks(PreflightConfig())
    assert device == "cuda:0" and checks["gpu"].ok
    assert not checks["gpu:memory"].ok and not checks["gpu:memory"].required
    assert not checks["gpu:flash_attn"].ok and checks["gpu:flash_attn"].required
    assert "8.0+" in checks["gpu:flash_attn"].detail and "xformers" in checks["gpu:flash_attn"].detail
    # With xformers configured, the capability does not matter.
    environment = {"ATTN_BACKEND": "xformers", "SPARSE_ATTN_BACKEND": "xformers"}
    _, checks = gpu_checks(PreflightConfig(environment=environment))
    assert "gpu:flash_attn" not in checks


@pytest.mark.parametrize(("torch_kwargs", "device", "message"), [
    ({"gpus": 0}, "auto", "no CUDA GPU is visible"),
    ({"cuda": None}, "auto", "CPU-only build"),
    ({"gpus": 1}, "cuda:2", "only 1 GPU(s) are visible"),
    ({"gpus": 1}, "cpu", "no CPU path"),
    ({"gpus": 1}, "gpu0", "device must be"),
])
def test_gpu_probe_failures(fake_torch: Callable[..., Path], clean_trellis_env: pytest.MonkeyPatch,
                            torch_kwargs: dict[str, Any], device: str, message: str) -> None:
    fake_torch(**torch_kwargs)
    resolved, checks = gpu_checks(PreflightConfig(device=device))
    assert resolved == "" and not checks["gpu"].ok
    assert message in checks["gpu"].detail


# -- weights from the Hugging Face cache, looked up with the standard library ------------------------------------


def write_hub_cache(cache: Path, *, omit: tuple[str, ...] = ()) -> Path:
    """The layout huggingface_hub writes: models--org--name/refs/main naming snapshots/<revision>/."""
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    return write_model_folder(repo / "snapshots" / "0123abcd", omit=omit)


def test_hub_id_found_in_the_cache(tmp_path: Path, clean_trellis_env: pytest.MonkeyPatch) -> None:
    clean_trellis_env.delenv("HF_HUB_CACHE", raising=False)
    clean_trellis_env.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = write_hub_cache(tmp_path / "hf" / "hub")
    result = run_preflight(PreflightConfig(model=HUB_ID, offline=True))
    check = named(result, "weights:model")
    assert check.ok and str(snapshot) in check.detail
    assert result.weights_present and result.model_path == HUB_ID  # upstream resolves the id itself
    assert result.pipeline_args["models"] == MODELS
    # HF_HUB_CACHE wins over HF_HOME.
    clean_trellis_env.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert not named(run_preflight(PreflightConfig(model=HUB_ID, offline=True)), "weights:model").ok


def test_hub_id_partly_cached(tmp_path: Path, clean_trellis_env: pytest.MonkeyPatch) -> None:
    missing = f"{MODELS['slat_flow_model']}.safetensors"
    write_hub_cache(tmp_path / "hub", omit=(missing,))
    clean_trellis_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    offline = run_preflight(PreflightConfig(model=HUB_ID, offline=True))
    check = named(offline, "weights:model")
    assert check in offline.failures and missing in check.detail and "huggingface-cli download" in check.detail
    online = run_preflight(PreflightConfig(model=HUB_ID))
    check = named(online, "weights:model")
    assert check in online.warnings and "will download" in check.detail
    assert not online.weights_present and online.pipeline_args["models"] == MODELS


def test_hub_id_without_refs_main_is_not_cached(tmp_path: Path, clean_trellis_env: pytest.MonkeyPatch) -> None:
    write_hub_cache(tmp_path / "hub")
    (tmp_path / "hub" / ("models--" + HUB_ID.replace("/", "--")) / "refs" / "main").unlink()
    clean_trellis_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    check = named(run_preflight(PreflightConfig(model=HUB_ID, offline=True)), "weights:model")
    assert not check.ok and "not in the local Hugging Face cache" in check.detail


# -- one verdict: the service and the entrypoint on the same machine ---------------------------------------------


def service_and_entrypoint(standin_root: Path, torch_root: Path, monkeypatch: pytest.MonkeyPatch,
                           env: dict[str, str]) -> tuple[TrellisBackend, subprocess.CompletedProcess[str]]:
    """The service's backend built from its settings, and the entrypoint's strict run, for ``env``."""
    proc = run_preflight_module([torch_root, standin_root], {**env, "TRELLISBOX_TRELLIS_BACKEND": "trellis"},
                                "--json", "--mode", "strict")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return TrellisBackend.from_settings(TrellisSettings()), proc


def test_service_and_entrypoint_fail_the_same_checks(standin_root: Path, tmp_path: Path,
                                                     fake_torch: Callable[..., Path],
                                                     clean_trellis_env: pytest.MonkeyPatch) -> None:
    write_standin(standin_root, missing={"spconv"})
    torch_root = fake_torch(memory_gib=12, capability=(7, 5))
    folder = write_model_folder(tmp_path / "model", omit={f"{MODELS['slat_decoder_gs']}.json"})
    env = {"TRELLISBOX_TRELLIS_MODEL": str(folder), "TRELLISBOX_TRELLIS_OFFLINE": "1",
           "TORCH_HOME": str(tmp_path / "no-torch-home"), "U2NET_HOME": str(tmp_path / "no-u2net")}
    backend, proc = service_and_entrypoint(standin_root, torch_root, clean_trellis_env, env)
    with pytest.raises(ModelUnavailable) as info:
        backend.preflight()

    assert proc.returncode == 78, proc.stderr
    checks = [Check(**c) for c in json.loads(proc.stdout)]
    failed = [c for c in checks if not c.ok and c.required]
    assert [c.name for c in failed] == ["gpu:flash_attn", "trellis", "ext:spconv.pytorch", "weights:model",
                                        "weights:dinov2"]
    for check in failed:  # the service names every failure, with the entrypoint's words
        assert f"{check.name}: {check.detail.rstrip('.')}" in str(info.value)
    for check in checks:
        if check.name in ("gpu:memory", "weights:u2net"):  # warnings in both: they never stop the service
            assert not check.ok and not check.required and check.name not in str(info.value)
    # And check by check, the service's run is the entrypoint's.
    assert [dataclasses.asdict(c) for c in run_preflight(backend.preflight_config).checks] == json.loads(proc.stdout)


def test_service_and_entrypoint_pass_with_the_same_warnings(standin_root: Path, model_dir: Path, tmp_path: Path,
                                                            fake_torch: Callable[..., Path],
                                                            clean_trellis_env: pytest.MonkeyPatch) -> None:
    write_standin(standin_root)
    torch_root = fake_torch(memory_gib=12)
    env = {"TRELLISBOX_TRELLIS_MODEL": str(model_dir), "TORCH_HOME": str(tmp_path / "no-torch-home"),
           "U2NET_HOME": str(tmp_path / "no-u2net")}
    backend, proc = service_and_entrypoint(standin_root, torch_root, clean_trellis_env, env)
    warnings = backend.preflight()

    assert proc.returncode == 0, proc.stderr
    entrypoint_warnings = [c["detail"] for c in json.loads(proc.stdout) if not c["ok"] and not c["required"]]
    assert warnings == entrypoint_warnings and len(warnings) == 3  # gpu:memory, weights:dinov2, weights:u2net
    assert backend.device == "cuda:0" and backend.weights_present


def test_deep_creates_a_rasterizer_context(standin_root: Path, fake_torch: Callable[..., Path],
                                           clean_trellis_env: pytest.MonkeyPatch) -> None:
    write_standin(standin_root)
    (standin_root / "nvdiffrast" / "torch.py").write_text(
        "class RasterizeCudaContext:\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('Cuda error: 209[cudaErrorNoKernelImageForDevice]')\n")
    fake_torch()
    assert not any(c.name == "ext:nvdiffrast-context" for c in run_preflight(PreflightConfig()).checks)
    check = named(run_preflight(PreflightConfig(deep=True)), "ext:nvdiffrast-context")
    assert not check.ok and "cudaErrorNoKernelImageForDevice" in check.detail
