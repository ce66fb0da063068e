"""The web form (the original TRELLIS-BOX UI) in front of a real stack."""

from __future__ import annotations

import base64
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.conftest import validate_glb
from tests.images import png_bytes
from tools.stack import LocalStack
from webui.app import WebUI

pytestmark = pytest.mark.integration


@pytest.fixture
def web(stack: LocalStack, tmp_path: Path) -> Iterator[int]:
    server = WebUI(stack.gateway_target, tmp_path / "results").server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


def test_the_form_has_the_refinement_checkbox_and_strength(web: int) -> None:
    status, content_type, page = _request(web, "GET", "/")
    assert status == 200 and content_type.startswith("text/html")
    text = page.decode()
    assert "Generation Settings" in text and "Image Refinement (SD-XL)" in text
    assert 'id="strength"' in text and "Generate 3D Model" in text


def test_posting_the_form_streams_progress_then_links_that_download(web: int, tmp_path: Path) -> None:
    form = {"images": [base64.b64encode(png_bytes(96)).decode()], "refine": True,
            "refine_params": {"strength": "0.4", "prompt": "a red ball", "negative_prompt": ""},
            "generation": {"seed": "11", "texture_size": "512", "mesh_simplify": "0.9"}}
    status, content_type, body = _request(web, "POST", "/api/generate", json.dumps(form).encode())
    assert status == 200 and content_type == "application/x-ndjson"
    events = [json.loads(line) for line in body.decode().splitlines()]
    stages = {e["progress"]["stage"] for e in events if "progress" in e}
    assert {"REFINE", "EXPORT"} <= stages
    done = events[-1]["done"]
    assert done["generation_seed"] == 11 and done["refiner_backend"] == "sdxl"

    status, content_type, glb = _request(web, "GET", done["files"]["glb"])
    assert status == 200 and content_type == "model/gltf-binary"
    (tmp_path / "model.glb").write_bytes(glb)
    validate_glb(tmp_path / "model.glb")
    status, _, png = _request(web, "GET", done["files"]["refined"][0])
    (tmp_path / "refined.png").write_bytes(png)
    assert status == 200 and Image.open(tmp_path / "refined.png").size == (96, 96)


@pytest.mark.parametrize(
    "form,message",
    [
        ({"images": [base64.b64encode(b"not an image").decode()]}, "images[0] is not a PNG, JPEG or WebP image"),
        ({"images": [base64.b64encode(png_bytes(64)).decode()], "refine": True,
          "refine_params": {"strength": "7"}}, "strength must be in (0.0, 1.0], got 7"),
    ],
)
def test_bad_input_comes_back_as_an_error_event(web: int, form: dict[str, object], message: str) -> None:
    status, _, body = _request(web, "POST", "/api/generate", json.dumps(form).encode())
    event = json.loads(body.decode().splitlines()[-1])
    assert status == 200 and event["error"]["code"] == "INVALID_ARGUMENT"
    assert message in event["error"]["message"]


def test_malformed_posts_and_paths_are_refused(web: int) -> None:
    status, _, body = _request(web, "POST", "/api/generate", b"{not json")
    assert status == 400 and "not JSON" in json.loads(body)["error"]["message"]
    status, _, body = _request(web, "POST", "/api/generate", json.dumps({"images": ["%%%"]}).encode())
    assert status == 400 and "base64" in json.loads(body)["error"]["message"]
    assert _request(web, "GET", "/results/../../etc/passwd")[0] == 404
    assert _request(web, "GET", "/results/" + "0" * 32 + "/model.glb")[0] == 404
