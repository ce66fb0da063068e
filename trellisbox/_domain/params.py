"""Request parameters: each one is defined once, here.

A parameter's definition is its field in :class:`RefineParams`, :class:`SamplerParams` or
:class:`GenerationParams`: name (the same as its proto field), type, range, default and doc. Everything
else is derived from these models or checked against them by a test that fails on drift:

- proto → domain (unset proto3 ``optional`` fields take the default) and back: :mod:`trellisbox._domain.convert`;
- the Python client's keyword mappings, the CLI's flags (``cli`` names the flag where it differs from the
  field) and the web form's fields and input ranges;
- ``docs/parameters.md`` (``tools/paramdoc.py``);
- checked by tests: the proto fields and their comments, ``ImageRefiner``'s keyword arguments, the SDXL
  backend's pipeline call.

Validation (types, ranges, NaN and infinity, string lengths) happens when a model is built; a failure is an
:class:`~trellisbox._domain.errors.InvalidInput` whose message names the field as the caller spelled it
(``refine_parameters.strength must be in (0.0, 1.0], got 7.0``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Any, TypeVar, get_args

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from trellisbox._domain.errors import InvalidInput

#: torch.Generator.manual_seed and numpy accept 32-bit seeds everywhere.
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
DEFAULT_PROMPT = "high quality, detailed, sharp"
DEFAULT_NEGATIVE_PROMPT = "blurry, low quality, distorted"


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def param(default: Any = ..., doc: str = "", *, cli: str | None = None, **constraints: Any) -> Any:
    """One parameter's definition: a pydantic field with its doc and, where it differs from the field name,
    its CLI flag stem (``cli="guidance"`` gives ``--guidance``)."""
    extra: dict[str, Any] | None = {"cli": cli} if cli else None
    return Field(default, description=doc, json_schema_extra=extra, **constraints)


class ParamModel(BaseModel):
    """Frozen, validated, no unknown fields, no NaN or infinity."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class RefineParams(ParamModel):
    """SDXL-refiner img2img parameters, with the defaults of the original TRELLIS-BOX feature."""

    strength: float = param(0.3, "How far the image may move; lower stays closer to the input.", gt=0.0, le=1.0)
    guidance_scale: float = param(7.5, "Classifier-free guidance.", cli="guidance", ge=0.0, le=30.0)
    num_inference_steps: int = param(
        20, "Scheduler steps; the UNet runs int(num_inference_steps × strength) of them.", cli="steps", ge=1, le=200)
    prompt: str = param(DEFAULT_PROMPT, "What the refined image should look like.", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = param(DEFAULT_NEGATIVE_PROMPT, "What it should not look like.",
                                 max_length=MAX_PROMPT_CHARS)
    seed: int | None = param(None, "Noise seed of the first image (image i uses seed + i); the seeds used are "
                             "echoed back.", cli="refine-seed", ge=0, le=MAX_SEED)
    aesthetic_score: float = param(6.0, "SDXL-refiner aesthetic conditioning of the positive branch.",
                                   ge=0.0, le=10.0)
    negative_aesthetic_score: float = param(2.5, "Aesthetic conditioning of the negative branch.", ge=0.0, le=10.0)


class MultiImageMode(StrEnum):
    """How several views of one object are combined (TRELLIS ``run_multi_image(mode=...)``)."""

    STOCHASTIC = "stochastic"
    MULTIDIFFUSION = "multidiffusion"


class SamplerParams(ParamModel):
    """One TRELLIS sampler stage; the defaults are the stage's (see :class:`GenerationParams`)."""

    steps: int = param(doc="Sampling steps.", ge=1, le=100)
    cfg_strength: float = param(doc="Classifier-free guidance strength.", cli="cfg", ge=0.0, le=30.0)


class GaussianRefinementParams(ParamModel):
    """Post-generation 3D Gaussian refinement (docs/gaussian-refinement.md): the generated Gaussians are fitted
    to the input image(s), each from its recovered camera, while other views are kept close to the unrefined
    renders."""

    enabled: bool = param(False, "Fit the generated Gaussians to the input image(s) after generation.")
    steps: int = param(150, "Optimiser step budget; the fit stops earlier once the loss stops improving.",
                       ge=1, le=2000)
    colours: bool = param(True, "The fit may change the Gaussians' colours.")
    opacities: bool = param(True, "The fit may change the Gaussians' opacities.")
    positions: bool = param(False, "The fit may move the Gaussians.")
    scales: bool = param(False, "The fit may change the Gaussians' sizes.")
    regularisation: float = param(0.3, "Weight of the term that keeps renders from other views close to the "
                                  "unrefined ones.", ge=0.0, le=100.0)
    resolution: int = param(128, "Edge in pixels of the square renders compared with the input views.",
                            ge=32, le=1024)
    novel_views: bool = param(False, "Also fit to views around the object refined by the SDXL refiner, with "
                              "lower weight.")
    novel_view_strength: float = param(0.2, "Strength of the SDXL refiner on the novel views.", gt=0.0, le=1.0)

    @property
    def attributes(self) -> frozenset[str]:
        """The attributes the fit may change, by name (colours, opacities, positions, scales)."""
        return frozenset(name for name in ("colours", "opacities", "positions", "scales") if getattr(self, name))


class GenerationParams(ParamModel):
    """Image-to-3D parameters, with the defaults of the official TRELLIS demo."""

    seed: int | None = param(None, "Generation seed; the seed used is echoed back.", ge=0, le=MAX_SEED)
    sparse_structure: SamplerParams = param(
        SamplerParams(steps=12, cfg_strength=7.5), "Stage 1: sparse structure sampler.", cli="ss")
    slat: SamplerParams = param(SamplerParams(steps=12, cfg_strength=3.0), "Stage 2: structured latent sampler.")
    multi_image_mode: MultiImageMode = param(MultiImageMode.STOCHASTIC,
                                             "How several views of one object are combined.")
    mesh_simplify: float = param(0.95, "Fraction of mesh faces removed before the texture bake.", cli="simplify",
                                 ge=0.0, le=0.99)
    texture_size: int = param(1024, "Baked texture edge in pixels.", ge=256, le=4096)
    gaussian_refinement: GaussianRefinementParams = param(
        GaussianRefinementParams(), "Post-generation 3D Gaussian refinement.", cli="gs")


P = TypeVar("P", bound=ParamModel)


# -- building from untrusted values ----------------------------------------------------------------------


def build(cls: type[P], values: Mapping[str, Any], where: str = "") -> P:
    """``cls`` from ``values``, validated; ``InvalidInput`` names the first bad field as ``where.path``."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise InvalidInput(_explain(cls, exc.errors(include_url=False)[0], where)) from None


def _explain(cls: type[ParamModel], error: Mapping[str, Any], where: str) -> str:
    loc = [str(part) for part in error["loc"]]
    name = ".".join([where, *loc] if where else loc)
    value = error.get("input")
    info = field_at(cls, loc)
    if error["type"] == "extra_forbidden" or info is None:
        owner = field_owner(cls, loc[:-1])
        known = ", ".join(owner.model_fields) if owner is not None else ""
        return f"{name} is not a parameter" + (f"; known: {known}" if known else "")
    if error["type"] == "value_error":  # a validator's own message
        return f"{name}: {error['ctx']['error']}"
    if error["type"] == "string_too_long":
        return f"{name} is {len(str(value))} characters; the limit is {error['ctx']['max_length']}"
    if isinstance(value, str) and len(value) > 40:
        value = value[:40] + "..."
    return f"{name} must be {describe(info)}, got {value!r}"


def from_text(cls: type[ParamModel], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Values typed as text (a web form, a query string) as the parameters' types; empty ones are left out, so
    the server's default applies. Ranges are the server's to check.

    Raises:
        ValueError: an unknown name, or a value that is not of the parameter's type (both named).
    """
    typed: dict[str, Any] = {}
    for name, raw in values.items():
        info = field_named(cls, name, where)
        nested = model_type(info)
        if nested is not None:
            if not isinstance(raw, Mapping):
                raise ValueError(f"{where}.{name} must be an object of {', '.join(nested.model_fields)}")
            typed[name] = from_text(nested, raw, f"{where}.{name}")
            continue
        if raw is None or raw == "":
            continue
        kind = scalar_type(info)
        try:
            typed[name] = boolean(raw) if kind is bool else kind(raw) if kind is not int else int(str(raw), 10)
        except (TypeError, ValueError):
            raise ValueError(f"{where}.{name} must be {describe(info)}, got {raw!r}") from None
    return typed


def boolean(raw: Any) -> bool:
    """A yes/no typed as text: true/false, yes/no, on/off, 1/0 (any case); ``ValueError`` otherwise."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"not a yes/no value: {raw!r}")


def field_named(cls: type[ParamModel], name: str, where: str) -> FieldInfo:
    """The field ``name`` of ``cls``; ``ValueError`` naming the known ones for a name that is not a parameter."""
    info = cls.model_fields.get(name)
    if info is None:
        raise ValueError(f"{where}.{name} is not a parameter; known: {', '.join(cls.model_fields)}")
    return info


def field_at(cls: type[ParamModel], path: list[str]) -> FieldInfo | None:
    """The field at a dotted path (``["slat", "steps"]``) of ``cls``, or None."""
    owner = field_owner(cls, path[:-1])
    return owner.model_fields.get(path[-1]) if owner is not None and path else None


def field_owner(cls: type[ParamModel], path: list[str]) -> type[ParamModel] | None:
    owner: type[ParamModel] = cls
    for part in path:
        info = owner.model_fields.get(part)
        nested = model_type(info) if info is not None else None
        if nested is None:
            return None
        owner = nested
    return owner


def model_type(info: FieldInfo) -> type[ParamModel] | None:
    """The nested parameter model of a field (``SamplerParams``), or None for a scalar."""
    annotation = info.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, ParamModel) else None


def scalar_type(info: FieldInfo) -> type:
    """``int``, ``float``, ``str`` or the enum class of a scalar field (``int | None`` → ``int``)."""
    annotation = info.annotation
    options = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    kind = options[0]
    if not isinstance(kind, type):
        raise TypeError(f"unsupported parameter type {annotation!r}")
    return kind


def bounds(info: FieldInfo) -> tuple[float | None, bool, float | None]:
    """(low, low is exclusive, high) of a numeric field; None where unbounded."""
    low: float | None = None
    low_open = False
    high: float | None = None
    for item in info.metadata:
        if isinstance(item, annotated_types.Gt):
            low, low_open = item.gt, True  # type: ignore[assignment]
        elif isinstance(item, annotated_types.Ge):
            low = item.ge  # type: ignore[assignment]
        elif isinstance(item, annotated_types.Le):
            high = item.le  # type: ignore[assignment]
    return low, low_open, high


def describe(info: FieldInfo) -> str:
    """What a valid value looks like: ``in (0.0, 1.0]``, ``one of stochastic, multidiffusion``."""
    kind = scalar_type(info)
    if kind is bool:
        return "true or false"
    if issubclass(kind, StrEnum):
        return "one of " + ", ".join(member.value for member in kind)
    if kind is str:
        limits = [item.max_length for item in info.metadata if isinstance(item, annotated_types.MaxLen)]
        return f"at most {limits[0]} characters" if limits else "a string"
    low, low_open, high = bounds(info)
    if low is None or high is None:
        return f"a {'finite number' if kind is float else 'whole number'}"
    show = float if kind is float else int
    return f"in {'(' if low_open else '['}{show(low)!r}, {show(high)!r}]"


def defaults_of(cls: type[P]) -> P:
    """``cls`` with every default (models with required fields have none)."""
    return cls()


def walk(cls: type[ParamModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Every scalar parameter of ``cls`` as (path, field), nested models flattened in definition order."""
    for name, info in cls.model_fields.items():
        nested = model_type(info)
        if nested is not None:
            yield from walk(nested, (*prefix, name))
        else:
            yield (*prefix, name), info


def default_at(cls: type[ParamModel], path: tuple[str, ...]) -> Any:
    """The default of the scalar parameter at ``path``; nested defaults come from the parent's default."""
    value: Any = defaults_of(cls)
    for part in path:
        value = getattr(value, part)
    return value


def default_text(value: Any) -> str:
    """A default as the docs show it: ``0.3``, ``'high quality, detailed, sharp'``, ``random``, ``stochastic``."""
    if value is None:
        return "random"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ParamModel):
        return ", ".join(f"{name} {default_text(getattr(value, name))}" for name in type(value).model_fields)
    return repr(value.value) if isinstance(value, StrEnum) else repr(value)


