"""Gaussian refinement speed: seconds per fit step and per camera recovery against Gaussian count and render
size, and what keeping a novel-view refinement's Gaussians between its calls costs either way
(docs/gaussian-refinement.md).

``python -m bench.gaussian_refinement [--quick] [--device cpu|cuda] [--out FILE]``

The scene is the preview backend's splats of the bundled example (subsampled to each count), fitted to the
example from its recovered camera. On CPU the PyTorch rasteriser runs with one thread (the service's model
thread on a shared machine); on CUDA the rasteriser :func:`choose_rasterizer` picks (gsplat when installed),
and the renders of gsplat and of the PyTorch rasteriser are compared (mean and largest absolute difference)
— the recipe for a GPU host. Writes bench/results/gaussian_refinement.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from PIL import Image

from bench.common import REPO, machine_info, write_json
from trellis_service.backends.preview import PreviewBackend
from trellis_service.domain import GenerationState
from trellis_service.gaussian_refinement.cameras import OrbitPose, camera_at
from trellis_service.gaussian_refinement.fit import FitSettings, FitTarget, fit_gaussians
from trellis_service.gaussian_refinement.gaussians import GaussianSet, read_splat_ply
from trellis_service.gaussian_refinement.pose import recover_pose
from trellis_service.gaussian_refinement.rasterizer import Rasterizer, TorchRasterizer, choose_rasterizer
from trellis_service.gaussian_refinement.views import target_view
from trellisbox._domain.kinds import ArtifactKind
from trellisbox._domain.params import GenerationParams
from trellisbox._runtime.worker import JobContext

EXAMPLE = REPO / "trellisbox" / "assets" / "example.png"


def _splats(count: int) -> GaussianSet:
    """The preview's splats of the example, ``count`` of them (a random subset, or all when fewer; the preview
    makes at most 200 000)."""
    simplify = max(0.0, min(0.99, 1.0 - count / 400_000))
    asset = PreviewBackend().generate([Image.open(EXAMPLE)], GenerationParams(seed=0, mesh_simplify=simplify),
                                      {ArtifactKind.GAUSSIAN_PLY}, JobContext("bench", None, lambda _: None))
    if asset.splats is None:
        raise RuntimeError("the preview backend made no splats although GAUSSIAN_PLY was asked for")
    data = asset.splats.ply_bytes()
    gaussians = GaussianSet.from_ply(data)
    if len(gaussians) > count:
        keep = torch.randperm(len(gaussians), generator=torch.Generator().manual_seed(0))[:count]
        gaussians = GaussianSet(*(t[keep] for t in (gaussians.means, gaussians.log_scales, gaussians.quats,
                                                    gaussians.opacity_logits, gaussians.f_dc, gaussians.normals)))
    return gaussians


def _timed(function: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def measure(count: int, size: int, steps: int, device: str, rasterizer: Rasterizer) -> dict[str, Any]:
    gaussians = _splats(count).to(device)
    centre, radius = gaussians.centre_and_radius()
    view = target_view(Image.open(EXAMPLE), size, device)
    recovered, pose_s = _timed(lambda: recover_pose(gaussians.activated(), centre, radius, view, rasterizer,
                                                    generator=torch.Generator().manual_seed(0)))
    settings = FitSettings(steps=steps, attributes=frozenset({"colours", "opacities"}), regularisation=1.0,
                           resolution=size)
    result, fit_s = _timed(lambda: fit_gaussians(gaussians, [FitTarget(view, recovered.pose)], settings, rasterizer,
                                                 centre))
    return {"gaussians": len(gaussians), "size": size, "steps": result.steps, "pose_s": round(pose_s, 3),
            "step_s": round(fit_s / max(1, result.steps), 4), "iou": round(recovered.iou, 3),
            "psnr_before": round(result.before[0].psnr, 2), "psnr_after": round(result.after[0].psnr, 2)}


#: The bytes one Gaussian takes on the GPU in TRELLIS (xyz 3, features 3, scaling 3, rotation 4, opacity 1: fp32).
GPU_BYTES_PER_GAUSSIAN = 14 * 4


def hand_over_costs(count: int, faces: int, relay_mib_s: float | None, refiner_s: float) -> dict[str, Any]:
    """The two ways to keep a novel-view refinement's Gaussians (and TRELLIS's mesh) between its TRELLIS calls,
    measured for ``count`` Gaussians and a mesh of about ``faces`` faces (docs/gaussian-refinement.md).

    Sent through the gateway: the state's encode and parse here, and its two hops at ``relay_mib_s`` (the gateway's
    measured relay rate). Kept in the service: what it would hold, host or GPU, for the refiner call (``refiner_s``).
    """
    gaussians = _splats(count)
    subdivisions = max(1, round(math.log(max(faces, 80) / 20, 4)))  # an icosphere has 20 · 4^k faces
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    state = GenerationState(splats=gaussians.to_splats().ply_bytes(),
                            mesh_vertices=np.asarray(sphere.vertices, dtype=np.float32),
                            mesh_faces=np.asarray(sphere.faces, dtype=np.int32),
                            representation={"aabb": [-0.5, -0.5, -0.5, 1.0, 1.0, 1.0]})
    data, encode_s = _timed(state.to_bytes)
    _, decode_s = _timed(lambda: read_splat_ply(GenerationState.from_bytes(data).splats))
    mib = len(data) / 2**20
    relay_s = 2 * mib / relay_mib_s if relay_mib_s else None
    gpu_bytes = len(gaussians) * GPU_BYTES_PER_GAUSSIAN + len(sphere.vertices) * 12 + len(sphere.faces) * 24
    return {"gaussians": len(gaussians), "mesh_faces": len(sphere.faces), "state_bytes": len(data),
            "encode_s": round(encode_s, 4), "decode_s": round(decode_s, 4),
            "relay_s": None if relay_s is None else round(relay_s, 4),
            "sent_s": None if relay_s is None else round(encode_s + decode_s + relay_s, 4),
            "kept_host_mib": round(mib, 1), "kept_gpu_mib": round(gpu_bytes / 2**20, 1),
            "kept_for_s": round(refiner_s, 3)}


def novel_view_refiner_s(size: int) -> float:
    """The refiner call a hand-over waits for: the classic (CPU) refiner on the novel views, in process."""
    from refiner_service.backends.classic import ClassicBackend
    from trellis_service.gaussian_refinement.novel_views import NOVEL_VIEW_COUNT
    from trellisbox._domain.params import RefineParams

    view = Image.open(EXAMPLE).convert("RGBA").resize((size, size))
    refiner = ClassicBackend()
    context = JobContext("bench", None, lambda _: None)
    _, seconds = _timed(lambda: refiner.refine([view] * NOVEL_VIEW_COUNT, RefineParams(strength=0.2),
                                               list(range(NOVEL_VIEW_COUNT)), context))
    return seconds


def relay_rate() -> float | None:
    """The gateway's relay rate measured by ``python -m bench --only transport`` (served MiB/s), if it ran."""
    path = REPO / "bench" / "results" / "transport.json"
    if not path.is_file():
        return None
    served: dict[str, Any] = json.loads(path.read_text())["served"]
    return float(served["mib_s"]["median"])


