"""Each request parameter is defined once (trellisbox/_domain/params.py); everything else derives from that
definition or is held to it here, so adding a parameter touches its definition, its proto field and the backend
that uses it, and these tests say what else drifted."""

from __future__ import annotations

import inspect
import math
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from refiner_service import ImageRefiner
from refiner_service.backends.sdxl import _sampling_args
from trellisbox._domain.convert import params_from_proto, params_message, params_to_proto
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.params import (
    MAX_PROMPT_CHARS,
    GaussianRefinementParams,
    GenerationParams,
    MultiImageMode,
    ParamModel,
    RefineParams,
    SamplerParams,
    bounds,
    build,
    cli_stem,
    default_at,
    describe,
    from_text,
    model_type,
    reference,
    scalar_type,
    walk,
)
from trellisbox.cli import main as cli_main
from trellisbox.client import build_request
from trellisbox.v1 import common_pb2
from webui.app import WebApp

ROOT = Path(__file__).resolve().parents[2]
MODELS: list[tuple[type[ParamModel], Descriptor]] = [
    (RefineParams, common_pb2.RefineParameters.DESCRIPTOR),
    (GenerationParams, common_pb2.GenerationParameters.DESCRIPTOR),
    (SamplerParams, common_pb2.SamplerParameters.DESCRIPTOR),
    (GaussianRefinementParams, common_pb2.GaussianRefinementParameters.DESCRIPTOR),
]
_PROTO_TYPES = {
    float: {FieldDescriptor.TYPE_DOUBLE},
    int: {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64},
    str: {FieldDescriptor.TYPE_STRING},
    bool: {FieldDescriptor.TYPE_BOOL},
}


def proto_comments(message: str) -> dict[str, str]:
    """The leading comment of each field of ``message`` in common.proto, lines joined."""
    text = (ROOT / "proto" / "trellisbox" / "v1" / "common.proto").read_text()
    body = re.search(rf"^message {message} \{{\n(.*?)^\}}", text, re.S | re.M)
    assert body is not None
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in body.group(1).splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            pending.append(stripped[2:].strip())
            continue
        field = re.match(r"(optional\s+)?[\w.]+\s+(\w+)\s*=", stripped)
        if field:
            comments[field.group(2)] = " ".join(pending)
        pending = []
    return comments


@pytest.mark.parametrize(("cls", "descriptor"), MODELS, ids=lambda m: getattr(m, "__name__", ""))
def test_proto_fields_match_the_definitions(cls: type[ParamModel], descriptor: Descriptor) -> None:
    assert list(descriptor.fields_by_name) == list(cls.model_fields), "same fields, same order"
    for name, info in cls.model_fields.items():
        field = descriptor.fields_by_name[name]
        nested = model_type(info)
        if nested is not None:
            assert field.message_type is not None
            assert field.message_type.name == nested.__name__.replace("Params", "Parameters"), name
            continue
        kind = scalar_type(info)
        if issubclass(kind, StrEnum):
            members = [v.name for v in field.enum_type.values if v.number]
            assert members == [f"MULTI_IMAGE_MODE_{m.name}" for m in kind], name
        else:
            assert field.type in _PROTO_TYPES[kind], f"{name}: proto type {field.type} for {kind.__name__}"
            # Presence: unset must be distinguishable from 0 so that it can mean "the default".
            assert field.has_presence, f"{name} must be `optional` in the proto"


@pytest.mark.parametrize(("cls", "message"), [(RefineParams, "RefineParameters"),
                                              (GenerationParams, "GenerationParameters"),
                                              (SamplerParams, "SamplerParameters"),
                                              (GaussianRefinementParams, "GaussianRefinementParameters")])
def test_proto_comments_state_the_definitions(cls: type[ParamModel], message: str) -> None:
    comments = proto_comments(message)
    defaults = None if cls is SamplerParams else cls()
    for name, info in cls.model_fields.items():
        expected = reference(info, getattr(defaults, name) if defaults is not None else ...)
        assert comments[name] == expected, f"common.proto {message}.{name}: write `// {expected}`"


