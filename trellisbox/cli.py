"""``trellisbox`` console command.

    trellisbox generate chair.png -o chair.glb --refine --strength 0.3 --prompt "a wooden chair"
    trellisbox generate chair.png -o chair.glb --ply chair.ply --gs-enabled --gs-steps 100
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

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
from trellisbox._runtime.allocator import RECEIVING, tune_malloc
from trellisbox.client import (
    GenerationResult,
    ProgressUpdate,
    TrellisBoxClient,
    connection_lost,
    refinement_lines,
    without_stage,
)

#: File names and server messages printed as they are: no markup (``[x].png`` is a file, not a style), and no
#: wrapping inside a path.
_console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)


def _add_parameters(group: argparse._ArgumentGroup, cls: type[ParamModel], dest: str) -> None:
    """One flag per parameter of ``cls``, derived from its definition (name, type, range, default, doc)."""
    for path, info in walk(cls):
        kind = scalar_type(info)
        default = default_at(cls, path)
        shown = "random" if default is None else repr(default.value if isinstance(default, Enum) else default)
        text = f"{full_doc(cls, path)} {describe(info).capitalize()}; server default {shown}."
        if kind is bool:  # --gs-enabled / --no-gs-enabled; neither: the server's default
            group.add_argument(f"--{cli_stem(cls, path)}", dest=f"{dest}.{'.'.join(path)}",
                               action=argparse.BooleanOptionalAction, default=None, help=text.replace("%", "%%"))
            continue
        choices = [member.value for member in kind] if issubclass(kind, Enum) else None
        group.add_argument(f"--{cli_stem(cls, path)}", dest=f"{dest}.{'.'.join(path)}", metavar=None if choices
                           else kind.__name__.upper(), type=str if choices else kind, choices=choices,
                           help=text.replace("%", "%%"))


#: Where the CLI and the web app read a token when no flag gives one.
TOKEN_ENV = "TRELLISBOX_TOKEN"  # nosec B105  # the variable's name, not a token


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say how to reach the gateway: address, TLS, token (shared by ``generate`` and ``web``)."""
    c = parser.add_argument_group("connection")
    c.add_argument("--target", default="127.0.0.1:50051", help="gateway address (default %(default)s)")
    c.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca-file)")
    c.add_argument("--ca-file", type=Path, help="PEM CA bundle the gateway's certificate chains to")
    c.add_argument("--cert-file", type=Path, help="PEM client certificate, for a gateway with tls=mutual")
    c.add_argument("--key-file", type=Path, help="PEM private key of --cert-file")
    tokens = c.add_mutually_exclusive_group()
    tokens.add_argument("--token-file", type=Path, help="file holding the bearer token (its first line that is not "
                        "a # comment)")
    tokens.add_argument("--token", help=f"bearer token (visible to other users in the process list: prefer "
                        f"--token-file or the {TOKEN_ENV} environment variable)")


def connection_options(args: argparse.Namespace) -> dict[str, Any]:
    """:class:`TrellisBoxClient` keyword arguments from the flags of :func:`add_connection_arguments`.

    Raises:
        OSError: the token file cannot be read.
    """
    token = args.token
    if args.token_file is not None:  # the first token of a file in the gateway's format (# comments skipped)
        lines = [line.strip() for line in args.token_file.read_text().splitlines()]
        token = next((line for line in lines if line and not line.startswith("#")), None)
    elif token is None:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    return {"token": token, "tls": args.tls, "ca_file": args.ca_file, "cert_file": args.cert_file,
            "key_file": args.key_file}


def seconds(text: str) -> float:
    """A ``--timeout``: a positive, finite number of seconds."""
    value = float(text)
    if not 0 < value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("generate", help="image(s) -> 3D model (GLB), optionally refined first")
    p.add_argument("images", nargs="+", type=Path, help="one image, or several views of one object")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the GLB")
    p.add_argument("--timeout", type=seconds, default=900.0, help="deadline in seconds (default %(default)s)")
    p.add_argument("--request-id", default="", help="make the request durable under this id (A-Z a-z 0-9 . _ : -): "
                   "the gateway finishes it even if this command is interrupted, and `trellisbox fetch ID` gets the "
                   "result; a broken connection is retried without computing anything twice")
    add_connection_arguments(p)
    r = p.add_argument_group("refinement (SDXL refiner)")
    r.add_argument("--refine", action="store_true", help="refine the image(s) before generation")
    r.add_argument("--refined-png", type=Path, help="also write the refined image(s) here")
    _add_parameters(r, RefineParams, "refine")
    g = p.add_argument_group("generation (TRELLIS)")
    g.add_argument("--ply", type=Path, help="also write the Gaussian splats (PLY) here")
    g.add_argument("--novel-views-png", type=Path, help="also write the refined novel views here (NAME-0.png, ...; "
                   "with --gs-enabled --gs-novel-views)")
    _add_parameters(g, GenerationParams, "generation")


