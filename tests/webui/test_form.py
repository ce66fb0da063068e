"""The web app's logic without a browser: requests from the controls, errors in a user's words, progress rows,
results pruning."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from tests.images import png_bytes
from trellisbox.cli import _explain as cli_explain
from webui.form import ProgressPanel, check_images, controls, explain_error, prune_results, request_options


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_the_request_takes_every_control_value_and_leaves_empty_ones_to_the_server() -> None:
    values = {c.key: c.default for c in controls()}
    values["generation.seed"] = ""
    values["refine.seed"] = "7"
    values["generation.slat.steps"] = 5.0  # a slider hands back floats
    options = request_options(values, refine=True)
    assert options["refine"] is True and options["refine_params"]["seed"] == 7
    assert options["refine_params"]["strength"] == 0.3
    assert "seed" not in options["generation"]
    assert options["generation"]["slat"] == {"steps": 5, "cfg_strength": 3.0}
    assert request_options(values, refine=False)["refine_params"] == {}
    with pytest.raises(ValueError, match=r"generation\.seed"):
        request_options({**values, "generation.seed": "abc"}, refine=False)


def test_errors_name_the_file_and_the_field_and_say_what_to_do() -> None:
    names = ["chair.png", "chair-back.png"]
    message = explain_error(_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "images[1] is not a PNG, JPEG or WebP image"),
                            names, "127.0.0.1:50051")
    assert message == "chair-back.png is not a PNG, JPEG or WebP image"
    # Found by the stage that decodes (a JPEG cut short): the same form, without the stage's name.
    cut_short = "trellis: images[0] is truncated or corrupt (image file is truncated)"
    message = explain_error(_RpcError(grpc.StatusCode.INVALID_ARGUMENT, cut_short), names, "")
    assert message == "chair.png is truncated or corrupt (image file is truncated)"
    assert cli_explain(_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "refiner: images[1] is truncated or corrupt"),
                       names, "") == "INVALID_ARGUMENT: chair-back.png is truncated or corrupt"
    message = explain_error(_RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                                      "refine_parameters.strength must be in (0.0, 1.0], got 7.0"), names, "")
    assert message.startswith('"Strength" (refinement) must be in (0.0, 1.0]')
    message = explain_error(_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "generation.slat.steps must be in [1, 100]"),
                            names, "")
    assert '"Slat · steps" (3D generation)' in message
    unreachable = explain_error(_RpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; ..."),
                                names, "127.0.0.1:50051")
    assert "127.0.0.1:50051" in unreachable and "make run" in unreachable and "failed to connect" not in unreachable
    refiner_down = explain_error(_RpcError(grpc.StatusCode.UNAVAILABLE, "refiner: no healthy replica"), names, "")
    assert "untick Image Refinement" in refiner_down
    refused = explain_error(_RpcError(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid here"), names, "")
    assert "must start it with a valid token (--token-file" in refused and "not valid here" in refused


def test_uploads_that_are_not_images_are_named(tmp_path: Path) -> None:
    good = tmp_path / "chair.png"
    good.write_bytes(png_bytes(32))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert check_images([good]) is None
    assert check_images([good, notes]) == "notes.txt is not an image: upload a PNG, JPEG or WebP file."


def test_stage_rows_follow_each_other_and_add_up() -> None:
    panel = ProgressPanel("sending 1 image")
    assert "sending 1 image" in panel.html()
    panel.update("REFINE", 1, 6, "denoising")
    panel.update("REFINE", 6, 6, "denoising")
    panel.update("SLAT", 3, 12, "")
    panel.finish("done")
    first, second = panel.rows
    assert first.began == panel.started and first.ended == second.began and second.ended is not None
    assert "6/6" in panel.html() and "12/12" in panel.html() and "<script" not in panel.html()


def test_old_and_surplus_results_are_removed(tmp_path: Path) -> None:
    for index in range(5):
        folder = tmp_path / f"r{index}"
        folder.mkdir()
        (folder / "model.glb").write_bytes(b"x")
        os.utime(folder, (time.time() - 10 * (5 - index), time.time() - 10 * (5 - index)))
    old = tmp_path / "old"
    old.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    prune_results(tmp_path, max_age_s=3600, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r2", "r3", "r4"]


def test_views_named_alike_keep_each_refined_image(tmp_path: Path) -> None:
    """Two uploads called example.png (from two folders): each view's refined image is its own file."""
    from trellisbox._domain.artifacts import Artifact
    from trellisbox._domain.kinds import ArtifactKind
    from trellisbox.client import GenerationResult
    from webui.app import WebApp

    result = GenerationResult(artifacts=[Artifact(ArtifactKind.GLB, b"glTF"), *(
        Artifact(ArtifactKind.REFINED_IMAGE, png_bytes(8 + i), i) for i in range(3))])
    _, shown = WebApp("127.0.0.1:1", tmp_path)._show(result, ProgressPanel("x"),
                                                      ["a/example.png", "side.png", "b/example.png"])
    refined = [Path(path) for path, _ in shown["refined"]]
    assert [path.name for path in refined] == ["example-1.refined.png", "side.refined.png", "example-3.refined.png"]
    assert [path.read_bytes() for path in refined] == [png_bytes(8 + i) for i in range(3)]