def test_ranges_reject_nan_infinity_and_out_of_range_values() -> None:
    for cls in (RefineParams, GenerationParams):
        for path, info in walk(cls):
            low, _, high = bounds(info)
            if low is None or high is None:
                continue
            kind = scalar_type(info)
            bad: list[Any] = [high + 1] + ([math.nan, math.inf, -math.inf] if kind is float else [])
            for value in bad:
                values: dict[str, Any] = {path[-1]: value}
                if len(path) == 2:
                    values = {path[0]: {**default_at(cls, path[:1]).model_dump(), path[1]: value}}
                with pytest.raises(InvalidInput, match=re.escape(f"x.{'.'.join(path)} must be")):
                    build(cls, values, "x")


def test_the_proto_round_trip_keeps_every_parameter() -> None:
    refine = RefineParams(strength=0.45, guidance_scale=3.0, num_inference_steps=31, prompt="p", negative_prompt="n",
                          seed=5, aesthetic_score=7.0, negative_aesthetic_score=1.0)
    generation = GenerationParams(seed=9, sparse_structure=SamplerParams(steps=3, cfg_strength=1.5),
                                  slat=SamplerParams(steps=4, cfg_strength=2.5),
                                  multi_image_mode=MultiImageMode.MULTIDIFFUSION, mesh_simplify=0.5, texture_size=512)
    for params, message in ((refine, common_pb2.RefineParameters()), (generation, common_pb2.GenerationParameters())):
        assert params_from_proto(type(params), params_to_proto(params, message), "p") == params


def test_a_partly_set_sampler_keeps_the_stage_defaults_of_the_rest() -> None:
    message = common_pb2.GenerationParameters(slat=common_pb2.SamplerParameters(steps=30))
    params = params_from_proto(GenerationParams, message, "generation")
    assert params.slat == SamplerParams(steps=30, cfg_strength=3.0)
    assert params.sparse_structure == SamplerParams(steps=12, cfg_strength=7.5)


def test_image_refiner_takes_every_refine_parameter_with_its_default() -> None:
    for method in (ImageRefiner.refine, ImageRefiner.refine_batch):
        signature = inspect.signature(method)
        keywords = {name: p.default for name, p in signature.parameters.items()
                    if name not in ("self", "image", "images")}
        assert keywords == {name: getattr(RefineParams(), name) for name in RefineParams.model_fields}
    documented = inspect.getdoc(ImageRefiner.refine) or ""
    assert all(f"{name}:" in documented for name in RefineParams.model_fields)


def test_the_sdxl_pipeline_call_uses_every_refine_parameter() -> None:
    # Per image: prompt, negative prompt and the seed's generator; shared by a batch: the sampling arguments.
    per_image = {"prompt", "negative_prompt", "seed"}
    assert set(_sampling_args(RefineParams())) | per_image == set(RefineParams.model_fields)


