"""TLS at the gateway, mutual TLS inside, bearer tokens: real services on loopback with a throwaway CA.

The stack runs the CPU backends (classic refiner, preview generator); what is under test is the transport.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.images import encode, rgba_object
from tools.devcerts import new_authority, write_cert, write_dev_certs, write_private
from tools.stack import LocalStack, ServiceProcess, StackSecurity, free_port, start_service
from trellisbox._domain.contract import GATEWAY_SERVICE, REFINER_SERVICE
from trellisbox._runtime.security import channel_credentials
from trellisbox.client import TrellisBoxClient
from trellisbox.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from webui.app import EXAMPLE_IMAGE

pytestmark = pytest.mark.integration

TOKEN = "tb-test-token-3b9d0c1e7f"
WRONG_TOKEN = "tb-wrong-token-a41f55e2c9"
NO_IMAGES = gateway_pb2.GenerateRequest()  # refused with INVALID_ARGUMENT once past authentication


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    certs = tmp_path_factory.mktemp("certs")
    write_dev_certs(certs)
    tokens = certs / "tokens"
    write_private(tokens, f"# the gateway's tokens\n{TOKEN}\n".encode())
    with LocalStack(tmp_path_factory.mktemp("secure-logs"), refiner_args=["--backend", "classic"],
                    trellis_args=["--backend", "preview"], security=StackSecurity(certs, tokens),
                    ready_timeout=180) as stack:
        yield stack


def _generate_error(target: str, credentials: grpc.ChannelCredentials | None, token: str | None = None,
                    request: gateway_pb2.GenerateRequest = NO_IMAGES) -> grpc.RpcError:
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with channel, pytest.raises(grpc.RpcError) as info:
        list(gateway_pb2_grpc.GatewayServiceStub(channel).Generate(request, timeout=20, metadata=metadata))
    return info.value


def _health(target: str, credentials: grpc.ChannelCredentials | None, service: str = "") -> int | grpc.StatusCode:
    """The health status, or the status code of the failed call."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                  timeout=10).status)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[attr-defined, no-any-return]


def test_with_the_ca_and_a_token_the_pipeline_runs_end_to_end(secure_stack: LocalStack) -> None:
    assert secure_stack.security is not None
    with TrellisBoxClient(secure_stack.gateway_target, ca_file=secure_stack.security.ca_file, token=TOKEN,
                          timeout=120) as client:
        result = client.generate([encode(rgba_object(96))], refine=True, formats=["glb", "refined"])
    assert result.glb is not None and result.glb[:4] == b"glTF"
    assert result.refiner_backend == "classic" and len(result.refined_images) == 1