def agreement(device: str) -> dict[str, Any] | None:
    """gsplat against the PyTorch rasteriser on the same view (GPU hosts with gsplat only)."""
    chosen = choose_rasterizer(device)
    if chosen.name == "torch":
        return None
    gaussians = _splats(20_000).to(device).activated()
    centre = gaussians.means.mean(0)
    camera = camera_at(OrbitPose(20.0, 15.0, 1.8), centre, 256)
    background = torch.zeros(3, device=device)
    with torch.no_grad():
        reference = TorchRasterizer().render(gaussians, camera, background)
        other = chosen.render(gaussians, camera, background)
    difference = (reference.colour - other.colour).abs()
    return {"rasterizers": ["torch", chosen.name], "mean_abs": float(difference.mean()),
            "max_abs": float(difference.max()), "alpha_mean_abs": float((reference.alpha - other.alpha).abs().mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gaussian_refinement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gaussian_refinement.json")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    rasterizer = choose_rasterizer(args.device)
    counts = [2_000] if args.quick else [5_000, 20_000] if args.device == "cpu" else [20_000, 100_000, 400_000]
    sizes = [48] if args.quick else [64, 128] if args.device == "cpu" else [128, 256, 512]
    steps = 3 if args.quick else 5 if args.device == "cpu" else 50
    rows = []
    for count in counts:
        for size in sizes:
            rows.append(measure(count, size, steps, args.device, rasterizer))
            print(rows[-1], flush=True)
    refiner_s = novel_view_refiner_s(256)
    sizes_and_faces = [(2_000, 1_000)] if args.quick else [(20_000, 20_000), (200_000, 300_000)]
    transfers = [hand_over_costs(count, faces, relay_rate(), refiner_s) for count, faces in sizes_and_faces]
    results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
               "device": args.device, "rasterizer": rasterizer.name, "machine": machine_info(),
               "fit": rows, "hand_over": transfers, "agreement": agreement(args.device)}
    write_json(args.out, results)
    median = statistics.median(row["step_s"] for row in rows)
    print(f"rasteriser {rasterizer.name} on {args.device}; median {median} s per fit step")
    print("| Gaussians | render px | camera recovery s | s per fit step | IoU | PSNR before → after |")
    print("|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['gaussians']} | {row['size']} | {row['pose_s']} | {row['step_s']} | {row['iou']} | "
              f"{row['psnr_before']} → {row['psnr_after']} |")
    print("| Gaussians | mesh faces | state MB | encode s | parse s | 2 hops s | sent: total s | kept: host MiB | "
          "kept: GPU MiB | kept for s (refiner call) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in transfers:
        print(f"| {row['gaussians']} | {row['mesh_faces']} | {row['state_bytes'] / 1e6:.1f} | {row['encode_s']} | "
              f"{row['decode_s']} | {row['relay_s']} | {row['sent_s']} | {row['kept_host_mib']} | "
              f"{row['kept_gpu_mib']} | {row['kept_for_s']} |")
    if results["agreement"] is not None:
        print(f"agreement: {results['agreement']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