def test_every_parameter_has_a_cli_flag_that_reaches_the_request(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    sent: list[Any] = []

    class Client:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def generate(self, images: Any, *, on_progress: Any, **options: Any) -> Any:
            sent.append(build_request(images, **options))
            raise SystemExit(0)

    monkeypatch.setattr("trellisbox.cli.TrellisBoxClient", Client)
    (tmp_path / "in.png").write_bytes(b"an image")
    argv = ["generate", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.glb"), "--refine"]
    flags = []
    for cls in (RefineParams, GenerationParams):
        for path, info in walk(cls):
            kind = scalar_type(info)
            flag = f"--{cli_stem(cls, path)}"
            if kind is bool:  # a switch: --gs-enabled / --no-gs-enabled
                argv.append(flag)
                flags.append(flag)
                continue
            value = next(iter(kind)).value if issubclass(kind, StrEnum) else ("text" if kind is str else "1")
            argv += [flag, value]
            flags.append(flag)
    assert len(flags) == len(set(flags)), "two parameters share a flag"
    with pytest.raises(SystemExit):
        cli_main(argv)
    request = sent[0]
    for message, cls in ((request.refine_parameters, RefineParams), (request.generation, GenerationParams)):
        for path, _ in walk(cls):
            owner = message
            for part in path[:-1]:
                owner = getattr(owner, part)
            field = owner.DESCRIPTOR.fields_by_name[path[-1]]
            sent_value = owner.HasField(path[-1]) if field.has_presence else getattr(owner, path[-1]) != 0
            assert sent_value, f"--{cli_stem(cls, path)} was not sent"


def test_the_client_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"refine_params\.strenght is not a parameter"):
        build_request([b"x"], refine_params={"strenght": 0.3})
    with pytest.raises(ValueError, match=r"generation\.multi_image_mode must be one of"):
        build_request([b"x"], generation={"multi_image_mode": "panorama"})
    message = params_message(GenerationParams, common_pb2.GenerationParameters(),
                             {"multi_image_mode": "multidiffusion", "slat": {"steps": 3}}, "generation")
    assert message.multi_image_mode == common_pb2.MULTI_IMAGE_MODE_MULTIDIFFUSION and message.slat.steps == 3


EMPTY_MESSAGE: dict[type[ParamModel], Any] = {RefineParams: common_pb2.RefineParameters,
                                              GenerationParams: common_pb2.GenerationParameters}


@pytest.mark.parametrize("cls", [RefineParams, GenerationParams])
def test_the_client_names_every_field_given_a_value_it_cannot_hold(cls: type[ParamModel]) -> None:
    """A value of the wrong type (or one protobuf cannot carry) is refused before sending, naming the field: not
    protobuf's bare "Value out of range" or a TypeError from deep inside."""
    for path, info in walk(cls):
        kind = scalar_type(info)
        wrong: Any = [1] if kind is str else "x"
        values: dict[str, Any] = {path[-1]: wrong}
        for parent in reversed(path[:-1]):
            values = {parent: values}
        dotted = ".".join(("p", *path))
        with pytest.raises(ValueError, match=re.escape(f"{dotted} must be ")):
            params_message(cls, EMPTY_MESSAGE[cls](), values, "p")
    with pytest.raises(ValueError, match=re.escape("generation.seed must be a whole number in [0, 4294967295], "
                                                   "got -1")):
        build_request([b"x"], generation={"seed": -1})
    with pytest.raises(ValueError, match=re.escape("refine_params.seed must be a whole number in [0, 4294967295]")):
        build_request([b"x"], refine_params={"seed": 2**70})
    with pytest.raises(ValueError, match=r"generation\.slat must be a mapping of steps, cfg_strength, got 12"):
        build_request([b"x"], generation={"slat": 12})
    with pytest.raises(ValueError, match=r"refine_params\.strength must be a number in \(0\.0, 1\.0\], got 'high'"):
        build_request([b"x"], refine_params={"strength": "high"})


def test_form_values_are_typed_from_the_definitions() -> None:
    typed = from_text(GenerationParams, {"seed": "11", "mesh_simplify": "0.9", "texture_size": "",
                                         "slat": {"steps": "7"}, "multi_image_mode": "stochastic"}, "generation")
    assert typed == {"seed": 11, "mesh_simplify": 0.9, "slat": {"steps": 7}, "multi_image_mode": "stochastic"}
    with pytest.raises(ValueError, match=r"generation.texture_size must be in \[256, 4096\], got '1.5'"):
        from_text(GenerationParams, {"texture_size": "1.5"}, "generation")
    with pytest.raises(ValueError, match=r"refine\.colour is not a parameter"):
        from_text(RefineParams, {"colour": "red"}, "refine")


def test_the_web_app_has_a_control_per_parameter_with_its_range_and_default(tmp_path: Path) -> None:
    """Every parameter has a control in the Gradio app; its range, default, choices and info come from the
    definition (a parameter added without a control fails here)."""
    app = WebApp("127.0.0.1:1", tmp_path)
    app.build()
    expected = {".".join((group, *path)): (cls, path, info)
                for group, cls in (("refine", RefineParams), ("generation", GenerationParams))
                for path, info in walk(cls)}
    assert set(app.inputs) == set(expected)
    for key, control in app.inputs.items():
        component: Any = control
        cls, path, info = expected[key]
        default = default_at(cls, path)
        kind = scalar_type(info)
        assert describe(info)[1:] in str(component.info), key
        if kind is bool:
            assert component.value is default, key
        elif issubclass(kind, StrEnum):
            assert [choice[1] for choice in component.choices] == [m.value for m in kind]
            assert component.value == default.value
        elif default is None:  # a seed: empty means random
            assert component.value == "" and component.placeholder == "random"
        elif kind is str:
            assert component.value == default and component.max_length == MAX_PROMPT_CHARS
        else:
            low, low_open, high = bounds(info)
            assert low is not None and high is not None
            assert component.maximum == high and component.value == default, key
            assert component.minimum > low if low_open else component.minimum == low, key
