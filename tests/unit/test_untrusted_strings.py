"""Strings from callers are bounded and never echoed unbounded: into logs, metrics or error messages."""

from __future__ import annotations

import pytest

from tests.images import png_bytes
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.imaging import decode_image
from trellisbox._domain.params import MAX_PROMPT_CHARS, RefineParams, build
from trellisbox._runtime.observability import REQUEST_ID
from trellisbox._runtime.servicing import MAX_REQUEST_ID_CHARS, bind_request_id


def test_a_huge_media_type_is_refused_without_being_echoed() -> None:
    with pytest.raises(InvalidInput) as info:
        decode_image(png_bytes(32), "x" * 20_000, label="images[0]")
    message = str(info.value)
    assert message.startswith("images[0] has media type 'xxxx") and len(message) < 200


@pytest.mark.parametrize("request_id", [
    "a" * (MAX_REQUEST_ID_CHARS + 1), "forged\nline", "trailing-newline\n", "tab\there", "sp ace", "ünïcode",
    "x" * 2**20,
])
def test_request_ids_that_could_forge_or_flood_logs_are_refused(request_id: str) -> None:
    with pytest.raises(InvalidInput, match="request_id must be 1 to 128 characters") as info:
        bind_request_id(request_id)
    assert request_id not in str(info.value) and len(str(info.value)) < 200


def test_request_ids_are_kept_or_made() -> None:
    assert bind_request_id("job-42.retry:1_a") == "job-42.retry:1_a" == REQUEST_ID.get()
    made = bind_request_id("")
    assert len(made) == 16 and made == REQUEST_ID.get()


def test_prompts_are_bounded() -> None:
    with pytest.raises(InvalidInput, match=f"refine_parameters.prompt is {MAX_PROMPT_CHARS + 1} characters"):
        build(RefineParams, {"prompt": "p" * (MAX_PROMPT_CHARS + 1)}, "refine_parameters")
