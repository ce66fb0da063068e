"""Gaussian refinement speed: seconds per fit step and per camera recovery against Gaussian count and render
size, and the cost of moving the Gaussians between services as a PLY (docs/gaussian-refinement.md).

``python -m bench.gaussian_refinement [--quick] [--device cpu|cuda] [--out FILE]``

The scene is the preview backend's splats of the bundled example (subsampled to each count), fitted to the
example from its recovered camera. On CPU the PyTorch rasteriser runs with one thread (the service's model
thread on a shared machine); on CUDA the rasteriser :func:`choose_rasterizer` picks (gsplat when installed),
and the renders of gsplat and of the PyTorch rasteriser are compared (mean and largest absolute difference)
— the recipe for a GPU host. Writes bench/results/gaussian_refinement.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.common import REPO, machine_info, write_json
from trellis_service.backends.preview import PreviewBackend
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


def transfer_costs(count: int) -> dict[str, Any]:
    """Encoding the Gaussians as a PLY and reading them back: the price of sending them between services."""
    gaussians = _splats(count)
    data, encode_s = _timed(lambda: gaussians.to_splats().ply_bytes())
    _, decode_s = _timed(lambda: GaussianSet.from_splats(read_splat_ply(data)))
    return {"gaussians": len(gaussians), "ply_bytes": len(data), "encode_s": round(encode_s, 4),
            "decode_s": round(decode_s, 4)}


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
    transfers = [transfer_costs(count) for count in ([2_000] if args.quick else [20_000, 200_000])]
    results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
               "device": args.device, "rasterizer": rasterizer.name, "machine": machine_info(),
               "fit": rows, "ply_transfer": transfers, "agreement": agreement(args.device)}
    write_json(args.out, results)
    median = statistics.median(row["step_s"] for row in rows)
    print(f"rasteriser {rasterizer.name} on {args.device}; median {median} s per fit step")
    print("| Gaussians | render px | camera recovery s | s per fit step | IoU | PSNR before → after |")
    print("|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['gaussians']} | {row['size']} | {row['pose_s']} | {row['step_s']} | {row['iou']} | "
              f"{row['psnr_before']} → {row['psnr_after']} |")
    print("| Gaussians | PLY MB | encode s | decode s |")
    print("|---:|---:|---:|---:|")
    for row in transfers:
        print(f"| {row['gaussians']} | {row['ply_bytes'] / 1e6:.1f} | {row['encode_s']} | {row['decode_s']} |")
    if results["agreement"] is not None:
        print(f"agreement: {results['agreement']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
