"""``trellisbox`` console command.

    trellisbox generate chair.png -o chair.glb --refine --strength 0.3 --prompt "a wooden chair"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from trellisbox._domain.params import (
    GenerationParams,
    ParamModel,
    RefineParams,
    cli_stem,
    default_at,
    describe,
    full_doc,
    scalar_type,
    walk,
)
from trellisbox.client import GenerationResult, ProgressUpdate, TrellisBoxClient

_console = Console(stderr=True)


def _add_parameters(group: argparse._ArgumentGroup, cls: type[ParamModel], dest: str) -> None:
    """One flag per parameter of ``cls``, derived from its definition (name, type, range, default, doc)."""
    for path, info in walk(cls):
        kind = scalar_type(info)
        default = default_at(cls, path)
        shown = "random" if default is None else repr(default.value if isinstance(default, Enum) else default)
        text = f"{full_doc(cls, path)} {describe(info).capitalize()}; server default {shown}."
        choices = [member.value for member in kind] if issubclass(kind, Enum) else None
        group.add_argument(f"--{cli_stem(cls, path)}", dest=f"{dest}.{'.'.join(path)}", metavar=None if choices
                           else kind.__name__.upper(), type=str if choices else kind, choices=choices,
                           help=text.replace("%", "%%"))


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("generate", help="image(s) -> 3D model (GLB), optionally refined first")
    p.add_argument("images", nargs="+", type=Path, help="one image, or several views of one object")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the GLB")
    p.add_argument("--target", default="127.0.0.1:50051", help="gateway address (default %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0, help="deadline in seconds (default %(default)s)")
    p.add_argument("--request-id", default="", help="id for logs and metrics")
    r = p.add_argument_group("refinement (SDXL refiner)")
    r.add_argument("--refine", action="store_true", help="refine the image(s) before generation")
    r.add_argument("--refined-png", type=Path, help="also write the refined image(s) here")
    _add_parameters(r, RefineParams, "refine")
    g = p.add_argument_group("generation (TRELLIS)")
    g.add_argument("--ply", type=Path, help="also write the Gaussian splats (PLY) here")
    _add_parameters(g, GenerationParams, "generation")


def given_parameters(args: argparse.Namespace, dest: str) -> dict[str, Any]:
    """The parameters given on the command line under ``dest``, nested as the client takes them."""
    given: dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is None or not key.startswith(dest + "."):
            continue
        *parents, name = key.split(".")[1:]
        target = given
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = value
    return given


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
        refine_params=given_parameters(args, "refine"),
        generation=given_parameters(args, "generation"),
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
