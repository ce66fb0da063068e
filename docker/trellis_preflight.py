"""Preflight of the TRELLIS service image: does the base image hold what TRELLIS needs?

The project never builds TRELLIS: its image starts FROM a base image that must already hold a working
TRELLIS. This script checks that contract at container start, before ``python -m trellis_service``,
and names each missing piece instead of letting it surface later as an unrelated error (a missing
CUDA extension shows up in TRELLIS as "Repository Not Found ... ckpts/..." once it falls back to the
Hub). Checks, each reported on its own line:

- ``gpu``: torch imports, is a CUDA build, and sees a GPU (name, memory, compute capability);
- ``trellis``: ``import trellis`` and ``trellis.pipelines.TrellisImageTo3DPipeline``;
- ``ext:<module>``: the compiled modules TRELLIS loads for the configured backends (``SPARSE_BACKEND``,
  ``SPARSE_ATTN_BACKEND``, ``ATTN_BACKEND``, or the service's ``TRELLISBOX_TRELLIS_*`` settings of the
  same names) and for GLB export, plus ``plyfile`` (imported by
  TRELLIS, not installed by its setup script);
- ``weights:*``: the model folder (``pipeline.json`` and each ``ckpts/<name>.json``/``.safetensors``),
  DINOv2 under ``$TORCH_HOME/hub``, ``u2net.onnx`` under ``$U2NET_HOME``.

Modes (``--mode`` or ``TRELLISBOX_PREFLIGHT``): ``strict`` exits 78 when a required check fails,
``warn`` reports and exits 0 (the service's own preflight then refuses readiness with its message),
``auto`` (default) is strict when ``TRELLISBOX_TRELLIS_BACKEND=trellis``, off for ``preview`` and warn
otherwise. In Kubernetes the failures are also
written to ``/dev/termination-log``, so ``kubectl describe pod`` shows them.

Standard library only, besides the modules under test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EX_CONFIG = 78
DEFAULT_MODEL = "microsoft/TRELLIS-image-large"
DINOV2_CHECKPOINTS = {
    "dinov2_vits14_reg": "dinov2_vits14_reg4_pretrain.pth",
    "dinov2_vitb14_reg": "dinov2_vitb14_reg4_pretrain.pth",
    "dinov2_vitl14_reg": "dinov2_vitl14_reg4_pretrain.pth",
    "dinov2_vitg14_reg": "dinov2_vitg14_reg4_pretrain.pth",
}
# Module each backend setting loads; None: nothing compiled to check.
SPARSE_BACKENDS = {"spconv": "spconv.pytorch", "torchsparse": "torchsparse"}
ATTN_MODULES: dict[str, str | None] = {
    "flash_attn": "flash_attn",
    "xformers": "xformers.ops",
    "sdpa": None,
    "naive": None,
}
# Loaded by TRELLIS's renderers and GLB export (postprocessing_utils), and plyfile for Gaussian PLY.
EXPORT_MODULES = (
    "diff_gaussian_rasterization",
    "nvdiffrast.torch",
    "utils3d",
    "xatlas",
    "pyvista",
    "pymeshfix",
    "igraph",
    "plyfile",
    "rembg",
)
MIN_VRAM_GIB = 16.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _import(module: str) -> tuple[Any | None, str]:
    try:
        return importlib.import_module(module), ""
    except BaseException as exc:  # an extension can fail with ImportError, OSError, RuntimeError, ...
        message = f"{type(exc).__name__}: {exc}".strip()
        if isinstance(exc, PermissionError):
            message += " (the TRELLIS tree is not readable by this user: rebuild with --build-arg TRELLIS_HOME=<path>)"
        return None, message.splitlines()[0][:300] if message else type(exc).__name__


def check_gpu(deep: bool) -> list[Check]:
    torch, error = _import("torch")
    if torch is None:
        return [Check("gpu", False, f"torch does not import: {error}")]
    cuda = getattr(torch.version, "cuda", None)
    if not cuda:
        return [Check("gpu", False, f"torch {torch.__version__} is a CPU-only build; TRELLIS needs CUDA")]
    try:
        available = bool(torch.cuda.is_available())
        count = int(torch.cuda.device_count()) if available else 0
    except Exception as exc:
        return [Check("gpu", False, f"CUDA initialisation failed: {exc}")]
    if not available or count == 0:
        visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "<unset>")
        return [
            Check(
                "gpu",
                False,
                f"no GPU visible to torch {torch.__version__} (CUDA {cuda}); NVIDIA_VISIBLE_DEVICES={visible}: "
                "request nvidia.com/gpu in the pod or run docker with --gpus",
            )
        ]
    checks = []
    try:
        props = torch.cuda.get_device_properties(0)
        gib = props.total_memory / 2**30
        capability = f"{props.major}.{props.minor}"
        detail = f"{count} GPU(s); cuda:0 = {props.name}, {gib:.1f} GiB, compute {capability}, CUDA {cuda}"
        checks.append(Check("gpu", True, detail))
        if gib < MIN_VRAM_GIB:
            checks.append(
                Check("gpu:memory", False, f"{gib:.1f} GiB < {MIN_VRAM_GIB:.0f} GiB TRELLIS needs", required=False)
            )
        env = dict(os.environ)
        uses_flash = "flash_attn" in {
            backend_setting(env, "ATTN_BACKEND", "flash_attn"),
            backend_setting(env, "SPARSE_ATTN_BACKEND", "flash_attn"),
        }
        if uses_flash and props.major < 8:
            checks.append(
                Check(
                    "gpu:flash_attn",
                    False,
                    f"flash-attn needs compute capability 8.0+, this GPU has {capability}: "
                    "set ATTN_BACKEND=xformers and SPARSE_ATTN_BACKEND=xformers",
                )
            )
    except Exception as exc:
        checks.append(Check("gpu", False, f"cannot query cuda:0: {exc}"))
        return checks
    if deep:
        dr, error = _import("nvdiffrast.torch")
        if dr is not None:
            try:
                dr.RasterizeCudaContext()
                checks.append(Check("ext:nvdiffrast-context", True, "RasterizeCudaContext created"))
            except Exception as exc:
                checks.append(Check("ext:nvdiffrast-context", False, f"{type(exc).__name__}: {exc}"[:300]))
    return checks


def check_trellis() -> list[Check]:
    trellis, error = _import("trellis")
    if trellis is None:
        return [Check("trellis", False, f"`import trellis` failed: {error}; the base image must hold TRELLIS")]
    pipelines, error = _import("trellis.pipelines")
    if pipelines is None or not hasattr(pipelines, "TrellisImageTo3DPipeline"):
        reason = error or "trellis.pipelines has no TrellisImageTo3DPipeline"
        return [Check("trellis", False, f"trellis.pipelines does not import: {reason}")]
    where = os.path.dirname(getattr(trellis, "__file__", "") or "?")
    return [Check("trellis", True, f"TrellisImageTo3DPipeline from {where}")]


def backend_setting(env: dict[str, str], variable: str, default: str) -> str:
    """What TRELLIS will read for ``variable``: the service's setting (TRELLISBOX_TRELLIS_<VARIABLE>,
    which the service exports before importing TRELLIS) wins over the plain variable."""
    return env.get(f"TRELLISBOX_TRELLIS_{variable}") or env.get(variable) or default


def extension_modules(env: dict[str, str]) -> list[str]:
    modules: list[str] = []
    sparse = backend_setting(env, "SPARSE_BACKEND", "spconv")
    modules.append(SPARSE_BACKENDS.get(sparse, sparse))
    for variable in ("SPARSE_ATTN_BACKEND", "ATTN_BACKEND"):
        value = backend_setting(env, variable, "flash_attn")
        module = ATTN_MODULES.get(value, value)
        if module and module not in modules:
            modules.append(module)
    modules.extend(m for m in EXPORT_MODULES if m not in modules)
    return modules


def check_extensions(env: dict[str, str]) -> list[Check]:
    checks = []
    for module in extension_modules(env):
        loaded, error = _import(module)
        checks.append(Check(f"ext:{module}", loaded is not None, "loads" if loaded is not None else error))
    return checks


def _is_local(model: str) -> bool:
    return model.startswith(("/", "./", "../")) or Path(model).is_dir()


def _hub_snapshot(model: str, env: dict[str, str]) -> Path | None:
    home = Path(env.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")))
    snapshots = home / "hub" / ("models--" + model.replace("/", "--")) / "snapshots"
    found = sorted(snapshots.glob("*/pipeline.json")) if snapshots.is_dir() else []
    return found[-1].parent if found else None


def check_weights(env: dict[str, str]) -> list[Check]:
    checks: list[Check] = []
    model = env.get("TRELLISBOX_TRELLIS_MODEL", DEFAULT_MODEL)
    folder = Path(model) if _is_local(model) else _hub_snapshot(model, env)
    cond_model = "dinov2_vitl14_reg"
    if folder is None:
        checks.append(Check("weights:model", False, f"{model} is neither a local folder nor in the HF_HOME hub cache"))
    elif not (folder / "pipeline.json").is_file():
        checks.append(Check("weights:model", False, f"{folder}/pipeline.json is missing"))
    else:
        try:
            pipeline = json.loads((folder / "pipeline.json").read_text())
            args = pipeline.get("args", {})
            cond_model = args.get("image_cond_model", cond_model)
            missing = []
            for path in args.get("models", {}).values():
                for suffix in (".json", ".safetensors"):
                    if not (folder / f"{path}{suffix}").is_file():
                        missing.append(f"{path}{suffix}")
            if missing:
                checks.append(Check("weights:model", False, f"{folder} lacks {', '.join(missing)}"))
            else:
                checks.append(Check("weights:model", True, f"{folder} ({len(args.get('models', {}))} checkpoints)"))
        except (OSError, ValueError, AttributeError) as exc:
            checks.append(Check("weights:model", False, f"{folder}/pipeline.json unreadable: {exc}"))

    torch_home = Path(env.get("TORCH_HOME", str(Path.home() / ".cache" / "torch")))
    checkpoint = torch_home / "hub" / "checkpoints" / DINOV2_CHECKPOINTS.get(cond_model, f"{cond_model}.pth")
    repos = sorted((torch_home / "hub").glob("facebookresearch_dinov2_*/hubconf.py"))
    if not checkpoint.is_file():
        checks.append(Check("weights:dinov2", False, f"{checkpoint} is missing (run the weights Job)"))
    elif not repos:
        checks.append(Check("weights:dinov2", False, f"no facebookresearch_dinov2_* repo under {torch_home}/hub"))
    else:
        checks.append(Check("weights:dinov2", True, f"{checkpoint.name} + {repos[0].parent.name}"))

    u2net = Path(env.get("U2NET_HOME", str(Path.home() / ".u2net"))) / "u2net.onnx"
    checks.append(Check("weights:u2net", u2net.is_file(), str(u2net) if u2net.is_file() else f"{u2net} is missing"))
    return checks


def run_checks(env: dict[str, str], deep: bool = False) -> list[Check]:
    # TRELLIS reads its backend variables at import time: import it as the service will.
    for variable in ("ATTN_BACKEND", "SPARSE_ATTN_BACKEND", "SPARSE_BACKEND", "SPCONV_ALGO"):
        value = env.get(f"TRELLISBOX_TRELLIS_{variable}")
        if value:
            os.environ[variable] = value
    checks = check_gpu(deep)
    checks += check_trellis()
    checks += check_extensions(env)
    checks += check_weights(env)
    return checks


def resolve_mode(mode: str, env: dict[str, str]) -> str:
    if mode != "auto":
        return mode
    backend = env.get("TRELLISBOX_TRELLIS_BACKEND", "auto")
    return {"preview": "off", "trellis": "strict"}.get(backend, "warn")


def report(checks: list[Check]) -> tuple[str, list[Check]]:
    lines = []
    failed = [c for c in checks if not c.ok and c.required]
    for c in checks:
        status = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"[{status}] {c.name}: {c.detail}")
    if failed:
        lines.append("TRELLIS preflight: missing " + ", ".join(c.name for c in failed))
    else:
        lines.append("TRELLIS preflight: the base image meets the contract")
    return "\n".join(lines), failed


def _write_termination_message(text: str, path: str = "/dev/termination-log") -> None:
    """Kubernetes mounts this file (terminationMessagePath); elsewhere there is nothing to write."""
    if not os.path.isfile(path):
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text[-4000:])
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        choices=("auto", "strict", "warn", "off"),
        default=os.environ.get("TRELLISBOX_PREFLIGHT", "auto"),
    )
    parser.add_argument("--deep", action="store_true", help="also create an nvdiffrast CUDA context")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    mode = resolve_mode(args.mode, env)
    if mode == "off":
        print("TRELLIS preflight: skipped (backend=preview or --mode off)", file=sys.stderr)
        return 0
    checks = run_checks(env, deep=args.deep)
    text, failed = report(checks)
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    print(text, file=sys.stderr)
    if failed and mode == "strict":
        _write_termination_message(text)
        return EX_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
