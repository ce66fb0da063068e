"""``trellisbox web``: the TRELLIS-BOX web form in front of the gateway.

The form users knew: upload image(s), open "Generation Settings", tick "Image Refinement (SD-XL)"
(with the refinement strength and prompts adjustable), click "Generate 3D Model". The page streams
progress per stage and offers the GLB, the refined image and the Gaussian PLY.

One small HTTP server (standard library), no state beyond a results folder:

- ``GET /``: the form.
- ``POST /api/generate``: JSON ``{"images": [base64, ...], "refine": bool, "refine_params": {...},
  "generation": {...}}``; answers with newline-delimited JSON events: ``{"progress": ...}`` lines,
  then ``{"done": ...}`` (with download links) or ``{"error": {"code", "message"}}``.
- ``GET /results/<id>/<file>``: a result file.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import html
import json
import logging
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

from trellisbox._domain.params import GenerationParams, ParamModel, RefineParams, bounds, default_at, from_text
from trellisbox.client import ProgressUpdate, TrellisBoxClient

_log = logging.getLogger(__name__)

MAX_BODY_BYTES = 96 * 2**20  # base64 of the gateway's 64 MiB request limit
_RESULT_PATH = re.compile(r"^/results/([0-9a-f]{32})/(model\.glb|model\.ply|refined-\d+\.png)$")
_CONTENT_TYPES = {".glb": "model/gltf-binary", ".ply": "application/x-ply", ".png": "image/png"}


class BadForm(ValueError):
    """The posted form cannot be turned into a request."""


def parse_form(body: bytes) -> dict[str, Any]:
    """The generate options of a posted form (images decoded from base64, fields typed)."""
    try:
        form = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadForm(f"the body is not JSON: {exc}") from None
    if not isinstance(form, dict):
        raise BadForm("the body must be a JSON object")
    try:
        images = [base64.b64decode(data, validate=True) for data in form.get("images", [])]
    except (binascii.Error, TypeError):
        raise BadForm("images must be a list of base64 strings") from None
    refine = bool(form.get("refine", False))
    try:
        refine_params = from_text(RefineParams, form.get("refine_params") or {}, "refine_params") if refine else {}
        generation = from_text(GenerationParams, form.get("generation") or {}, "generation")
    except ValueError as exc:
        raise BadForm(str(exc)) from None
    return {
        "images": images,
        "refine": refine,
        "refine_params": refine_params,
        "generation": generation,
        "formats": ["glb", "ply"] + (["refined"] if refine else []),
    }


class WebUI:
    """Args:
        gateway_target: The gateway's gRPC address.
        results_dir: Where result files are kept for download.
        timeout: Deadline of one generation in seconds.
    """

    def __init__(self, gateway_target: str, results_dir: Path, timeout: float = 900.0) -> None:
        self.gateway_target = gateway_target
        self.results_dir = results_dir
        self.timeout = timeout
        results_dir.mkdir(parents=True, exist_ok=True)

    def server(self, host: str, port: int) -> ThreadingHTTPServer:
        ui = self

        class Handler(_Handler):
            webui = ui

        return ThreadingHTTPServer((host, port), Handler)


class _Handler(BaseHTTPRequestHandler):
    webui: WebUI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        _log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.encode())
            return
        match = _RESULT_PATH.match(self.path)
        path = self.webui.results_dir / match.group(1) / match.group(2) if match else None
        if path is None or not path.is_file():
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")
            return
        self._send(HTTPStatus.OK, _CONTENT_TYPES[path.suffix], path.read_bytes())

    def do_POST(self) -> None:
        if self.path != "/api/generate":
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "application/json",
                       _event({"error": {"code": "INVALID_ARGUMENT", "message": "the upload is too large"}}))
            return
        try:
            options = parse_form(self.rfile.read(length))
        except BadForm as exc:
            self._send(HTTPStatus.BAD_REQUEST, "application/json",
                       _event({"error": {"code": "INVALID_ARGUMENT", "message": str(exc)}}))
            return
        # Events are streamed as they come: chunked NDJSON.
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self._stream(options)
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stream(self, options: dict[str, Any]) -> None:
        def progress(update: ProgressUpdate) -> None:
            self._chunk(_event({"progress": {"stage": update.stage, "step": update.step, "total": update.total,
                                             "message": update.message}}))

        try:
            with TrellisBoxClient(self.webui.gateway_target, timeout=self.webui.timeout) as client:
                result = client.generate(options.pop("images"), on_progress=progress, **options)
        except grpc.RpcError as exc:
            self._chunk(_event({"error": {"code": exc.code().name, "message": exc.details()}}))  # type: ignore[attr-defined]
            return
        except (BrokenPipeError, ConnectionResetError):
            return  # the browser left; leaving the client stream cancels the generation
        result_id = uuid.uuid4().hex
        folder = self.webui.results_dir / result_id
        folder.mkdir()
        files: dict[str, Any] = {}
        if result.glb is not None:
            (folder / "model.glb").write_bytes(result.glb)
            files["glb"] = f"/results/{result_id}/model.glb"
        if result.gaussian_ply is not None:
            (folder / "model.ply").write_bytes(result.gaussian_ply)
            files["ply"] = f"/results/{result_id}/model.ply"
        refined = []
        for i, data in enumerate(result.refined_images):
            (folder / f"refined-{i}.png").write_bytes(data)
            refined.append(f"/results/{result_id}/refined-{i}.png")
        files["refined"] = refined
        self._chunk(_event({"done": {
            "request_id": result.request_id, "files": files, "timings": result.timings,
            "refine_seeds": result.refine_seeds, "generation_seed": result.generation_seed,
            "refiner_backend": result.refiner_backend, "generator_backend": result.generator_backend,
            "notes": result.notes,
        }}))


def _event(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload).encode() + b"\n"


_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>TRELLIS-BOX</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  fieldset { border: 1px solid #ccc; border-radius: 6px; margin: 1rem 0; }
  label { display: block; margin: .5rem 0; }
  input[type=text], input[type=number] { width: 100%; box-sizing: border-box; }
  button { font-size: 1.1rem; padding: .5rem 1.5rem; }
  .stage { display: grid; grid-template-columns: 10rem 1fr 6rem; gap: .5rem; align-items: center; }
  #error { color: #b00020; white-space: pre-wrap; }
  img { max-width: 256px; border: 1px solid #ddd; }
</style>
</head>
<body>
<h1>TRELLIS-BOX: image to 3D</h1>
<form id="form">
  <label>Image(s) — one image, or several views of one object
    <input id="images" type="file" accept="image/png,image/jpeg,image/webp" multiple required></label>
  <details id="settings">
    <summary>Generation Settings</summary>
    <fieldset>
      <legend>Refinement</legend>
      <label><input id="refine" type="checkbox"> Image Refinement (SD-XL)</label>
      <label>Refinement strength <output id="strength-value">@@refine.strength.value@@</output>
        <input id="strength" type="range" @@refine.strength.range:0.05@@></label>
      <label>Prompt <input id="prompt" type="text" placeholder="@@refine.prompt.value@@"></label>
      <label>Negative prompt
        <input id="negative-prompt" type="text" placeholder="@@refine.negative_prompt.value@@"></label>
    </fieldset>
    <fieldset>
      <legend>3D generation</legend>
      <label>Seed (empty: random) <input id="seed" type="number" @@generation.seed.range:1@@></label>
      <label>Texture size <input id="texture-size" type="number" @@generation.texture_size.range:256@@></label>
      <label>Mesh simplification <input id="simplify" type="number" @@generation.mesh_simplify.range:0.01@@></label>
    </fieldset>
  </details>
  <button id="generate" type="submit">Generate 3D Model</button>
</form>
<div id="progress"></div>
<div id="error"></div>
<div id="result"></div>
<script>
const $ = (id) => document.getElementById(id);
$("strength").oninput = () => { $("strength-value").textContent = Number($("strength").value).toFixed(2); };
const toBase64 = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result.split(",")[1]);
  reader.onerror = reject;
  reader.readAsDataURL(file);
});
const bars = {};
function showProgress(p) {
  if (!bars[p.stage]) {
    const row = document.createElement("div");
    row.className = "stage";
    row.innerHTML = `<span>${p.stage.toLowerCase()}</span><progress max="1" value="0"></progress><span></span>`;
    $("progress").appendChild(row);
    bars[p.stage] = row;
  }
  const [, bar, text] = bars[p.stage].children;
  bar.max = p.total || 1; bar.value = p.total ? p.step : 1;
  text.textContent = p.total ? `${p.step}/${p.total}` : "";
}
function showDone(d) {
  const links = [`<a href="${d.files.glb}" download>model.glb</a>`];
  if (d.files.ply) links.push(`<a href="${d.files.ply}" download>gaussians.ply</a>`);
  const refined = d.files.refined.map((u) => `<a href="${u}" download><img src="${u}" alt="refined image"></a>`);
  $("result").innerHTML = `<h2>Done</h2><p>${links.join(" · ")}</p>${refined.join("")}
    <p>backends: ${d.refiner_backend || "no refinement"} → ${d.generator_backend};
    seed ${d.generation_seed}${d.refine_seeds.length ? ", refine seeds " + d.refine_seeds.join(", ") : ""}</p>
    <p>${d.notes.join("<br>")}</p>`;
}
$("form").onsubmit = async (event) => {
  event.preventDefault();
  $("generate").disabled = true; $("progress").innerHTML = ""; $("error").textContent = "";
  $("result").innerHTML = ""; for (const k in bars) delete bars[k];
  try {
    const images = await Promise.all([...$("images").files].map(toBase64));
    const body = {
      images, refine: $("refine").checked,
      refine_params: { strength: $("strength").value, prompt: $("prompt").value,
                       negative_prompt: $("negative-prompt").value },
      generation: { seed: $("seed").value, texture_size: $("texture-size").value, mesh_simplify: $("simplify").value },
    };
    const response = await fetch("/api/generate", { method: "POST", body: JSON.stringify(body),
                                                    headers: { "Content-Type": "application/json" } });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffered.indexOf("\\n")) >= 0) {
        const event = JSON.parse(buffered.slice(0, newline));
        buffered = buffered.slice(newline + 1);
        if (event.progress) showProgress(event.progress);
        if (event.done) showDone(event.done);
        if (event.error) $("error").textContent = `${event.error.code}: ${event.error.message}`;
      }
    }
  } catch (err) {
    $("error").textContent = String(err);
  } finally {
    $("generate").disabled = false;
  }
};
</script>
</body>
</html>
"""


