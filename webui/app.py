"""``trellisbox web``: the TRELLIS-BOX Gradio app, a gRPC client of the gateway (no model, no torch).

The app users knew: upload image(s) (several = views of one object), open "Generation Settings", tick
"Image Refinement (SD-XL)", click "Generate 3D Model", look at the model in the 3D viewer. Every setting is
one request parameter, its control derived from the parameter's definition (:mod:`webui.form`). Nothing is
loaded from outside the machine: system fonts, no analytics.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import logging
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

import trellisbox
from trellisbox._runtime.allocator import RECEIVING, tune_malloc
from trellisbox.cli import add_connection_arguments, connection_options
from trellisbox.client import GenerationResult, ProgressUpdate, TrellisBoxClient, refinement_lines
from webui.form import (
    Control,
    ProgressPanel,
    check_images,
    controls,
    explain_error,
    prune_results,
    request_options,
)

_log = logging.getLogger(__name__)

EXAMPLE_IMAGE = Path(trellisbox.__file__).parent / "assets" / "example.png"
#: Result folders older than this, or beyond the newest ``KEEP_RESULTS``, are removed at each generation.
MAX_RESULT_AGE_S = 3600.0
KEEP_RESULTS = 32
#: Seconds between progress refreshes while a stage runs silently (the elapsed time keeps moving).
TICK_S = 0.5

#: System fonts only: Gradio's default theme would load Google Fonts.
THEME = gr.themes.Base(
    font=[gr.themes.Font("system-ui"), gr.themes.Font("sans-serif")],
    font_mono=[gr.themes.Font("ui-monospace"), gr.themes.Font("monospace")],
)
CSS = """
.tb-progress { max-width: 100%; overflow-wrap: anywhere; }
.tb-stage { display: grid; grid-template-columns: minmax(5rem, 9rem) minmax(0, 1fr) auto; gap: .5rem;
            align-items: center; }