def _add_fetch_and_cancel(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    f = sub.add_parser("fetch", help="the result of a durable request (sent with --request-id), waiting while it runs")
    f.add_argument("request_id", help="the id the request was sent with")
    f.add_argument("-o", "--output", type=Path, required=True, help="where to write the GLB")
    f.add_argument("--refined-png", type=Path, help="also write the refined image(s) here, if the request made them")
    f.add_argument("--ply", type=Path, help="also write the Gaussian splats (PLY) here, if the request made them")
    f.add_argument("--novel-views-png", type=Path, help="also write the refined novel views here (NAME-0.png, ...), "
                   "if the request made them")
    f.add_argument("--timeout", type=seconds, default=900.0, help="deadline in seconds (default %(default)s)")
    add_connection_arguments(f)
    c = sub.add_parser("cancel", help="stop a durable request, or delete its stored result")
    c.add_argument("request_id", help="the id the request was sent with")
    add_connection_arguments(c)


def name_images(message: str, names: Sequence[str]) -> str:
    """A server message with ``images[i]`` replaced by the name the user knows (``chair.png``)."""
    def name(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return names[index] if index < len(names) else match.group(0)

    return re.sub(r"images\[(\d+)\]", name, message)


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


class StageTime(ProgressColumn):
    """How long a stage took: from the end of the previous stage (the request's start for the first one) to its
    own end, so the rows add up to the whole request and match the stage timings the server reports."""

    def render(self, task: Task) -> Text:
        began = task.fields.get("began")
        if began is None:
            return Text("")
        ended = task.fields.get("ended")
        return Text(f"{(ended or time.monotonic()) - began:6.1f} s", style="progress.elapsed")


def stage_progress(console: Console) -> Progress:
    """The progress display :class:`StageBars` fills: stage, bar, step/total, seconds."""
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), StageTime(),
                    console=console, transient=False)


class StageBars:
    """One progress bar per stage. The first row appears at once (``status``: what is being sent) and becomes
    the first stage that reports; each later stage begins when the previous one ends."""

    def __init__(self, progress: Progress, status: str = "sending the request") -> None:
        self._progress = progress
        self._current: tuple[str, TaskID] = ("", progress.add_task(status, total=None, began=time.monotonic()))

    def __call__(self, update: ProgressUpdate) -> None:
        stage, task = self._current
        if update.stage != stage:
            if stage:
                task = self._start_next()
            self._current = (update.stage, task)
        name = update.stage.lower().replace("_", " ")
        if update.stage == "QUEUED" and update.total:
            self._progress.update(task, total=None, description=f"{name:<16} {update.total} ahead in the queue")
            return
        self._progress.update(task, completed=update.step, total=update.total or None,
                              description=f"{name:<16} {update.message}")

    def _start_next(self) -> TaskID:
        now = self._end_current()
        return self._progress.add_task("", total=None, began=now)

    def _end_current(self, done: bool = True) -> float:
        now = time.monotonic()
        _, task = self._current
        if done:
            total = self._progress.tasks[task].total if task in self._progress.task_ids else None
            self._progress.update(task, total=total or 1, completed=total or 1, ended=now)
        else:
            self._progress.update(task, ended=now)
        return now

    def finish(self, done: bool = True) -> None:
        """End the last stage's row: its time stopped, its bar full unless the request failed (``done=False``)."""
        self._end_current(done)


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
    for line in refinement_lines(result.gaussian_refinement):
        _console.print(line)
    for note in result.notes:
        _console.print(f"note: {note}")
    for path in written:
        _console.print(f"wrote {path}")