_MODELS: dict[str, type[ParamModel]] = {"refine": RefineParams, "generation": GenerationParams}


def _field_markup(match: re.Match[str]) -> str:
    """``@@refine.strength.value@@`` → the default; ``@@generation.texture_size.range:256@@`` → min/max/step/value
    attributes of an input, all from the parameter's definition."""
    model, name, what, step = match.group(1), match.group(2), match.group(3), match.group(4)
    cls = _MODELS[model]
    path = tuple(name.split("/"))
    default = default_at(cls, path)
    if what == "value":
        return html.escape(f"{default:.2f}" if isinstance(default, float) else str(default), quote=True)
    info = cls.model_fields[path[0]]
    low, low_open, high = bounds(info)
    attrs = {"min": float(step) if low_open else low, "max": high, "step": float(step), "value": default}
    return " ".join(f'{key}="{value if isinstance(value, int) else format(value, "g")}"'
                    for key, value in attrs.items() if value is not None)


#: The page; each parameter's range, default and placeholder come from its definition.
PAGE = re.sub(r"@@(\w+)\.([\w/]+)\.(value|range)(?::([\d.]+))?@@", _field_markup, _TEMPLATE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trellisbox web", description="The TRELLIS-BOX web form.")
    parser.add_argument("--target", default="127.0.0.1:50051", help="gateway address (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (default %(default)s)")
    parser.add_argument("--results", type=Path, default=None, help="folder for results (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s web %(levelname)s %(message)s")
    results = args.results or Path(tempfile.mkdtemp(prefix="trellisbox-web-"))
    server = WebUI(args.target, results).server(args.host, args.port)
    _log.info("web form on http://%s:%d (gateway %s, results in %s)", args.host, server.server_port, args.target,
              results)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if args.results is None:
            shutil.rmtree(results, ignore_errors=True)
    return 0
