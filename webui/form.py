"""What the web app shows and sends, without Gradio: one control per request parameter (derived from its
definition in :mod:`trellisbox._domain.params`), the request built from the controls' values, errors in a
user's words, the per-stage progress panel and the results folder's pruning."""

from __future__ import annotations

import html
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc
from PIL import Image, UnidentifiedImageError

from trellisbox._domain.params import (
    GenerationParams,
    ParamModel,
    RefineParams,
    bounds,
    default_at,
    default_text,
    describe,
    from_text,
    full_doc,
    scalar_type,
    walk,
)
from trellisbox.cli import name_images
from trellisbox.client import without_stage

#: The two parameter groups, as the client takes them: ``refine_params`` and ``generation``.
GROUPS: dict[str, type[ParamModel]] = {"refine": RefineParams, "generation": GenerationParams}
#: How the services name each group's fields in their messages.
_MESSAGE_PREFIXES = {"refine": ("refine_parameters", "refine_params", "refine"), "generation": ("generation",)}


@dataclass(frozen=True)
class Control:
    """One request parameter as a form control: every value here comes from the parameter's definition.

    ``kind`` is ``"slider"`` (bounded number), ``"number"`` (a seed: empty means random), ``"text"``,
    ``"choice"`` or ``"checkbox"``.
    """

    group: str
    path: tuple[str, ...]
    kind: str
    label: str
    info: str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    max_length: int | None = None
    choices: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """``refine.strength``, ``generation.slat.steps``: the control's name in the page (elem_id uses dashes)."""
        return ".".join((self.group, *self.path))

    @property
    def elem_id(self) -> str:
        return self.key.replace(".", "-").replace("_", "-")


def _label(path: tuple[str, ...]) -> str:
    text = " · ".join(part.replace("_", " ") for part in path)
    return text[:1].upper() + text[1:]


def _slider_step(kind: type, low: float, high: float) -> float:
    """Integers step by 1; floats by the power of ten that gives at least 50 positions over the range."""
    if kind is int:
        return 1
    return float(10 ** math.floor(math.log10((high - low) / 50)))


def control_for(group: str, cls: type[ParamModel], path: tuple[str, ...]) -> Control:
    owner: Any = cls
    for part in path[:-1]:
        owner = scalar_or_model(owner, part)
    info = owner.model_fields[path[-1]]
    kind = scalar_type(info)
    default = default_at(cls, path)
    shown = default_text(default).strip("'")
    text = f"{full_doc(cls, path)} {describe(info)[:1].upper()}{describe(info)[1:]}; default {shown}."
    common: dict[str, Any] = {"group": group, "path": path, "label": _label(path), "info": text}
    if kind is bool:
        return Control(kind="checkbox", default=default, **common)
    if issubclass(kind, StrEnum):
        return Control(kind="choice", default=default.value, choices=tuple(m.value for m in kind), **common)
    if kind is str:
        limits = [getattr(item, "max_length", None) for item in info.metadata]
        return Control(kind="text", default=default, max_length=next((n for n in limits if n), None), **common)
    low, low_open, high = bounds(info)
    if default is None or low is None or high is None:
        return Control(kind="number", default=default, minimum=low, maximum=high, step=1, **common)
    step = _slider_step(kind, low, high)
    return Control(kind="slider", default=default, minimum=low + step if low_open else low, maximum=high,
                   step=step, **common)


def scalar_or_model(owner: type[ParamModel], name: str) -> type[ParamModel]:
    annotation = owner.model_fields[name].annotation
    assert isinstance(annotation, type) and issubclass(annotation, ParamModel)  # nosec B101  # for mypy
    return annotation


def controls() -> list[Control]:
    """Every request parameter's control, refinement first, in definition order."""
    return [control_for(group, cls, path) for group, cls in GROUPS.items() for path, _ in walk(cls)]


# -- request ------------------------------------------------------------------------------------------------


def request_options(values: Mapping[str, Any], refine: bool) -> dict[str, Any]:
    """``refine``, ``refine_params`` and ``generation`` for :meth:`TrellisBoxClient.generate` from the controls'
    values by key (``generation.slat.steps``); empty values are left to the server's default.

    Raises:
        ValueError: a value of the wrong type, naming the control.
    """
    nested: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for key, value in values.items():
        group, *path = key.split(".")
        if isinstance(value, float) and value.is_integer() and _is_int(group, tuple(path)):
            value = int(value)
        target = nested[group]
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = "" if value is None else value
    typed = {group: from_text(GROUPS[group], nested[group], group) for group in GROUPS}
    return {"refine": refine, "refine_params": typed["refine"] if refine else {}, "generation": typed["generation"]}