def write_outputs(result: GenerationResult, output: Path, refined_png: Path | None,
                  ply: Path | None, novel_views_png: Path | None = None) -> list[Path]:
    """Write each artifact asked for; the paths written.

    Raises:
        OutputError: some could not be written (the others are; it lists both).
    """
    written: list[Path] = []
    failed: list[str] = []

    def write(path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError as exc:
            failed.append(f"cannot write {path}: {exc.strerror or exc}")
            return
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
    if novel_views_png is not None:
        for i, data in enumerate(result.novel_views):
            write(novel_views_png.with_stem(f"{novel_views_png.stem}-{i}"), data)
    if failed:
        raise OutputError(failed, written)
    return written


class OutputError(Exception):
    """Some artifacts could not be written: ``failures`` says which and why, ``written`` what was."""

    def __init__(self, failures: list[str], written: list[Path]) -> None:
        super().__init__("; ".join(failures))
        self.failures = failures
        self.written = written


def _unwritable(paths: Sequence[Path | None]) -> str | None:
    """Why one of ``paths`` cannot be written, found before anything is computed (a folder at the path, a file
    where a folder must be made, a folder this user cannot write in); None when none is known."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            return f"{path} is a folder; give a file name"
        if path.exists():
            if not os.access(path, os.W_OK):
                return f"cannot write {path}: no permission"
            continue
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            return f"cannot write {path}: {parent} is not a folder"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot write {path}: no permission to write in {parent}"
    return None


def _unreadable(paths: Sequence[Path]) -> str | None:
    for path in paths:
        if not path.is_file():
            return f"{path}: no such file" if not path.exists() else f"{path} is not a file"
    return None


def _explain(exc: grpc.RpcError, names: Sequence[str], target: str) -> str:
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details = name_images(exc.details() or "", names)  # type: ignore[attr-defined]
    if connection_lost(exc):
        return (f"cannot reach the gateway at {target} ({details}).\n"
                "Start the stack (in a checkout of trellisbox-serving: `make run`), or point --target at a running "
                "gateway. A gateway that serves TLS needs --tls (and --ca-file for a private CA).")
    return f"{code.name}: {without_stage(details) if code == grpc.StatusCode.INVALID_ARGUMENT else details}"


def run_generate(args: argparse.Namespace) -> int:
    formats = (["glb"] + (["refined"] if args.refined_png else []) + (["ply"] if args.ply else [])
               + (["novel_views"] if args.novel_views_png else []))
    options: dict[str, Any] = dict(
        refine=args.refine,
        refine_params=given_parameters(args, "refine"),
        generation=given_parameters(args, "generation"),
        formats=formats,
        request_id=args.request_id,
    )
    needs_refine = ["--refined-png"] * bool(args.refined_png) + [
        f"--{cli_stem(RefineParams, path)}" for path, _ in walk(RefineParams)
        if getattr(args, f"refine.{'.'.join(path)}") is not None]
    if needs_refine and not args.refine:
        _console.print(f"error: {', '.join(needs_refine)} {'needs' if len(needs_refine) == 1 else 'need'} --refine")
        return 2
    problem = _unreadable(args.images) or _unwritable([args.output, args.refined_png, args.ply, args.novel_views_png])
    if problem:
        _console.print(f"error: {problem}")
        return 2
    names = [path.name for path in args.images]
    size = sum(path.stat().st_size for path in args.images)
    status = (f"sending {', '.join(names) if len(names) <= 3 else f'{len(names)} images'} "
              f"({size / 2**20:.1f} MB) to {args.target}")
    return _follow(args, status, names, lambda client, bars: client.generate(args.images, on_progress=bars, **options))


def run_fetch(args: argparse.Namespace) -> int:
    problem = _unwritable([args.output, args.refined_png, args.ply, args.novel_views_png])
    if problem:
        _console.print(f"error: {problem}")
        return 2
    return _follow(args, f"asking {args.target} for request {args.request_id}", [],
                   lambda client, bars: client.fetch(args.request_id, on_progress=bars))


def run_cancel(args: argparse.Namespace) -> int:
    try:
        with TrellisBoxClient(args.target, **connection_options(args)) as client:
            outcome = client.cancel(args.request_id)
    except grpc.RpcError as exc:
        _console.print(f"error: {_explain(exc, [], args.target)}")
        return 1
    except (OSError, ValueError) as exc:  # a TLS or token file that cannot be read (never its content)
        _console.print(f"error: {exc}")
        return 1
    _console.print(f"request {args.request_id}: {'stopped' if outcome == 'stopped' else 'stored result deleted'}")
    return 0


def _follow(args: argparse.Namespace, status: str, names: Sequence[str],
            call: Callable[[TrellisBoxClient, StageBars], GenerationResult]) -> int:
    """Run ``call`` with progress bars, then write its outputs; the exit status."""
    try:
        with TrellisBoxClient(args.target, timeout=args.timeout, **connection_options(args)) as client, \
                stage_progress(_console) as progress:
            bars = StageBars(progress, status)
            try:
                result = call(client, bars)
            except BaseException:
                bars.finish(done=False)
                raise
            bars.finish()
    except KeyboardInterrupt:
        if args.request_id:
            _console.print(f"interrupted; request {args.request_id} goes on at the gateway: `trellisbox fetch "
                           f"{args.request_id} -o ...` gets it, `trellisbox cancel {args.request_id}` stops it")
        else:
            _console.print("cancelled (the server stops the request)")
        return 130
    except grpc.RpcError as exc:
        _console.print(f"error: {_explain(exc, names, args.target)}")
        return 1
    except (OSError, ValueError) as exc:  # a file that cannot be read or written (never its content)
        _console.print(f"error: {exc}")
        return 1
    try:
        written = write_outputs(result, args.output, args.refined_png, args.ply, args.novel_views_png)
    except OutputError as exc:
        print_summary(result, exc.written)
        for failure in exc.failures:
            _console.print(f"error: {failure}")
        if result.request_id and args.request_id:
            _console.print(f"the result stays at the gateway for its retention: `trellisbox fetch {args.request_id} "
                           "-o ...` writes it again")
        return 1
    print_summary(result, written)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trellisbox", description="TRELLIS-BOX Serving client")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_fetch_and_cancel(sub)
    sub.add_parser("web", add_help=False, help="serve the web form in front of a gateway (see: trellisbox web -h)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "web":
        from webui.app import main as web_main

        return web_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    tune_malloc(RECEIVING)  # this process receives artifacts: their pages reused, not faulted in anew (allocator.py)
    commands = {"generate": run_generate, "fetch": run_fetch, "cancel": run_cancel}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
