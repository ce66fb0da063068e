"""The web app (Gradio) in a real browser: Playwright driving Debian's Chromium against a live local stack.

Screenshots go to ``out/screenshots/`` (or ``$TRELLISBOX_SCREENSHOTS``) for a person to look at. The tests skip,
saying why, only when the browser cannot start on this machine; any request to a non-local address fails them.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image, ImageStat
from playwright.sync_api import Browser, Error, Page, sync_playwright

from tests.e2e.conftest import ROOT, validate_glb
from tools.stack import LocalStack, free_port
from webui.app import EXAMPLE_IMAGE, WebApp

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHOTS = Path(os.environ.get("TRELLISBOX_SCREENSHOTS") or ROOT / "out" / "screenshots")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
GENERATION_TIMEOUT_MS = 180_000
#: WebGL through SwiftShader (software): a headless machine without a GPU still draws the model.
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


@pytest.fixture(scope="module")
def web_url(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    page, url = WebApp(stack.gateway_target, tmp_path_factory.mktemp("web-results")).launch(
        "127.0.0.1", free_port(), block=False)
    try:
        yield url
    finally:
        page.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (make test installs it: apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Error as exc:
            pytest.skip(f"chromium ({executable}) cannot start on this machine: {str(exc).splitlines()[0]}")
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page; the test fails if it asked anything of a non-local address."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    opened = context.new_page()
    remote: list[str] = []

    def record(url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in LOCAL_HOSTS:
            remote.append(url)

    opened.on("request", lambda request: record(request.url))
    opened.on("websocket", lambda socket: record(socket.url))
    opened.on("console", lambda message: print(f"console {message.type}: {message.text[:500]}"))
    try:
        yield opened
    finally:
        context.close()
    assert not remote, f"the page asked non-local addresses: {remote}"


def _shot(page: Page, name: str, *, full_page: bool = True) -> None:
    """A screenshot for a person: the whole page, or what the viewport shows (a full-page capture resizes the
    viewport, and the 3D viewer may not have drawn again at the new size)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=full_page)


def _upload(page: Page, *paths: Path) -> None:
    page.locator("#images input[type=file]").set_input_files([str(p) for p in paths])


def _generate_and_wait(page: Page) -> None:
    page.locator("#generate").click()
    page.locator("#progress .tb-status").wait_for(timeout=5_000)  # feedback from the first second
    page.wait_for_function(
        "() => { const s = document.querySelector('#progress .tb-status');"
        " return s && /^(done|failed)/.test(s.textContent); }", timeout=GENERATION_TIMEOUT_MS)


def _drawn(page: Page, selector: str, shot: str | None = None) -> bool:
    """The viewer's canvas shows something: more than a flat background (what it showed is saved as ``shot``)."""
    canvas = page.locator(f"{selector} canvas").first
    if canvas.count() == 0 or not canvas.is_visible():
        return False
    image = Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")
    # The label and the buttons are drawn over the canvas's top corners: judge the middle, against the
    # background colour of a bottom corner.
    width, height = image.size
    middle = image.crop((width // 5, height // 5, width * 4 // 5, height * 4 // 5))
    background = np.asarray(image, dtype=np.int32)[height - 3, 2]
    differing = np.abs(np.asarray(middle, dtype=np.int32) - background).sum(axis=-1) > 40
    drawn = bool(differing.mean() > 0.05) and max(ImageStat.Stat(middle).stddev) > 4
    if drawn and shot:
        SHOTS.mkdir(parents=True, exist_ok=True)
        image.save(SHOTS / f"{shot}.png")
    return drawn


def _wait_drawn(page: Page, selector: str, shot: str, seconds: float = 30) -> bool:
    """Scroll the viewer on screen (it draws only there) and wait until its canvas shows the model."""
    page.locator(selector).scroll_into_view_if_needed()
    page.wait_for_function(f"() => document.querySelector('{selector} canvas') !== null", timeout=seconds * 1000)
    for _ in range(int(seconds * 2)):
        if _drawn(page, selector, shot):
            return True
        page.wait_for_timeout(500)
    return False


def test_upload_refine_generate_view_and_download(page: Page, web_url: str, tmp_path: Path) -> None:
    page.goto(web_url)
    _upload(page, EXAMPLE_IMAGE)
    page.locator("#input-previews img").first.wait_for(timeout=15_000)  # the preview of the upload
    page.get_by_text("Generation Settings").click()
    page.get_by_label("Image Refinement (SD-XL)").check()
    strength = page.locator("#refine-strength input[type=number]")
    strength.fill("0.45")
    strength.press("Enter")
    _generate_and_wait(page)
    status = page.locator("#progress .tb-status").text_content() or ""
    assert status.startswith("done"), status
    assert "refine" in (page.locator("#progress").text_content() or "")
    page.locator("#refined img").first.wait_for(timeout=15_000)  # the refined image beside the input
    assert _wait_drawn(page, "#glb-viewer", "webui-glb-canvas"), "the 3D viewer drew nothing"
    _shot(page, "webui-viewer", full_page=False)
    _shot(page, "webui-generated")

    with page.expect_download() as download:
        page.locator("#downloads a[download$='.glb']").click()
    glb = tmp_path / download.value.suggested_filename
    download.value.save_as(glb)
    assert glb.suffix == ".glb"
    validate_glb(glb)
    assert page.locator("#downloads a[download$='.ply']").count() == 1
    assert page.locator("#downloads a[download$='.refined.png']").count() == 1


def test_a_non_image_upload_says_so_by_name(page: Page, web_url: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    page.goto(web_url)
    _upload(page, notes)
    error = page.locator("#upload-error .tb-error")
    error.wait_for(timeout=15_000)
    assert "notes.txt is not an image" in (error.text_content() or "")
    page.locator("#generate").click()
    page.locator("#progress .tb-error").wait_for(timeout=15_000)
    assert "notes.txt is not an image" in (page.locator("#progress").text_content() or "")
    _shot(page, "webui-not-an-image")


def test_a_narrow_viewport_does_not_scroll_sideways(page: Page, web_url: str) -> None:
    page.set_viewport_size({"width": 375, "height": 800})
    page.goto(web_url)
    page.get_by_text("example.png", exact=True).click()  # the bundled example, one click
    page.locator("#input-previews img").first.wait_for(timeout=15_000)
    _generate_and_wait(page)
    assert _wait_drawn(page, "#glb-viewer", "webui-375px-glb-canvas"), "the 3D viewer drew nothing"
    overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    _shot(page, "webui-375px")
    assert overflow <= 0, f"the page is {overflow} px wider than the 375 px viewport"