@pytest.mark.parametrize("how", ["--token-file", "TRELLISBOX_TOKEN", "no token"])
def test_the_cli_sends_the_token_over_tls(secure_stack: LocalStack, tmp_path: Path, how: str) -> None:
    assert secure_stack.security is not None
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    given = ["--token-file", str(token_file)] if how == "--token-file" else []
    env = {**os.environ, "TRELLISBOX_TOKEN": TOKEN if how == "TRELLISBOX_TOKEN" else ""}
    completed = subprocess.run(
        [sys.executable, "-m", "trellisbox.cli", "generate", str(EXAMPLE_IMAGE), "-o", str(tmp_path / "out.glb"),
         "--target", secure_stack.gateway_target, "--ca-file", str(secure_stack.security.ca_file), *given],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    if how == "no token":
        assert completed.returncode == 1
        assert "error: UNAUTHENTICATED: this service needs a bearer token" in completed.stderr
    else:
        assert completed.returncode == 0, completed.stderr
        assert (tmp_path / "out.glb").read_bytes()[:4] == b"glTF"
    assert TOKEN not in completed.stderr + completed.stdout


def test_a_plaintext_client_is_refused_by_the_handshake(secure_stack: LocalStack) -> None:
    error = _generate_error(secure_stack.gateway_target, None, TOKEN)
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_a_client_that_does_not_trust_the_ca_is_refused(secure_stack: LocalStack, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(new_authority("someone else").pem)
    error = _generate_error(secure_stack.gateway_target, channel_credentials(other_ca), TOKEN)
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "CERTIFICATE_VERIFY_FAILED" in (error.details() or "")  # type: ignore[attr-defined]


@pytest.mark.parametrize(("token", "message"), [
    (None, "this service needs a bearer token: send the metadata `authorization: Bearer <token>`"),
    (WRONG_TOKEN, "the bearer token is not valid here"),
])
def test_without_a_valid_token_the_call_is_unauthenticated(secure_stack: LocalStack, token: str | None,
                                                            message: str) -> None:
    assert secure_stack.security is not None
    credentials = channel_credentials(secure_stack.security.ca_file)
    error = _generate_error(secure_stack.gateway_target, credentials, token,
                            gateway_pb2.GenerateRequest(images=[common_pb2.Image(data=encode(rgba_object(64)))]))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert message in (error.details() or "")  # type: ignore[attr-defined]
    # With the right token the same connection settings get past authentication (to the request's own checks).
    assert _generate_error(secure_stack.gateway_target, credentials, TOKEN).code() == (  # type: ignore[attr-defined]
        grpc.StatusCode.INVALID_ARGUMENT)


def test_fetching_and_cancelling_durable_requests_need_the_token_too(secure_stack: LocalStack) -> None:
    assert secure_stack.security is not None
    ca_file = secure_stack.security.ca_file
    with TrellisBoxClient(secure_stack.gateway_target, ca_file=ca_file, timeout=20) as anonymous:
        for call in (lambda: anonymous.cancel("someone-elses-job"), lambda: anonymous.fetch("someone-elses-job")):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    with TrellisBoxClient(secure_stack.gateway_target, ca_file=ca_file, token=TOKEN, timeout=20) as client, \
            pytest.raises(grpc.RpcError) as info:
        client.cancel("no-such-job")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_health_and_reflection_need_no_token(secure_stack: LocalStack) -> None:
    assert secure_stack.security is not None
    credentials = channel_credentials(secure_stack.security.ca_file)
    assert _health(secure_stack.gateway_target, credentials, GATEWAY_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    with grpc.secure_channel(secure_stack.gateway_target, credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
    assert GATEWAY_SERVICE in {s.name for s in answer.list_services_response.service}


def test_a_model_service_refuses_callers_without_a_certificate_from_its_ca(secure_stack: LocalStack,
                                                                            tmp_path: Path) -> None:
    assert secure_stack.security is not None
    refiner = secure_stack.processes["refiner"].target
    ca_file = secure_stack.security.ca_file
    # No certificate, a certificate from another CA, plaintext: all refused before any call is served.
    stranger = write_cert(new_authority("someone else"), tmp_path, "stranger")
    for credentials in (channel_credentials(ca_file), channel_credentials(ca_file, stranger.cert, stranger.key), None):
        assert _health(refiner, credentials, REFINER_SERVICE) == grpc.StatusCode.UNAVAILABLE
    # A certificate of the stack's CA (what the gateway presents) is served.
    assert _health(refiner, secure_stack.security.credentials(), REFINER_SERVICE) == (
        health_pb2.HealthCheckResponse.SERVING)


def test_the_gateway_presents_its_rotated_client_certificate_to_the_model_services(secure_stack: LocalStack) -> None:
    assert secure_stack.security is not None
    cert_dir = secure_stack.security.cert_dir
    image = encode(rgba_object(64))
    original = {path: path.read_bytes() for path in (cert_dir / "client.crt", cert_dir / "client.key")}
    with TrellisBoxClient(secure_stack.gateway_target, ca_file=secure_stack.security.ca_file, token=TOKEN,
                          timeout=60) as client:
        write_cert(new_authority("not the model services' CA"), cert_dir, "client")  # the gateway's, rotated
        try:
            with pytest.raises(grpc.RpcError) as info:
                client.generate([image], refine=True)
        finally:
            for path, data in original.items():
                write_private(path, data)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert (info.value.details() or "").startswith("refiner:")  # type: ignore[attr-defined]
        result = client.generate([image], refine=True)  # new connections with the restored certificate
    assert result.glb is not None and result.refiner_backend == "classic"


def test_no_token_key_or_certificate_in_any_log(secure_stack: LocalStack) -> None:
    assert secure_stack.security is not None
    logs = "\n".join(text for _, text in secure_stack.logs())
    assert "UNAUTHENTICATED" in logs  # the refusals of the tests above were logged ...
    assert TOKEN not in logs and WRONG_TOKEN not in logs  # ... without what was sent
    secrets = [secure_stack.security.cert_dir / name for name in
               ("ca.crt", "gateway.crt", "gateway.key", "refiner.key", "trellis.key", "client.key")]
    for path in secrets:
        body = [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]
        assert not any(line in logs for line in body), f"content of {path.name} is in a log"
    assert "BEGIN" not in logs


# ---- rotation: a gateway alone (no stage reachable) whose files the test replaces ---------------------------


@pytest.fixture
def lone_gateway(tmp_path: Path) -> Iterator[tuple[ServiceProcess, Path]]:
    """A gateway serving TLS with a token, its certificates and tokens in a folder of its own."""
    write_dev_certs(tmp_path, ("gateway",))
    write_private(tmp_path / "tokens", f"{TOKEN}\n".encode())
    dead = f"127.0.0.1:{free_port()}"
    process = start_service("gateway", "gateway", [
        "--tls", "on", "--tls-cert-file", str(tmp_path / "gateway.crt"),
        "--tls-key-file", str(tmp_path / "gateway.key"), "--token-file", str(tmp_path / "tokens"),
        "--stage-tls", "off", "--refiner-target", dead, "--trellis-target", dead], tmp_path / "logs")
    process.credentials = channel_credentials(tmp_path / "ca.crt")
    try:
        process.wait_ready("", 60)
        yield process, tmp_path
    finally:
        process.stop()


def test_a_rotated_certificate_is_served_to_new_connections_without_restart(
        lone_gateway: tuple[ServiceProcess, Path]) -> None:
    gateway, folder = lone_gateway
    new_ca = new_authority("the next CA")
    (folder / "next-ca.crt").write_bytes(new_ca.pem)
    trusts_old, trusts_new = channel_credentials(folder / "ca.crt"), channel_credentials(folder / "next-ca.crt")
    assert _health(gateway.target, trusts_old) == health_pb2.HealthCheckResponse.SERVING
    assert _health(gateway.target, trusts_new) == grpc.StatusCode.UNAVAILABLE

    write_cert(new_ca, folder, "gateway")  # replaced in place, as cert-manager does

    assert _health(gateway.target, trusts_new) == health_pb2.HealthCheckResponse.SERVING
    assert _health(gateway.target, trusts_old) == grpc.StatusCode.UNAVAILABLE
    assert gateway.process.poll() is None  # the same process
    assert "TLS certificate reloaded from" in gateway.log_tail(200)


def test_a_changed_token_file_is_picked_up(lone_gateway: tuple[ServiceProcess, Path]) -> None:
    gateway, folder = lone_gateway
    credentials = gateway.credentials
    assert _generate_error(gateway.target, credentials, TOKEN).code() == (  # type: ignore[attr-defined]
        grpc.StatusCode.INVALID_ARGUMENT)
    write_private(folder / "tokens", f"{WRONG_TOKEN}\n".encode())  # a new Secret version: the old token is revoked
    assert _generate_error(gateway.target, credentials, TOKEN).code() == (  # type: ignore[attr-defined]
        grpc.StatusCode.UNAUTHENTICATED)
    assert _generate_error(gateway.target, credentials, WRONG_TOKEN).code() == (  # type: ignore[attr-defined]
        grpc.StatusCode.INVALID_ARGUMENT)
    log = gateway.log_tail(200)
    assert "tokens reloaded from" in log and TOKEN not in log and WRONG_TOKEN not in log


def test_plaintext_on_a_reachable_address_must_be_asked_for(tmp_path: Path) -> None:
    process = start_service("gateway-open", "gateway", ["--host", "0.0.0.0"], tmp_path)  # after the stack's --host
    try:
        assert process.process.wait(60) != 0
    finally:
        process.stop()
    log = process.log_tail(60)
    assert re.search(r"host 0\.0\.0\.0 is reachable from other machines: choose the transport with tls", log), log


def test_reflection_can_require_a_token_and_health_never_does(tmp_path: Path) -> None:
    write_private(tmp_path / "tokens", f"{TOKEN}\n".encode())
    dead = f"127.0.0.1:{free_port()}"
    gateway = start_service("gateway", "gateway", ["--token-file", str(tmp_path / "tokens"), "--reflection-needs-token",
                                                   "--refiner-target", dead, "--trellis-target", dead], tmp_path)
    try:
        gateway.wait_ready("", 60)  # health: no token
        with grpc.insecure_channel(gateway.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ServerReflectionInfo(iter(ask), timeout=10))
            (answer,) = stub.ServerReflectionInfo(iter(ask), timeout=10,
                                                  metadata=(("authorization", f"Bearer {TOKEN}"),))
    finally:
        gateway.stop()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert GATEWAY_SERVICE in {s.name for s in answer.list_services_response.service}


def test_the_health_port_answers_probes_in_plaintext_and_serves_nothing_else(tmp_path: Path) -> None:
    write_dev_certs(tmp_path, ("refiner",))
    health_port = free_port()
    refiner = start_service("refiner", "refiner_service", [
        "--backend", "classic", "--tls", "mutual", "--tls-cert-file", str(tmp_path / "refiner.crt"),
        "--tls-key-file", str(tmp_path / "refiner.key"), "--tls-client-ca-file", str(tmp_path / "ca.crt"),
        "--health-port", str(health_port)], tmp_path / "logs")
    probe = f"127.0.0.1:{health_port}"
    try:
        # What the kubelet does: plaintext, no certificate, readiness by the service's name.
        ServiceProcess("probe", "", health_port, refiner.process, refiner.log_path).wait_ready(REFINER_SERVICE, 120)
        assert _health(refiner.target, None, REFINER_SERVICE) == grpc.StatusCode.UNAVAILABLE  # the gRPC port: TLS
        with grpc.insecure_channel(probe) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=10))
    finally:
        refiner.stop()
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert f"health checks only, plaintext, on 127.0.0.1:{health_port}" in refiner.log_tail(100)


def test_refused_calls_are_counted_for_every_method(tmp_path: Path) -> None:
    """An alert on code="UNAUTHENTICATED" must see the gateway's main call, which reads its own request."""
    write_private(tmp_path / "tokens", f"{TOKEN}\n".encode())
    dead, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    process = start_service("gateway-counted", "gateway", [
        "--token-file", str(tmp_path / "tokens"), "--metrics-port", str(metrics_port),
        "--refiner-target", dead, "--trellis-target", dead], tmp_path / "logs")
    try:
        process.wait_ready("", 60)
        for token in (None, WRONG_TOKEN):
            assert _generate_error(process.target, None, token).code() == (  # type: ignore[attr-defined]
                grpc.StatusCode.UNAUTHENTICATED)
        with grpc.insecure_channel(process.target) as channel, pytest.raises(grpc.RpcError):
            gateway_pb2_grpc.GatewayServiceStub(channel).Cancel(gateway_pb2.CancelRequest(request_id="x"), timeout=20)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        process.stop()
    for method, count in (("Generate", 2), ("Cancel", 1)):
        sample = f'trellisbox_requests_total{{code="UNAUTHENTICATED",method="{method}",service="GatewayService"}} '
        assert any(line.startswith(sample) and float(line.rpartition(" ")[2]) == count
                   for line in metrics.splitlines()), (method, [line for line in metrics.splitlines()
                                                                if "requests_total" in line])
