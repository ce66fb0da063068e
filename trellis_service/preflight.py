"""The TRELLIS preflight: does this machine hold what TRELLIS needs? One verdict, two callers.

The project never builds TRELLIS: it comes from a base image that must hold a working TRELLIS with its
CUDA extensions. Upstream's loader retries every local sub-model that fails to load from the Hub, so
nearly any broken piece surfaces as "Repository Not Found"; this preflight names the real cause instead.
The service's ``trellis`` backend runs it before loading (a failure becomes ``ModelUnavailable``, readiness
stays NOT_SERVING), and the container entrypoint runs ``python -m trellis_service.preflight`` before the
service (exit 78 in strict mode). Both get the same checks, each reported on its own line:

- ``gpu``: the configured device is usable: torch imports and is a CUDA build, a GPU is visible, the
  ``cuda:N`` index exists (``device=cpu`` fails unless ``allow_cpu``: only the test stand-in runs like that);
  ``gpu:memory`` warns under 16 GiB; ``gpu:flash_attn`` fails when flash-attn is configured on a GPU older
  than compute capability 8.0;
- ``trellis``: the package, ``trellis.pipelines.TrellisImageTo3DPipeline`` and
  ``trellis.utils.postprocessing_utils`` import;
- ``ext:<module>``: each compiled or extra module TRELLIS imports with the configured backends
  (``SPARSE_BACKEND``, ``ATTN_BACKEND``, ``SPARSE_ATTN_BACKEND``) and for the GLB export, each failure
  naming what the module is for and how to get it; ``ext:nvdiffrast-context`` with ``--deep``;
- ``weights:model``: a local folder (``pipeline.json`` and every ``ckpts/<name>.json`` + ``.safetensors`` it
  names) or a hub id in the Hugging Face cache; ``weights:dinov2`` under the torch hub folder; both fail
  when missing while offline and warn ("will download") otherwise; ``weights:u2net`` only warns: it is
  needed only for images without an alpha channel.

Standard library only: torch, trellis and the extension modules are imported inside the checks, as the
things under test, so the preflight runs even when the service's own dependencies are broken.

``python -m trellis_service.preflight [--mode auto|strict|warn|off] [--json] [--deep]``: the mode (default
``TRELLISBOX_PREFLIGHT``, else ``auto``) ``strict`` exits 78 when a required check fails, ``warn`` reports
and exits 0 (the service's own preflight then refuses readiness with its message), ``auto`` is strict for
``TRELLISBOX_TRELLIS_BACKEND=trellis``, off for ``preview`` and warn otherwise. In Kubernetes the report is
also written to ``/dev/termination-log``, so ``kubectl describe pod`` shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

_log = logging.getLogger(__name__)

#: Exit status of a strict preflight that failed (sysexits EX_CONFIG).
EX_CONFIG = 78
DEFAULT_MODEL = "microsoft/TRELLIS-image-large"
MIN_VRAM_GIB = 16.0
TERMINATION_LOG = "/dev/termination-log"
#: What TRELLIS reads at import time; the service's ``TRELLISBOX_TRELLIS_<NAME>`` settings set them.
TRELLIS_VARIABLES = ("ATTN_BACKEND", "SPARSE_ATTN_BACKEND", "SPARSE_BACKEND", "SPCONV_ALGO")
_TRUTHY = {"1", "true", "yes", "on"}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)\Z")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+\Z")

BASE_IMAGE_HINT = (
    "The trellis backend needs the TRELLIS base image (TRELLIS on PYTHONPATH with its CUDA extensions "
    "built for this GPU); or run this service with --backend preview."
)

#: What each module TRELLIS imports is for, and how to get it.
MODULE_HINTS: dict[str, str] = {
    "torch": "PyTorch with CUDA, as the TRELLIS base image ships it",
    "trellis": "the TRELLIS package itself: put the TRELLIS checkout on PYTHONPATH",
    "spconv": "sparse convolution (SPARSE_BACKEND=spconv): install the spconv-cuXXX wheel matching CUDA, "
              "or set --sparse-backend torchsparse",
    "torchsparse": "sparse convolution (SPARSE_BACKEND=torchsparse): build torchsparse, or use spconv",
    "flash_attn": "attention kernels (ATTN_BACKEND / SPARSE_ATTN_BACKEND=flash_attn): install flash-attn "
                  "for this GPU, or set --attn-backend and --sparse-attn-backend to xformers",
    "xformers": "attention kernels (ATTN_BACKEND / SPARSE_ATTN_BACKEND=xformers): install xformers "
                "matching torch, or use flash_attn",
    "nvdiffrast": "the differentiable rasterizer used by the GLB texture bake (built by TRELLIS's setup "
                  "script with --nvdiffrast)",
    "diff_gaussian_rasterization": "the Gaussian rasterizer used to render views for the texture bake "
                                   "(TRELLIS's setup script, --mipgaussian)",
    "plyfile": "the PLY writer of Gaussian.save_ply; TRELLIS's setup script does not install it: "
               "pip install plyfile",
    "kaolin": "FlexiCubes mesh extraction (TRELLIS's setup script, --kaolin)",
    "utils3d": "geometry utilities (TRELLIS's setup script, --basic)",
    "xatlas": "UV unwrapping for the GLB (pip install xatlas)",
    "pyvista": "mesh simplification for the GLB (pip install pyvista)",
    "pymeshfix": "hole filling for the GLB (pip install pymeshfix)",
    "igraph": "hole filling for the GLB (pip install igraph)",
    "rembg": "background removal (pip install rembg onnxruntime)",
    "cv2": "image processing of the GLB texture bake (TRELLIS's setup script, --basic: opencv-python-headless)",
    "torchvision": "image transforms of the pipeline (the torchvision build matching torch)",
    "easydict": "TRELLIS's config dicts (pip install easydict)",
}

#: The module each backend setting makes TRELLIS import: the submodule that holds the compiled code (the
#: top-level package may import without it). ``sdpa`` and ``naive`` attention need nothing compiled.
COMPILED_MODULES: dict[str, str] = {
    "spconv": "spconv.pytorch", "torchsparse": "torchsparse", "flash_attn": "flash_attn", "xformers": "xformers.ops",
}
#: What TRELLIS imports whatever the backends: the rasterizers, the PLY writer, the GLB export's helpers
#: (``trellis.utils.postprocessing_utils``) and background removal (``trellis.pipelines``).
SUPPORT_MODULES = (
    "nvdiffrast.torch", "diff_gaussian_rasterization", "plyfile", "utils3d", "xatlas", "pyvista", "pymeshfix",
    "igraph", "rembg",
)


@dataclass(frozen=True)
class Check:
    """One verdict. A failed required check means TRELLIS cannot run; a failed optional one is a warning.

    Args:
        name: ``gpu``, ``trellis``, ``ext:<module>``, ``weights:<what>``, ...
        ok: Whether the check passed.
        detail: What was found; on failure the cause and what to do about it.
        required: False for a check whose failure is only a warning.
    """

    name: str
    ok: bool
    detail: str
    required: bool = True

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("FAIL" if self.required else "warn")


@dataclass(frozen=True)
class PreflightConfig:
    """What to check: the service's TRELLIS settings.

    Args:
        model: Hugging Face model id or local folder holding ``pipeline.json`` and ``ckpts/``.
        device: ``auto``, ``cuda``, ``cuda:N`` (or ``cpu``, accepted only with ``allow_cpu``).
        offline: Downloads are off: missing weights fail instead of warning.
        environment: Variables TRELLIS reads at import time (``ATTN_BACKEND``, ...), put into ``os.environ``
            before anything is imported.
        allow_cpu: Accept ``device="cpu"`` (the test stand-in; upstream hard-codes ``.cuda()`` calls).
        deep: Also create an nvdiffrast CUDA context.
    """

    model: str = DEFAULT_MODEL
    device: str = "auto"
    offline: bool = False
    environment: Mapping[str, str] = field(default_factory=dict)
    allow_cpu: bool = False
    deep: bool = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> PreflightConfig:
        """The configuration the service builds from the same environment (``TRELLISBOX_TRELLIS_*``, and
        ``HF_HUB_OFFLINE``, which turns offline on as in the service's settings)."""
        offline = any(env.get(name, "").strip().lower() in _TRUTHY
                      for name in ("TRELLISBOX_TRELLIS_OFFLINE", "HF_HUB_OFFLINE"))
        environment = {name: env[f"TRELLISBOX_TRELLIS_{name}"] for name in TRELLIS_VARIABLES
                       if env.get(f"TRELLISBOX_TRELLIS_{name}")}
        if offline:
            environment["HF_HUB_OFFLINE"] = "1"
        return cls(model=env.get("TRELLISBOX_TRELLIS_MODEL") or DEFAULT_MODEL,
                   device=env.get("TRELLISBOX_TRELLIS_DEVICE") or "auto", offline=offline, environment=environment)


@dataclass(frozen=True)
class PreflightResult:
    """The checks, and what the service's loader needs from them.

    Args:
        checks: Every check, in the order it ran.
        device: The resolved device (``cuda:N`` or ``cpu``); empty when none is usable.
        model_path: What to load: the resolved local folder, or the hub id.
        pipeline_args: The ``args`` of ``pipeline.json``; empty when it was not found.
        weights_present: The model's weights are on this machine (loading needs no download).
    """

    checks: list[Check]
    device: str = ""
    model_path: str = ""
    pipeline_args: dict[str, Any] = field(default_factory=dict)
    weights_present: bool = False

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok and check.required]

    @property
    def warnings(self) -> list[Check]:
        return [check for check in self.checks if not check.ok and not check.required]

    @property
    def ok(self) -> bool:
        return not self.failures

    def report(self) -> str:
        """One line per check, then a summary line naming the failed checks."""
        lines = [f"[{check.status:<4}] {check.name}: {check.detail}" for check in self.checks]
        if self.failures:
            lines.append("TRELLIS preflight: missing " + ", ".join(check.name for check in self.failures))
        else:
            lines.append("TRELLIS preflight: the base image meets the contract"
                         + (f" ({len(self.warnings)} warning(s))" if self.warnings else ""))
        return "\n".join(lines)

    def explain(self) -> str:
        """One paragraph naming every failed check with its cause and remedy (empty when none failed)."""
        if not self.failures:
            return ""
        text = "TRELLIS preflight failed: " + "; ".join(f"{c.name}: {c.detail.rstrip('.')}" for c in self.failures)
        if any(check.name == "trellis" or check.name.startswith("ext:") for check in self.failures):
            text += f". {BASE_IMAGE_HINT}"
        return text if text.endswith(".") else text + "."


