"""The contract: committed stubs match the protos, and the protos follow buf's style rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools.protogen import PROTO_DIR, ROOT, generate
from trellisbox.v1 import common_pb2, gateway_pb2, refiner_pb2, trellis_pb2

GENERATED = ROOT / "trellisbox" / "v1"


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in GENERATED.glob("*_pb2*")}
    assert sorted(fresh) == sorted(committed), "run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stubs out of date, run `make proto`: {stale}"


@pytest.mark.parametrize("module", [common_pb2, gateway_pb2, refiner_pb2, trellis_pb2])
def test_package_is_versioned_and_enums_start_unspecified(module: object) -> None:
    descriptor = module.DESCRIPTOR  # type: ignore[attr-defined]
    assert descriptor.package == "trellisbox.v1"
    for enum in descriptor.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper()
        assert zero == f"{prefix}_UNSPECIFIED"
        assert all(v.name.startswith(prefix + "_") for v in enum.values)


#: Calls that do no model work and answer at once; every other call streams progress, chunks and done.
SHORT_CALLS = {"Cancel"}


@pytest.mark.parametrize("module", [gateway_pb2, refiner_pb2, trellis_pb2])
def test_one_request_response_pair_per_rpc_and_long_calls_stream(module: object) -> None:
    descriptor = module.DESCRIPTOR  # type: ignore[attr-defined]
    for service in descriptor.services_by_name.values():
        assert service.name.endswith("Service")
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
            if method.name in SHORT_CALLS:
                assert not method.server_streaming
                continue
            assert method.server_streaming
            events = [f.name for f in method.output_type.oneofs_by_name["event"].fields]
            assert events == ["progress", "chunk", "done"]


def test_protos_live_where_the_layout_says() -> None:
    assert sorted(p.name for p in (PROTO_DIR / "trellisbox" / "v1").glob("*.proto")) == [
        "common.proto", "gateway.proto", "refiner.proto", "trellis.proto"
    ]
