"""Fill the TRELLIS-BOX weights volume once, for services that then read it offline.

Layout under WEIGHTS_DIR (default /weights), matching the images' environment and the ConfigMaps:

    models/stable-diffusion-xl-refiner-1.0/   TRELLISBOX_REFINER_MODEL (diffusers folder, fp16 variant)
    models/TRELLIS-image-large/               TRELLISBOX_TRELLIS_MODEL (pipeline.json + ckpts/)
    torch/hub/facebookresearch_dinov2_main/   TORCH_HOME: DINOv2 code, loaded by TRELLIS via torch.hub
    torch/hub/checkpoints/dinov2_vitl14_reg4_pretrain.pth
    u2net/u2net.onnx                          U2NET_HOME: rembg's background-removal model
    .trellisbox-weights-complete              written last (JSON: what, which revision, when)

Each step skips what is already there (FORCE=1 downloads again), so a failed Job can simply be retried.
Runs in the refiner image (torch and huggingface_hub); environment variables are set by k8s/weights/job.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("WEIGHTS_DIR", "/weights"))
MARKER = ROOT / ".trellisbox-weights-complete"
FORCE = os.environ.get("FORCE", "0") == "1"
U2NET_URL = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2net.onnx"
U2NET_MD5 = "60024c5c889badc19c04ad937298a77b"  # the checksum rembg itself verifies
DINOV2_CHECKPOINTS = {
    "dinov2_vits14_reg": "dinov2_vits14_reg4_pretrain.pth",
    "dinov2_vitb14_reg": "dinov2_vitb14_reg4_pretrain.pth",
    "dinov2_vitl14_reg": "dinov2_vitl14_reg4_pretrain.pth",
    "dinov2_vitg14_reg": "dinov2_vitg14_reg4_pretrain.pth",
}


def log(message: str) -> None:
    print(f"[weights] {message}", flush=True)


def resolve(repo_id: str, revision: str) -> str:
    """The commit a branch or tag points at, so the marker records exactly what was downloaded."""
    from huggingface_hub import HfApi

    sha = HfApi().model_info(repo_id, revision=revision).sha
    return sha or revision


def refiner() -> dict[str, Any]:
    from huggingface_hub import snapshot_download

    repo = os.environ.get("REFINER_REPO", "stabilityai/stable-diffusion-xl-refiner-1.0")
    variant = os.environ.get("REFINER_VARIANT", "fp16")
    target = ROOT / "models" / repo.split("/")[-1]
    revision = resolve(repo, os.environ.get("REFINER_REVISION", "main"))
    weights = (
        ["*.fp16.safetensors"]
        if variant == "fp16"
        else ["*/model.safetensors", "*/diffusion_pytorch_model.safetensors"]
    )
    log(f"refiner {repo}@{revision} ({variant}) -> {target}")
    snapshot_download(
        repo_id=repo,
        revision=revision,
        local_dir=target,
        # The diffusers folders only: configs, tokenizer, one weight variant. Not the single-file
        # checkpoints at the top of the repository, nor the alternative VAE.
        allow_patterns=["model_index.json", "*/config.json", "scheduler/*", "tokenizer_2/*", *weights],
        ignore_patterns=["vae_1_0/*", "*.bin", "*.ckpt", "*.msgpack", "*.onnx*"],
        force_download=FORCE,
    )
    if not (target / "model_index.json").is_file():
        raise RuntimeError(f"{target}/model_index.json missing after download")
    return {"repo": repo, "revision": revision, "variant": variant, "path": str(target)}


def trellis() -> dict[str, Any]:
    from huggingface_hub import snapshot_download

    repo = os.environ.get("TRELLIS_REPO", "microsoft/TRELLIS-image-large")
    target = ROOT / "models" / repo.split("/")[-1]
    revision = resolve(repo, os.environ.get("TRELLIS_REVISION", "main"))
    log(f"trellis {repo}@{revision} -> {target}")
    snapshot_download(repo_id=repo, revision=revision, local_dir=target, force_download=FORCE)
    pipeline = json.loads((target / "pipeline.json").read_text())
    missing = [
        f"{path}{suffix}"
        for path in pipeline.get("args", {}).get("models", {}).values()
        for suffix in (".json", ".safetensors")
        if not (target / f"{path}{suffix}").is_file()
    ]
    if missing:
        raise RuntimeError(f"{target} lacks {missing} (pipeline.json names them)")
    return {"repo": repo, "revision": revision, "path": str(target)}


def dinov2() -> dict[str, Any]:
    """The code and weights TRELLIS loads with torch.hub.load('facebookresearch/dinov2', ...).

    DINOV2_REF pins the hub code to a branch, tag or commit of facebookresearch/dinov2. TRELLIS names no
    ref, so offline it reads `facebookresearch_dinov2_main`: a pinned ref's code is moved there, and the ref
    is written next to it (`.trellisbox-ref`) so that a later run with another ref fetches again.
    """
    import torch

    name = os.environ.get("DINOV2_MODEL", "dinov2_vitl14_reg")
    ref = os.environ.get("DINOV2_REF", "main") or "main"
    hub = Path(torch.hub.get_dir())
    checkpoint = hub / "checkpoints" / DINOV2_CHECKPOINTS.get(name, f"{name}.pth")
    repo_dir = hub / "facebookresearch_dinov2_main"
    ref_file = repo_dir / ".trellisbox-ref"
    fetched_ref = ref_file.read_text().strip() if ref_file.is_file() else "main"
    if checkpoint.is_file() and (repo_dir / "hubconf.py").is_file() and fetched_ref == ref and not FORCE:
        log(f"dinov2 {name}@{ref}: present in {hub}")
    else:
        log(f"dinov2 {name}@{ref} -> {hub}")
        # trust_repo=True records the repository in hub/trusted_list, so the offline load does not warn.
        model = torch.hub.load(f"facebookresearch/dinov2:{ref}", name, pretrained=True, trust_repo=True,
                               force_reload=True if ref != fetched_ref else FORCE)
        del model
        fetched = hub / f"facebookresearch_dinov2_{ref.replace('/', '_')}"  # torch.hub's folder for that ref
        if fetched != repo_dir:
            shutil.rmtree(repo_dir, ignore_errors=True)
            fetched.replace(repo_dir)
        ref_file.write_text(ref + "\n")
    if not checkpoint.is_file():
        raise RuntimeError(f"{checkpoint} missing after torch.hub.load")
    return {"model": name, "ref": ref, "checkpoint": str(checkpoint), "repo": str(repo_dir)}


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # what rembg checks; not a security boundary
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def u2net() -> dict[str, Any]:
    home = Path(os.environ.get("U2NET_HOME", str(ROOT / "u2net")))
    target = home / "u2net.onnx"
    home.mkdir(parents=True, exist_ok=True)
    if target.is_file() and not FORCE and _md5(target) == U2NET_MD5:
        log(f"u2net: present at {target}")
    else:
        log(f"u2net {U2NET_URL} -> {target}")
        partial = target.with_suffix(".onnx.part")
        # U2NET_URL is a fixed https:// constant, never input.
        with urllib.request.urlopen(U2NET_URL, timeout=60) as response, partial.open("wb") as out:  # nosec B310
            shutil.copyfileobj(response, out, 1 << 20)
        if _md5(partial) != U2NET_MD5:
            partial.unlink()
            raise RuntimeError(f"u2net.onnx checksum mismatch (expected md5 {U2NET_MD5})")
        partial.replace(target)
    return {"path": str(target), "md5": U2NET_MD5}


def main() -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    if MARKER.exists():
        MARKER.unlink()  # the model pods wait until everything below succeeded again
    started = time.time()
    record: dict[str, Any] = {}
    for name, step in (("refiner", refiner), ("trellis", trellis), ("dinov2", dinov2), ("u2net", u2net)):
        step_start = time.time()
        record[name] = step()
        log(f"{name}: done in {time.time() - step_start:.0f}s")
    record["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["seconds"] = round(time.time() - started)
    partial = MARKER.with_suffix(".part")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(MARKER)
    log(f"complete: {MARKER}")
    print(json.dumps(record, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