def _is_int(group: str, path: tuple[str, ...]) -> bool:
    owner: type[ParamModel] = GROUPS[group]
    for part in path[:-1]:
        owner = scalar_or_model(owner, part)
    return scalar_type(owner.model_fields[path[-1]]) is int


# -- errors in a user's words ---------------------------------------------------------------------------------


def check_images(paths: Sequence[Path]) -> str | None:
    """A readable message for the first upload that is not an image this service takes, or None."""
    for path in paths:
        try:
            with Image.open(path) as image:
                fmt = image.format
        except (UnidentifiedImageError, OSError):
            return f"{path.name} is not an image: upload a PNG, JPEG or WebP file."
        if fmt not in ("PNG", "JPEG", "WEBP"):
            return f"{path.name} is {fmt}: upload a PNG, JPEG or WebP file."
    return None


def name_fields(message: str) -> str:
    """``refine_parameters.strength must be ...`` → ``"Strength" (refinement) must be ...``."""
    for control in sorted(controls(), key=lambda c: -len(c.path)):
        where = "refinement" if control.group == "refine" else "3D generation"
        for prefix in _MESSAGE_PREFIXES[control.group]:
            message = message.replace(".".join((prefix, *control.path)), f'"{control.label}" ({where})')
    return message


def explain_error(exc: BaseException, names: Sequence[str], target: str) -> str:
    """What went wrong, for a person: the image by its file name, the field by its label, and what to do."""
    if not isinstance(exc, grpc.RpcError):
        return name_fields(name_images(str(exc), names))
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details = name_fields(name_images(exc.details() or "", names))  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE:
        if details.startswith("refiner:"):
            return ("The image refinement service is not available right now; try again shortly, or untick "
                    f"Image Refinement (SD-XL). ({details})")
        if details.startswith("trellis:"):
            return f"The 3D generation service is not available right now; try again shortly. ({details})"
        return (f"The server (gateway at {target}) cannot be reached. Start the stack with `make run`, or start "
                "this app with --target pointing at a running gateway (with --ca-file or --tls if it serves TLS).")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ("The server refused this web app's credentials: whoever runs the app must start it with a valid "
                f"token (--token-file or TRELLISBOX_TOKEN). ({details})")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return without_stage(details)  # it starts with the file's name or the field's label
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "The server is busy (its queue is full). Try again in a minute."
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "The generation took too long and was stopped. Try fewer steps or a smaller texture size."
    if code == grpc.StatusCode.CANCELLED:
        return "The generation was cancelled."
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return f"The server cannot run its model: {details}"
    return f"The generation failed ({code.name}): {details}"


# -- progress ---------------------------------------------------------------------------------------------


@dataclass
class StageRow:
    stage: str
    step: int = 0
    total: int = 0
    message: str = ""
    began: float = 0.0
    ended: float | None = None


class ProgressPanel:
    """Per-stage rows; each stage begins when the previous one ended, so the rows add up to the total."""

    def __init__(self, status: str) -> None:
        self.started = time.monotonic()
        self.status = status
        self.rows: list[StageRow] = []

    def update(self, stage: str, step: int, total: int, message: str) -> None:
        now = time.monotonic()
        if not self.rows or self.rows[-1].stage != stage:
            began = self.started
            if self.rows:
                self.rows[-1].ended = began = now
            self.rows.append(StageRow(stage, began=began))
        row = self.rows[-1]
        row.step, row.total, row.message = step, total, message
        self.status = f"{stage.lower().replace('_', ' ')}: {message}" if message else stage.lower()

    def finish(self, status: str) -> None:
        if self.rows and self.rows[-1].ended is None:
            self.rows[-1].ended = time.monotonic()
        self.status = status

    def html(self) -> str:
        now = time.monotonic()
        lines = [f'<div class="tb-status">{html.escape(self.status)} · {now - self.started:.0f} s</div>']
        for row in self.rows:
            seconds = (row.ended or now) - row.began
            value = row.step if row.total else (1 if row.ended else 0)
            done = row.ended is not None
            maximum = row.total or 1
            count = f"{row.total if done else row.step}/{row.total}" if row.total else ""
            lines.append(
                f'<div class="tb-stage"><span>{html.escape(row.stage.lower().replace("_", " "))}</span>'
                f'<progress max="{maximum}" value="{maximum if done else value}"></progress>'
                f"<span>{count} {seconds:.1f} s</span></div>")
        return '<div class="tb-progress">' + "".join(lines) + "</div>"


# -- results ------------------------------------------------------------------------------------------------


def prune_results(results_dir: Path, max_age_s: float, keep: int) -> None:
    """Remove result folders older than ``max_age_s`` and all but the newest ``keep``."""
    if not results_dir.is_dir():
        return
    folders = sorted((p for p in results_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    cutoff = time.time() - max_age_s
    for index, folder in enumerate(folders):
        if index >= keep or folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
