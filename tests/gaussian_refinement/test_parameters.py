"""The refinement's request block: yes/no parameters through every front end, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest

from trellis_service.exporters import SplatArrays
from trellis_service.gaussian_refinement import refine_splats
from trellisbox._domain.convert import params_from_proto, params_message
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.params import GaussianRefinementParams, GenerationParams, build, from_text
from trellisbox._runtime.worker import JobContext
from trellisbox.v1 import common_pb2
from webui.form import request_options


def test_switches_travel_from_the_client_mapping_to_the_domain() -> None:
    message = params_message(GenerationParams, common_pb2.GenerationParameters(),
                             {"gaussian_refinement": {"enabled": True, "opacities": False, "steps": 40}}, "generation")
    params = params_from_proto(GenerationParams, message, "generation").gaussian_refinement
    assert params.enabled and params.steps == 40
    assert params.attributes == {"colours"}, "opacities switched off, positions and scales off by default"
    assert params_from_proto(GenerationParams, common_pb2.GenerationParameters(), "g").gaussian_refinement == \
        GaussianRefinementParams()


def test_yes_no_values_typed_as_text() -> None:
    typed = from_text(GaussianRefinementParams, {"enabled": "on", "positions": "False", "scales": True}, "gs")
    assert typed == {"enabled": True, "positions": False, "scales": True}
    with pytest.raises(ValueError, match=r"gs\.enabled must be true or false, got 'maybe'"):
        from_text(GaussianRefinementParams, {"enabled": "maybe"}, "gs")


def test_the_web_form_sends_its_checkboxes() -> None:
    options = request_options({"generation.gaussian_refinement.enabled": True,
                               "generation.gaussian_refinement.steps": 25.0,
                               "generation.gaussian_refinement.colours": False}, refine=False)
    assert options["generation"] == {"gaussian_refinement": {"enabled": True, "steps": 25, "colours": False}}


def test_novel_views_are_refused_with_a_reason() -> None:
    with pytest.raises(InvalidInput, match=r"^generation\.gaussian_refinement\.novel_views: novel-view refinement "
                                           r"through the refiner tier is not implemented yet"):
        build(GenerationParams, {"gaussian_refinement": {"novel_views": True}}, "generation")


def test_a_fit_that_may_move_nothing_is_refused() -> None:
    params = GaussianRefinementParams(enabled=True, colours=False, opacities=False)
    empty = SplatArrays(*(np.zeros((0, n), dtype=np.float32) for n in (3, 3, 3, 1, 3, 4)))
    with pytest.raises(InvalidInput, match="no attribute may move"):
        refine_splats(empty, [], params, JobContext("t", None, lambda _: None))