.tb-stage progress { width: 100%; min-width: 0; }
.tb-error { color: #b00020; white-space: pre-wrap; overflow-wrap: anywhere; }
"""


def _component(control: Control) -> gr.components.Component:
    """The Gradio input of one parameter, everything taken from ``control`` (i.e. from the definition)."""
    common: dict[str, Any] = {"label": control.label, "info": control.info, "elem_id": control.elem_id}
    if control.kind == "slider":
        assert control.minimum is not None and control.maximum is not None  # nosec B101  # for mypy
        return gr.Slider(minimum=control.minimum, maximum=control.maximum, step=control.step, value=control.default,
                         **common)
    if control.kind == "number":
        # A text box, not gr.Number: a number box shows (and sends) 0 where "empty: random" is meant.
        return gr.Textbox(value="" if control.default is None else str(control.default), placeholder="random",
                          **common)
    if control.kind == "choice":
        return gr.Dropdown(choices=list(control.choices), value=control.default, **common)
    if control.kind == "checkbox":
        return gr.Checkbox(value=control.default, **common)
    return gr.Textbox(value=control.default, max_length=control.max_length, **common)


def _paths(files: Sequence[Any] | None) -> list[Path]:
    return [Path(f if isinstance(f, str) else getattr(f, "name", f)) for f in files or []]


def _free_port(host: str) -> int:
    """Gradio takes no port 0: a port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def _error_html(message: str) -> str:
    return f'<div class="tb-error" role="alert">{html.escape(message)}</div>'


class WebApp:
    """Args:
        gateway_target: The gateway's gRPC address.
        connection: :class:`TrellisBoxClient` options for TLS and the bearer token (the app's own credentials: the
            people using the page never see the token).
        results_dir: Where result files are written for the viewer and the downloads (pruned as it goes).
        timeout: Deadline of one generation in seconds.
    """

    def __init__(self, gateway_target: str, results_dir: Path, timeout: float = 900.0,
                 connection: dict[str, Any] | None = None) -> None:
        self.gateway_target = gateway_target
        self.results_dir = results_dir
        self.timeout = timeout
        #: TLS and token options of every client this app opens (trellisbox.cli.connection_options).
        self.connection = connection or {}
        results_dir.mkdir(parents=True, exist_ok=True)
        #: The parameter controls by key (``refine.strength``), filled by :meth:`build`.
        self.inputs: dict[str, gr.components.Component] = {}

    # -- events ---------------------------------------------------------------------------------------------

    def preview(self, files: Sequence[Any] | None) -> tuple[Any, str]:
        paths = _paths(files)
        problem = check_images(paths)
        if problem:
            return gr.Gallery(value=[]), _error_html(problem)
        # Opened on the first image: the whole image, with the other views as thumbnails below it.
        return gr.Gallery(value=[(str(p), p.name) for p in paths], selected_index=0 if paths else None), ""

    def generate(self, files: Sequence[Any] | None, refine: bool, *values: Any) -> Iterator[tuple[str, Any]]:
        """Stream (status, result) as the generation goes; ``result`` (the files to show) comes last, for
        :meth:`present` (Gradio's 3D viewer draws nothing it is given by a streaming event)."""
        skip = gr.skip()
        paths = _paths(files)
        names = [p.name for p in paths]
        if not paths:
            yield _error_html("Upload an image first (or click the example below)."), None
            return
        problem = check_images(paths)
        try:
            options = request_options(dict(zip(self.inputs, values, strict=True)), refine)
        except ValueError as exc:
            problem = problem or explain_error(exc, names, self.gateway_target)
        if problem:
            yield _error_html(problem), None
            return
        size = sum(p.stat().st_size for p in paths)
        panel = ProgressPanel(f"sending {len(paths)} image{'s' if len(paths) > 1 else ''} "
                              f"({size / 2**20:.1f} MB) to the server")
        yield panel.html(), None
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        client = TrellisBoxClient(self.gateway_target, timeout=self.timeout, **self.connection)
        gaussian = options.get("generation", {}).get("gaussian_refinement", {})
        novel_views = bool(gaussian.get("enabled") and gaussian.get("novel_views"))
        formats = ["glb", "ply"] + (["refined"] if refine else []) + (["novel_views"] if novel_views else [])

        def run() -> None:
            try:
                result = client.generate([p.read_bytes() for p in paths], formats=formats,
                                         on_progress=lambda update: events.put(("progress", update)), **options)
            except Exception as exc:  # every failure goes back to the page, worded for a person
                events.put(("error", exc))
            else:
                events.put(("done", result))

        worker = threading.Thread(target=run, name="generate", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    kind, payload = events.get(timeout=TICK_S)
                except queue.Empty:
                    yield panel.html(), skip
                    continue
                if kind == "progress":
                    update: ProgressUpdate = payload
                    if update.stage == "QUEUED":
                        panel.status = f"waiting in the server's queue ({update.total} ahead)"
                    else:
                        panel.update(update.stage, update.step, update.total, update.message)
                    yield panel.html(), skip
                elif kind == "error":
                    panel.finish("failed")
                    _log.info("generation failed: %s", payload)
                    yield panel.html() + _error_html(explain_error(payload, names, self.gateway_target)), None
                    return
                else:
                    yield self._show(payload, panel, names)
                    return
        finally:
            client.close()  # when the page leaves early this cancels the call; the server stops the stage

    @staticmethod
    def present(shown: dict[str, Any] | None) -> tuple[Any, ...]:
        """(refined, glb, ply, downloads) of a finished generation; all empty before one."""
        if not shown:
            return None, None, None, None
        refined = gr.Gallery(value=shown["refined"], selected_index=0) if shown["refined"] else None
        return refined, shown["glb"], shown["ply"], shown["downloads"]

    def _show(self, result: GenerationResult, panel: ProgressPanel, names: Sequence[str]) -> tuple[str, Any]:
        prune_results(self.results_dir, MAX_RESULT_AGE_S, KEEP_RESULTS - 1)
        folder = self.results_dir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        stem = Path(names[0]).stem if names else "model"
        downloads: list[str] = []
        glb = ply = None
        if result.glb is not None:
            glb = folder / f"{stem}.glb"
            glb.write_bytes(result.glb)
            downloads.append(str(glb))
        if result.gaussian_ply is not None:
            ply = folder / f"{stem}.ply"
            ply.write_bytes(result.gaussian_ply)
            downloads.append(str(ply))
        refined = []
        stems = [Path(name).stem for name in names]
        for i, data in enumerate(result.refined_images):
            view = stems[i] if i < len(stems) else stem
            if stems.count(view) > 1 or i >= len(stems):  # two views named alike must not overwrite each other
                view = f"{view}-{i + 1}"
            path = folder / f"{view}.refined.png"
            path.write_bytes(data)
            downloads.append(str(path))
            refined.append((str(path), f"{path.name}"))
        for i, data in enumerate(result.novel_views):  # shown beside the refined images: both came from the refiner
            path = folder / f"{stem}.novel-view-{i}.png"
            path.write_bytes(data)
            downloads.append(str(path))
            refined.append((str(path), f"novel view {i + 1} (refined)"))
        timings = ", ".join(f"{stage.lower()} {seconds:.1f} s" for stage, seconds in result.timings.items())
        panel.finish(f"done: refiner {result.refiner_backend or 'not used'}, generator {result.generator_backend}; "
                     f"seed {result.generation_seed}"
                     + (f", refine seeds {', '.join(map(str, result.refine_seeds))}" if result.refine_seeds else "")
                     + f"; {timings}")
        notes = "".join(f'<div class="tb-refinement">{html.escape(line)}</div>'
                        for line in refinement_lines(result.gaussian_refinement))
        notes += "".join(f'<div class="tb-note">note: {html.escape(note)}</div>' for note in result.notes)
        return panel.html() + notes, {"refined": refined, "glb": str(glb) if glb else None,
                                      "ply": str(ply) if ply else None, "downloads": downloads}

    # -- page -----------------------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="TRELLIS-BOX", analytics_enabled=False, delete_cache=(600, 3600)) as page:
            gr.Markdown("# TRELLIS-BOX: image to 3D\nUpload one image, or several views of one object.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=300):
                    files = gr.File(label="Input image(s): PNG, JPEG or WebP", file_count="multiple",
                                    elem_id="images")
                    previews = gr.Gallery(label="Input", columns=4, height=300, object_fit="contain",
                                          preview=True, elem_id="input-previews", interactive=False)
                    upload_error = gr.HTML(elem_id="upload-error")
                    with gr.Accordion("Generation Settings", open=False, elem_id="settings"):
                        refine = gr.Checkbox(label="Image Refinement (SD-XL)", value=False, elem_id="refine",
                                             info="Refine the image(s) with the SD-XL refiner before 3D generation.")
                        groups = {"refine": "Refinement (used when Image Refinement is ticked)",
                                  "generation": "3D generation (TRELLIS)"}
                        all_controls = controls()
                        for group, title in groups.items():
                            gr.Markdown(f"**{title}**")
                            for control in (c for c in all_controls if c.group == group):
                                self.inputs[control.key] = _component(control)
                    button = gr.Button("Generate 3D Model", variant="primary", elem_id="generate")
                    gr.Examples(examples=[[[str(EXAMPLE_IMAGE)]]], inputs=[files], label="Example")
                with gr.Column(scale=1, min_width=300):
                    status = gr.HTML(elem_id="progress")
                    refined = gr.Gallery(label="Refined image(s) and novel views", columns=4, height=300,
                                         object_fit="contain", preview=True, elem_id="refined", interactive=False)
                    glb_view = gr.Model3D(label="3D model (GLB)", elem_id="glb-viewer", height=360)
                    ply_view = gr.Model3D(label="Gaussian splats (PLY)", elem_id="ply-viewer", height=300)
                    downloads = gr.File(label="Downloads (GLB, PLY, refined PNGs)", file_count="multiple",
                                        elem_id="downloads", interactive=False)
            files.change(self.preview, inputs=[files], outputs=[previews, upload_error])
            shown = gr.State(None)
            results = [refined, glb_view, ply_view, downloads]
            button.click(lambda: (None, *self.present(None)), outputs=[shown, *results], queue=False).then(
                self.generate, inputs=[files, refine, *self.inputs.values()], outputs=[status, shown],
                concurrency_limit=4,
            ).then(self.present, inputs=[shown], outputs=results)
        assert isinstance(page, gr.Blocks)  # nosec B101  # for mypy
        return page

    def launch(self, host: str, port: int, *, block: bool) -> tuple[gr.Blocks, str]:
        """Serve on ``host:port``; returns the page and its URL (``block=False`` returns at once)."""
        page = self.build()
        port = port or _free_port(host)
        page.queue(default_concurrency_limit=4)
        _, url, _ = page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True,
                                theme=THEME, css=CSS, allowed_paths=[str(EXAMPLE_IMAGE.parent)],
                                show_error=True, footer_links=[], ssr_mode=False)
        return page, str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trellisbox web", description="The TRELLIS-BOX web app (Gradio).")
    add_connection_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (default %(default)s)")
    parser.add_argument("--results", type=Path, default=None, help="folder for results (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s web %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests
    logging.info("%s", tune_malloc(RECEIVING))  # it receives every artifact it shows (trellisbox/_runtime/allocator.py)
    if args.port and _port_taken(args.host, args.port):
        print(f"port {args.port} is already in use on {args.host}: choose another with --port", file=sys.stderr)
        return 1
    try:
        connection = connection_options(args)
        TrellisBoxClient(args.target, **connection).close()  # reads the TLS files: a bad one fails now, not per page
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results = args.results or Path(tempfile.mkdtemp(prefix="trellisbox-web-"))
    app = WebApp(args.target, results, connection=connection)
    try:
        page, url = app.launch(args.host, args.port, block=False)
        print(f"web app on {url} (gateway {args.target})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
        page.close()
    finally:
        if args.results is None:
            shutil.rmtree(results, ignore_errors=True)
    return 0
