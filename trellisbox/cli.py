"""``trellisbox`` console command.

    trellisbox generate chair.png -o chair.glb --refine --strength 0.3 --prompt "a wooden chair"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from trellisbox.client import GenerationResult, ProgressUpdate, TrellisBoxClient

_console = Console(stderr=True)


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("generate", help="image(s) -> 3D model (GLB), optionally refined first")
    p.add_argument("images", nargs="+", type=Path, help="one image, or several views of one object")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the GLB")
    p.add_argument("--target", default="127.0.0.1:50051", help="gateway address (default %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0, help="deadline in seconds (default %(default)s)")
    p.add_argument("--request-id", default="", help="id for logs and metrics")
    r = p.add_argument_group("refinement (SDXL refiner)")
    r.add_argument("--refine", action="store_true", help="refine the image(s) before generation")
    r.add_argument("--strength", type=float, help="0-1, lower is more faithful (server default 0.3)")
    r.add_argument("--guidance", dest="guidance_scale", type=float, help="guidance scale (default 7.5)")
    r.add_argument("--steps", dest="num_inference_steps", type=int, help="inference steps (default 20)")
    r.add_argument("--prompt", help='default "high quality, detailed, sharp"')
    r.add_argument("--negative-prompt", help='default "blurry, low quality, distorted"')
    r.add_argument("--refine-seed", type=int, help="refiner seed (random when omitted)")
    r.add_argument("--refined-png", type=Path, help="also write the refined image(s) here")
    g = p.add_argument_group("generation (TRELLIS)")
    g.add_argument("--seed", type=int, help="generation seed (random when omitted; printed for reruns)")
    g.add_argument("--ss-steps", type=int, help="sparse-structure sampler steps (default 12)")
    g.add_argument("--ss-cfg", type=float, help="sparse-structure guidance (default 7.5)")
    g.add_argument("--slat-steps", type=int, help="SLat sampler steps (default 12)")
    g.add_argument("--slat-cfg", type=float, help="SLat guidance (default 3.0)")
    g.add_argument("--multi-image-mode", choices=("stochastic", "multidiffusion"))
    g.add_argument("--simplify", dest="mesh_simplify", type=float, help="mesh simplification (default 0.95)")
    g.add_argument("--texture-size", type=int, help="texture edge in pixels (default 1024)")
    g.add_argument("--ply", type=Path, help="also write the Gaussian splats (PLY) here")


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    generation = _given(args, "seed", "mesh_simplify", "texture_size", "multi_image_mode")
    stages = (("sparse_structure", args.ss_steps, args.ss_cfg), ("slat", args.slat_steps, args.slat_cfg))
    for stage, steps, cfg in stages:
        sampler = {k: v for k, v in (("steps", steps), ("cfg_strength", cfg)) if v is not None}
        if sampler:
            generation[stage] = sampler
    return generation


class StageBars:
    """One progress bar per stage, created when the stage first reports."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, update: ProgressUpdate) -> None:
        if update.stage not in self._tasks:
            self._tasks[update.stage] = self._progress.add_task(update.stage.lower(), total=update.total or None)
        self._progress.update(self._tasks[update.stage], completed=update.step, total=update.total or None,
                              description=f"{update.stage.lower():<16} {update.message}")


def print_summary(result: GenerationResult, written: Sequence[Path]) -> None:
    table = Table(title=f"request {result.request_id}", show_header=True)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in result.timings.items():
        table.add_row(stage.lower(), f"{seconds:.2f}")
    _console.print(table)
    _console.print(f"backends: refiner={result.refiner_backend or '(not used)'} generator={result.generator_backend}")
    seeds = f"generation seed={result.generation_seed}"
    if result.refine_seeds:
        seeds += f", refine seeds={result.refine_seeds}"
    _console.print(seeds)
    for note in result.notes:
        _console.print(f"note: {note}")
    for path in written:
        _console.print(f"wrote {path}")


def write_outputs(result: GenerationResult, output: Path, refined_png: Path | None,
                  ply: Path | None) -> list[Path]:
    written: list[Path] = []

    def write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)

    if result.glb is None:
        raise RuntimeError("the gateway returned no GLB")
    write(output, result.glb)
    refined = result.refined_images
    if refined_png is not None:
        for i, data in enumerate(refined):
            write(refined_png if len(refined) == 1 else refined_png.with_stem(f"{refined_png.stem}-{i}"), data)
    if ply is not None and result.gaussian_ply is not None:
        write(ply, result.gaussian_ply)
    return written


def run_generate(args: argparse.Namespace) -> int:
    formats = ["glb"] + (["refined"] if args.refined_png else []) + (["ply"] if args.ply else [])
    options: dict[str, Any] = dict(
        refine=args.refine,
        refine_params=_given(args, "strength", "guidance_scale", "num_inference_steps", "prompt",
                             "negative_prompt") | ({"seed": args.refine_seed} if args.refine_seed is not None else {}),
        generation=generation_options(args),
        formats=formats,
        request_id=args.request_id,
    )
    if args.refined_png and not args.refine:
        _console.print("error: --refined-png needs --refine")
        return 2
    try:
        with TrellisBoxClient(args.target, timeout=args.timeout) as client, Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=_console, transient=False,
        ) as progress:
            result = client.generate(args.images, on_progress=StageBars(progress), **options)
    except grpc.RpcError as exc:
        _console.print(f"error: {exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
        return 1
    except OSError as exc:
        _console.print(f"error: {exc}")
        return 1
    print_summary(result, write_outputs(result, args.output, args.refined_png, args.ply))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trellisbox", description="TRELLIS-BOX Serving client")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    sub.add_parser("web", add_help=False, help="serve the web form in front of a gateway (see: trellisbox web -h)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "web":
        from webui.app import main as web_main

        return web_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return run_generate(args)


if __name__ == "__main__":
    sys.exit(main())