def reference(info: FieldInfo, default: Any = ...) -> str:
    """A field's doc with its range and default, the one text every reference shows (proto comments, CLI help,
    docs/parameters.md): ``Classifier-free guidance. In [0.0, 30.0]; default 7.5.`` (no default for ``...``)."""
    doc = str(info.description or "").rstrip(".")
    if model_type(info) is not None:
        return f"{doc}. Default {default_text(default)}."
    shown = "" if default is ... else f"; default {default_text(default)}"
    return f"{doc}. {describe(info)[:1].upper()}{describe(info)[1:]}{shown}."


def full_doc(cls: type[ParamModel], path: tuple[str, ...]) -> str:
    """The doc of the parameter at ``path``, prefixed by its parents' (``Stage 2: ... sampler: sampling steps.``)."""
    docs = []
    owner: type[ParamModel] | None = cls
    for part in path:
        assert owner is not None  # nosec B101  # for mypy: a path ends at a scalar
        info = owner.model_fields[part]
        docs.append(str(info.description or part).rstrip("."))
        owner = model_type(info)
    text = ": ".join([docs[0], *(doc[:1].lower() + doc[1:] for doc in docs[1:])])
    return text + "."


def cli_stem(cls: type[ParamModel], path: tuple[str, ...]) -> str:
    """The CLI flag of the parameter at ``path`` without dashes: ``guidance``, ``ss-steps``, ``slat-cfg``."""
    stems = []
    owner: type[ParamModel] | None = cls
    for part in path:
        assert owner is not None  # nosec B101  # for mypy: a path ends at a scalar
        info = owner.model_fields[part]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        stems.append(str(extra.get("cli") or part.replace("_", "-")))
        owner = model_type(info)
    return "-".join(stems)