# -- where things live, as the libraries that download them decide -------------------------------------------------


def hub_cache_dir(env: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``
    or ``~/.cache/huggingface/hub``."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return _cache_home(env) / "huggingface" / "hub"


def torch_hub_dir(env: Mapping[str, str]) -> Path:
    """Where torch.hub keeps repositories and checkpoints: ``$TORCH_HOME/hub``, else under the XDG cache."""
    home = Path(env["TORCH_HOME"]).expanduser() if env.get("TORCH_HOME") else _cache_home(env) / "torch"
    return home / "hub"


def u2net_path(env: Mapping[str, str]) -> Path:
    """rembg's default background-removal model: ``$U2NET_HOME/u2net.onnx`` (``~/.u2net``)."""
    return Path(env.get("U2NET_HOME", "~/.u2net")).expanduser() / "u2net.onnx"


def _cache_home(env: Mapping[str, str]) -> Path:
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser()


# -- running it -------------------------------------------------------------------------------------------------------


def apply_environment(environment: Mapping[str, str]) -> None:
    """Put ``environment`` into ``os.environ``: TRELLIS reads it when its modules are first imported."""
    for key, value in environment.items():
        if os.environ.get(key) != value:
            _log.info("setting %s=%s for TRELLIS", key, value)
        os.environ[key] = value


def run_preflight(config: PreflightConfig, *, cuda_check: Callable[[], bool] | None = None) -> PreflightResult:
    """Run every check (none stops the others, so one run names everything that is missing).

    Args:
        config: What to check.
        cuda_check: Whether a CUDA device is visible, instead of asking torch (which also yields the GPU's
            memory and compute capability): lets tests drive the service on a CPU against a stand-in.

    Returns:
        The checks and what the loader needs from them.
    """
    apply_environment(config.environment)
    device, checks = _check_gpu(config, cuda_check)
    checks.append(_check_trellis())
    checks += [_check_module(module) for module in extension_modules(os.environ)]
    if config.deep and device.startswith("cuda"):
        checks.append(_check_rasterizer_context())
    weights = _check_weights(config)
    checks += [weights.check, _check_dinov2(weights.pipeline_args, config.offline), _check_u2net(config.offline)]
    return PreflightResult(checks, device, weights.model_path, weights.pipeline_args, weights.present)


def extension_modules(env: Mapping[str, str]) -> list[str]:
    """The compiled and extra modules TRELLIS will import with the backends configured in ``env``."""
    sparse = env.get("SPARSE_BACKEND", "spconv")
    modules = [COMPILED_MODULES.get(sparse, sparse)]
    for backend in _attention_backends(env):
        if backend in COMPILED_MODULES and COMPILED_MODULES[backend] not in modules:
            modules.append(COMPILED_MODULES[backend])
    return [*modules, *SUPPORT_MODULES]


def _attention_backends(env: Mapping[str, str]) -> list[str]:
    return [env.get(variable, "flash_attn") for variable in ("ATTN_BACKEND", "SPARSE_ATTN_BACKEND")]


def _import(module: str) -> tuple[ModuleType | None, str]:
    """The module, or None and why not: the missing piece, what it is for and how to get it."""
    try:
        return importlib.import_module(module), ""
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        hint = MODULE_HINTS.get(missing.split(".")[0], "a dependency of TRELLIS")
        return None, f"importing {module} failed because module {missing!r} is missing ({hint})"
    except (Exception, SystemExit) as exc:  # an extension that exists but does not load (ABI, CUDA mismatch)
        message = (str(exc).strip().splitlines() or [""])[0][:300]
        cause = ("the TRELLIS tree is not readable by this user: rebuild with --build-arg TRELLIS_HOME=<path>"
                 if isinstance(exc, PermissionError) else
                 "probably a CUDA extension built for another CUDA, torch or GPU")
        return None, f"importing {module} failed with {type(exc).__name__}: {message} ({cause})"


def _check_module(module: str) -> Check:
    loaded, error = _import(module)
    return Check(f"ext:{module}", loaded is not None, "loads" if loaded is not None else error)


def _check_gpu(config: PreflightConfig, cuda_check: Callable[[], bool] | None) -> tuple[str, list[Check]]:
    """The device to run on (empty when none is usable) and the checks that say so."""
    spec = config.device
    if not _DEVICE.match(spec):
        return "", [Check("gpu", False, f"device must be auto, cuda or cuda:N, got {spec!r}")]
    if spec == "cpu":
        if config.allow_cpu:
            return "cpu", [Check("gpu", True, "device=cpu (allowed: a stand-in without CUDA)")]
        return "", [Check("gpu", False, "device=cpu: TRELLIS has no CPU path (its sparse convolution, attention "
                                        "and rasterizers are CUDA-only). Set --device auto or cuda:N on a GPU host, "
                                        "or use --backend preview.")]
    if cuda_check is not None:
        if not cuda_check():
            return "", [Check("gpu", False, _no_gpu("torch.cuda.is_available() is False"))]
        return ("cuda:0" if spec in ("auto", "cuda") else spec), [Check("gpu", True, "a CUDA device is visible")]
    return _probe_torch(spec)


def _no_gpu(reason: str) -> str:
    visible = ", ".join(f"{name}={os.environ[name]!r}" if name in os.environ else f"{name} unset"
                        for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"))
    return (f"no CUDA GPU is visible ({reason}; {visible}). TRELLIS runs only on CUDA: schedule this service on a "
            "GPU node (nvidia.com/gpu: 1) with the NVIDIA runtime (docker run --gpus), or use --backend preview.")


def _probe_torch(spec: str) -> tuple[str, list[Check]]:
    """Ask torch: a CUDA build, a visible GPU at the configured index, its memory and compute capability."""
    torch, error = _import("torch")
    if torch is None:
        return "", [Check("gpu", False, f"torch does not import: {error}")]
    cuda = getattr(torch.version, "cuda", None)
    if not cuda:
        return "", [Check("gpu", False, f"no CUDA GPU: torch {torch.__version__} is a CPU-only build and TRELLIS "
                                        "runs only on CUDA; use the TRELLIS base image's torch, or --backend preview")]
    try:
        count = int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception as exc:
        return "", [Check("gpu", False, f"CUDA initialisation failed: {type(exc).__name__}: {exc}")]
    if count == 0:
        return "", [Check("gpu", False, _no_gpu(f"torch {torch.__version__}, CUDA {cuda}: no device"))]
    index = int(spec.partition(":")[2] or 0)
    if index >= count:
        return "", [Check("gpu", False, f"device {spec} was configured but only {count} GPU(s) are visible; "
                                        "set --device auto or a visible cuda:N")]
    device = f"cuda:{index}"
    try:
        props = torch.cuda.get_device_properties(index)
    except Exception as exc:
        return "", [Check("gpu", False, f"cannot query {device}: {type(exc).__name__}: {exc}")]
    gib = props.total_memory / 2**30
    capability = f"{props.major}.{props.minor}"
    checks = [Check("gpu", True, f"{count} GPU(s); {device} = {props.name}, {gib:.1f} GiB, compute {capability}, "
                                 f"CUDA {cuda}")]
    if gib < MIN_VRAM_GIB:
        checks.append(Check("gpu:memory", False, f"{device} has {gib:.1f} GiB, less than the {MIN_VRAM_GIB:.0f} GiB "
                                                 "TRELLIS needs: expect out-of-memory errors", required=False))
    if "flash_attn" in _attention_backends(os.environ):
        checks.append(Check(
            "gpu:flash_attn", props.major >= 8,
            f"compute capability {capability} runs flash-attn" if props.major >= 8 else
            f"flash-attn needs compute capability 8.0+, {device} has {capability}: set --attn-backend and "
            "--sparse-attn-backend to xformers",
        ))
    return device, checks


def _check_trellis() -> Check:
    if importlib.util.find_spec("trellis") is None:
        return Check("trellis", False, "the trellis package is not importable (no module 'trellis' on "
                                       f"PYTHONPATH={os.environ.get('PYTHONPATH', '')!r})")
    pipelines, error = _import("trellis.pipelines")
    if pipelines is None:
        return Check("trellis", False, f"TRELLIS cannot be imported: {error}")
    if not hasattr(pipelines, "TrellisImageTo3DPipeline"):
        return Check("trellis", False, "trellis.pipelines has no TrellisImageTo3DPipeline: not a TRELLIS checkout "
                                       "with the image-to-3D pipeline")
    postprocessing, error = _import("trellis.utils.postprocessing_utils")
    if postprocessing is None:
        return Check("trellis", False, f"TRELLIS cannot be imported: {error}")
    where = Path(getattr(sys.modules["trellis"], "__file__", None) or "?").parent
    return Check("trellis", True, f"TrellisImageTo3DPipeline from {where}")


def _check_rasterizer_context() -> Check:
    rasterizer, error = _import("nvdiffrast.torch")
    if rasterizer is None:
        return Check("ext:nvdiffrast-context", False, error)
    try:
        rasterizer.RasterizeCudaContext()
    except Exception as exc:
        return Check("ext:nvdiffrast-context", False, f"{type(exc).__name__}: {exc}"[:300])
    return Check("ext:nvdiffrast-context", True, "RasterizeCudaContext created")


# -- weights ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Weights:
    """The verdict on the model's weights, and what the loader needs from them.

    Args:
        detail: What was found, or what is missing and what to do.
        model_path: What to load: the resolved local folder, or the hub id.
        pipeline_args: The ``args`` of ``pipeline.json`` when it was read.
        present: Every file is on this machine (the check passes).
        required: A missing piece blocks loading; False when loading will download it.
    """

    detail: str
    model_path: str
    pipeline_args: dict[str, Any] = field(default_factory=dict)
    present: bool = False
    required: bool = True

    @property
    def check(self) -> Check:
        return Check("weights:model", self.present, self.detail, self.required)


def _check_weights(config: PreflightConfig) -> _Weights:
    model = config.model
    folder = Path(model).expanduser()
    if folder.is_dir():
        return _check_model_folder(folder.resolve())
    if model.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(model):
        return _Weights(f"model folder {model!r} does not exist. Point --model at a copy of {DEFAULT_MODEL} "
                        f"(pipeline.json and ckpts/) or at a hub id such as {DEFAULT_MODEL}.", model)
    return _check_hub_cache(model, config.offline)


def _check_model_folder(folder: Path) -> _Weights:
    config_path = folder / "pipeline.json"
    if not config_path.is_file():
        return _Weights(f"model folder {folder} has no pipeline.json; it must be a full copy of {DEFAULT_MODEL} "
                        "(pipeline.json and ckpts/<name>.json + .safetensors).", str(folder))
    args, error = _read_pipeline_args(config_path)
    if args is None:
        return _Weights(error, str(folder))
    missing = ", ".join(f"ckpts file {file} (models.{key})" for key, file in _missing_checkpoints(folder, args))
    if missing:
        return _Weights(f"model folder {folder} lacks {missing} named in its pipeline.json. Upstream would try to "
                        "fetch them from the Hub and fail with 'Repository Not Found'; copy the complete ckpts/ "
                        "folder.", str(folder), args)
    return _Weights(f"{folder} ({len(args['models'])} checkpoints)", str(folder), args, present=True)


def _check_hub_cache(model: str, offline: bool) -> _Weights:
    """A hub id as upstream will load it: the ``main`` revision in the Hugging Face cache, downloading what is
    missing unless offline."""
    cache = hub_cache_dir(os.environ)
    repo = cache / ("models--" + model.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshot = repo / "snapshots" / ref.read_text(encoding="utf-8").strip() if ref.is_file() else None
    if snapshot is None or not (snapshot / "pipeline.json").is_file():
        if offline:
            return _Weights(f"{model} is not in the local Hugging Face cache ({cache}) and downloads are off "
                            f"(offline). Pre-fetch it with `huggingface-cli download {model}`, mount the cache, or "
                            "point --model at a local folder.", model)
        return _Weights(f"{model} is not in the local Hugging Face cache ({cache}): loading will download it "
                        "(several GB)", model, required=False)
    args, error = _read_pipeline_args(snapshot / "pipeline.json")
    if args is None:
        return _Weights(error, model)
    missing = ", ".join(file for _, file in _missing_checkpoints(snapshot, args))
    if missing and offline:
        return _Weights(f"the cached copy of {model} lacks {missing} and downloads are off (offline). Complete it "
                        f"with `huggingface-cli download {model}`.", model, args)
    if missing:
        return _Weights(f"the cached copy of {model} lacks {missing}: loading will download them", model, args,
                        required=False)
    return _Weights(f"{model} in the Hugging Face cache at {snapshot} ({len(args['models'])} checkpoints)", model,
                    args, present=True)


def _read_pipeline_args(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The ``args`` of a pipeline.json, or None and why it is not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            args = json.load(handle)["args"]
        if not isinstance(args, dict) or not isinstance(args.get("models"), dict):
            raise KeyError("args.models")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{path} is not a TRELLIS pipeline.json ({type(exc).__name__}: {exc})"
    return args, ""


def _missing_checkpoints(folder: Path, args: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(models key, file) for each ``<name>.json`` / ``.safetensors`` named by ``args.models`` but not in ``folder``."""
    return [(str(key), f"{name}{suffix}") for key, name in args["models"].items()
            for suffix in (".json", ".safetensors") if not (folder / f"{name}{suffix}").is_file()]


def _check_dinov2(pipeline_args: Mapping[str, Any], offline: bool) -> Check:
    """The image encoder TRELLIS loads with ``torch.hub.load('facebookresearch/dinov2', name)``."""
    name = str(pipeline_args.get("image_cond_model", "dinov2_vitl14_reg"))
    hub = torch_hub_dir(os.environ)
    checkpoint = f"{name[:-4]}_reg4_pretrain.pth" if name.endswith("_reg") else f"{name}_pretrain.pth"
    needed = (hub / "facebookresearch_dinov2_main", hub / "checkpoints" / checkpoint)
    missing = [str(path) for path in needed if not path.exists()]
    if not missing:
        return Check("weights:dinov2", True, f"{name}: {checkpoint} and facebookresearch_dinov2_main under {hub}")
    message = (f"DINOv2 ({name}, the image encoder TRELLIS loads through torch.hub) is missing: {', '.join(missing)} "
               f"(TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')})")
    if offline:
        return Check("weights:dinov2", False, f"{message}. Downloads are off (offline): pre-fetch it with "
                                              f"torch.hub.load('facebookresearch/dinov2', '{name}') on a connected "
                                              "machine and ship $TORCH_HOME/hub.")
    return Check("weights:dinov2", False, f"{message}; torch.hub will download it at load", required=False)


def _check_u2net(offline: bool) -> Check:
    """Only images without an alpha channel need it (the service refuses those when offline without it)."""
    path = u2net_path(os.environ)
    if path.is_file():
        return Check("weights:u2net", True, str(path))
    return Check("weights:u2net", False, f"rembg's u2net.onnx is not at {path} (U2NET_HOME): images without an alpha "
                                         "channel need it for background removal"
                                         + (" and cannot download it while offline" if offline else
                                            "; rembg will download it on first use"), required=False)


# -- the container entrypoint -----------------------------------------------------------------------------------------


def resolve_mode(mode: str, env: Mapping[str, str]) -> str:
    """``auto``: strict for the trellis backend, off for preview, warn for auto (it may fall back)."""
    if mode != "auto":
        return mode
    return {"preview": "off", "trellis": "strict"}.get(env.get("TRELLISBOX_TRELLIS_BACKEND", "auto"), "warn")


def write_termination_message(text: str, path: str = TERMINATION_LOG) -> None:
    """Kubernetes mounts this file (terminationMessagePath); elsewhere there is nothing to write."""
    if not os.path.isfile(path):
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text[-4000:])
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preflight from the environment; the exit status says whether the service may start."""
    parser = argparse.ArgumentParser(prog="python -m trellis_service.preflight",
                                     description="Check that this machine holds what TRELLIS needs.")
    parser.add_argument("--mode", choices=("auto", "strict", "warn", "off"),
                        default=os.environ.get("TRELLISBOX_PREFLIGHT", "auto"))
    parser.add_argument("--deep", action="store_true", help="also create an nvdiffrast CUDA context")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON on stdout")
    args = parser.parse_args(argv)

    mode = resolve_mode(args.mode, os.environ)
    if mode == "off":
        print("TRELLIS preflight: skipped (backend=preview or --mode off)", file=sys.stderr)
        return 0
    config = dataclasses.replace(PreflightConfig.from_environment(os.environ), deep=args.deep)
    result = run_preflight(config)
    text = result.report()
    if args.json:
        print(json.dumps([dataclasses.asdict(check) for check in result.checks], indent=2))
    print(text, file=sys.stderr)
    if result.failures and mode == "strict":
        write_termination_message(text)
        return EX_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
