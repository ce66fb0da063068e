"""Durable requests over a real stack: a request with a request_id outlives its call, is attached to while it runs,
is stored when it finished, is never computed twice, and can be cancelled; the client reconnects by itself."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trimesh
from PIL import Image

from tests.images import encode, rgba_object
from tests.proxy import LoopbackProxy
from tools.stack import LocalStack
from trellisbox.client import ProgressUpdate, TrellisBoxClient, build_request
from trellisbox.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.integration

#: Each refinement takes this long, so that a job is surely still running when the test acts on it.
REFINE_MS = 2500


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("durable"),
                    refiner_args=["--backend", "fixed-latency", "--fixed-latency-ms", str(REFINE_MS)],
                    trellis_args=["--backend", "preview"]) as running:
        yield running


def _request(request_id: str, seed: int = 5) -> gateway_pb2.GenerateRequest:
    return build_request([encode(rgba_object(96, seed=seed))], refine=True, formats=["glb", "refined"],
                         generation={"seed": seed, "texture_size": 256}, request_id=request_id)


def _stub(channel: grpc.Channel) -> gateway_pb2_grpc.GatewayServiceStub:
    return gateway_pb2_grpc.GatewayServiceStub(channel)


def _jobs_started(stack: LocalStack, request_id: str) -> int:
    """How many times the gateway ran ``request_id`` (its log line per started job)."""
    log = (stack.log_dir / "gateway.log").read_text()
    return sum(1 for line in log.splitlines() if f"[{request_id}]" in line and line.endswith(", durable"))


def _wait_until_started(stack: LocalStack, request_id: str, caller: threading.Thread) -> None:
    """Until the gateway started ``request_id`` (bounded: the caller may have failed first)."""
    deadline = time.monotonic() + 30
    while not _jobs_started(stack, request_id):
        assert time.monotonic() < deadline and caller.is_alive(), f"{request_id} never started"
        caller.join(0.05)


def _leave_after_first_progress(stub: gateway_pb2_grpc.GatewayServiceStub,
                                request: gateway_pb2.GenerateRequest) -> None:
    call = stub.Generate(request, timeout=60)
    for response in call:
        if response.WhichOneof("event") == "progress":
            break
    call.cancel()


def _check_result(result_glb: bytes | None, refined: list[bytes]) -> None:
    assert result_glb is not None
    mesh = trimesh.load(io.BytesIO(result_glb), file_type="glb", force="mesh")
    assert isinstance(mesh, trimesh.Trimesh) and len(mesh.vertices) > 0 and len(mesh.faces) > 0
    (png,) = refined
    assert Image.open(io.BytesIO(png)).size == (96, 96)


def test_a_request_outlives_its_caller_and_is_stored(stack: LocalStack) -> None:
    request = _request("durable-outlives")
    with grpc.insecure_channel(stack.gateway_target) as channel:
        _leave_after_first_progress(_stub(channel), request)
    updates: list[ProgressUpdate] = []
    with TrellisBoxClient(stack.gateway_target, timeout=60) as client:
        # The caller left during refinement; the job went on and this follows it to its end.
        followed = client.fetch("durable-outlives", on_progress=updates.append)
        assert followed.request_id == "durable-outlives"
        _check_result(followed.glb, followed.refined_images)
        assert "attached to the running request durable-outlives" in updates[0].message
        # Sending the same request again returns the stored result: the same bytes, nothing run again.
        again = client.collect(client.stream(request))
        stored = client.fetch("durable-outlives")
    assert again.glb == stored.glb == followed.glb
    assert again.refined_images == followed.refined_images
    assert again.refine_seeds == followed.refine_seeds and again.timings == followed.timings
    assert _jobs_started(stack, "durable-outlives") == 1


def test_callers_of_a_running_request_get_the_same_result(stack: LocalStack) -> None:
    request = _request("durable-twice", seed=7)
    results: list[tuple[bytes | None, list[bytes]]] = []

    def call() -> None:
        with TrellisBoxClient(stack.gateway_target, timeout=60) as client:
            result = client.collect(client.stream(request))
            results.append((result.glb, result.refined_images))

    first = threading.Thread(target=call)
    first.start()
    with TrellisBoxClient(stack.gateway_target, timeout=60) as client:
        # Wait until the first call's job runs, then send the same request: it attaches instead of running it again.
        _wait_until_started(stack, "durable-twice", first)
        second = client.collect(client.stream(request))
    first.join(60)
    assert len(results) == 1 and results[0] == (second.glb, second.refined_images)
    _check_result(second.glb, second.refined_images)
    assert _jobs_started(stack, "durable-twice") == 1


def test_a_callers_deadline_ends_its_call_not_the_request(stack: LocalStack) -> None:
    """The job is the gateway's: a deadline shorter than the job ends the call with DEADLINE_EXCEEDED, and the
    request goes on (bounded by the gateway's default_timeout_s) to a result that can be fetched."""
    request = _request("durable-deadline", seed=11)
    with grpc.insecure_channel(stack.gateway_target) as channel, pytest.raises(grpc.RpcError) as caught:
        list(_stub(channel).Generate(request, timeout=REFINE_MS / 1000 / 2))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    with TrellisBoxClient(stack.gateway_target, timeout=60) as client:
        fetched = client.fetch("durable-deadline")
    _check_result(fetched.glb, fetched.refined_images)
    assert _jobs_started(stack, "durable-deadline") == 1


def test_the_formats_count_as_a_set_when_matching_a_request(stack: LocalStack) -> None:
    """Their order and repeats ask for nothing different: the same request, attached to, not ALREADY_EXISTS."""
    request = _request("durable-formats", seed=13)
    with TrellisBoxClient(stack.gateway_target, timeout=60) as client:
        first = client.collect(client.stream(request))
        reordered = gateway_pb2.GenerateRequest()
        reordered.CopyFrom(request)
        reordered.formats[:] = [*reversed(request.formats), request.formats[0]]
        again = client.collect(client.stream(reordered))
    assert again.glb == first.glb and _jobs_started(stack, "durable-formats") == 1


def test_the_same_id_for_another_request_is_already_exists(stack: LocalStack) -> None:
    with TrellisBoxClient(stack.gateway_target, timeout=60) as client:
        client.collect(client.stream(_request("durable-taken", seed=1)))
        with pytest.raises(grpc.RpcError) as info:
            client.collect(client.stream(_request("durable-taken", seed=2)))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    assert "request_id 'durable-taken' is taken by a different request" in (info.value.details() or "")  # type: ignore[attr-defined]


def test_unknown_and_missing_ids(stack: LocalStack) -> None:
    with TrellisBoxClient(stack.gateway_target, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as unknown:
            client.fetch("never-sent")
        with pytest.raises(grpc.RpcError) as empty:
            client.fetch("")
        with pytest.raises(grpc.RpcError) as cancel_unknown:
            client.cancel("never-sent")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert "no running request and no stored result with request_id 'never-sent'" in (unknown.value.details() or "")  # type: ignore[attr-defined]
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert cancel_unknown.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_cancel_stops_a_running_request_and_deletes_a_stored_one(stack: LocalStack) -> None:
    with grpc.insecure_channel(stack.gateway_target) as channel:
        _leave_after_first_progress(_stub(channel), _request("durable-cancel"))
    with TrellisBoxClient(stack.gateway_target, timeout=30) as client:
        assert client.cancel("durable-cancel") == "stopped"
        with pytest.raises(grpc.RpcError) as gone:  # a cancelled request keeps nothing
            client.fetch("durable-cancel")
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]

        client.collect(client.stream(_request("durable-delete")))
        assert client.cancel("durable-delete") == "deleted"
        with pytest.raises(grpc.RpcError) as deleted:
            client.fetch("durable-delete")
        assert deleted.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_a_follower_of_a_cancelled_request_is_told(stack: LocalStack) -> None:
    request = _request("durable-told")
    errors: list[grpc.RpcError] = []

    def follow() -> None:
        with TrellisBoxClient(stack.gateway_target, timeout=60) as client:
            try:
                client.collect(client.stream(request))
            except grpc.RpcError as exc:
                errors.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    with TrellisBoxClient(stack.gateway_target, timeout=30) as client:
        _wait_until_started(stack, "durable-told", follower)
        assert client.cancel("durable-told") == "stopped"
    follower.join(30)
    (error,) = errors
    assert error.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
    assert "request durable-told was cancelled" in (error.details() or "")  # type: ignore[attr-defined]


def test_the_client_reattaches_when_its_connection_breaks(stack: LocalStack) -> None:
    proxy = LoopbackProxy(stack.gateway_target)
    updates: list[ProgressUpdate] = []

    def on_progress(update: ProgressUpdate) -> None:
        updates.append(update)
        if len(updates) == 1:
            proxy.cut()  # the first progress event came through: break the connection under the call

    try:
        with TrellisBoxClient(proxy.target, timeout=60) as client:
            result = client.generate([encode(rgba_object(96, seed=11))], refine=True, formats=["glb", "refined"],
                                     generation={"seed": 11, "texture_size": 256}, request_id="durable-reconnect",
                                     on_progress=on_progress)
    finally:
        proxy.close()
    _check_result(result.glb, result.refined_images)
    assert any("connection lost" in u.message and "attaching to request durable-reconnect again" in u.message
               for u in updates)
    assert _jobs_started(stack, "durable-reconnect") == 1


def test_the_cli_fetches_and_cancels(stack: LocalStack, tmp_path: Path) -> None:
    with TrellisBoxClient(stack.gateway_target, timeout=60) as client:
        expected = client.collect(client.stream(_request("durable-cli")))
    cli = [sys.executable, "-m", "trellisbox.cli"]
    fetched = subprocess.run([*cli, "fetch", "durable-cli", "-o", str(tmp_path / "out.glb"), "--refined-png",
                              str(tmp_path / "refined.png"), "--target", stack.gateway_target],
                             capture_output=True, text=True, timeout=60)
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "out.glb").read_bytes() == expected.glb
    assert (tmp_path / "refined.png").read_bytes() == expected.refined_images[0]
    cancelled = subprocess.run([*cli, "cancel", "durable-cli", "--target", stack.gateway_target],
                               capture_output=True, text=True, timeout=60)
    assert cancelled.returncode == 0 and "stored result deleted" in cancelled.stderr, cancelled.stderr
    missing = subprocess.run([*cli, "fetch", "durable-cli", "-o", str(tmp_path / "again.glb"), "--target",
                              stack.gateway_target], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_stored_results_survive_a_gateway_restart(stack: LocalStack) -> None:
    with TrellisBoxClient(stack.gateway_target, timeout=60) as client:
        before = client.collect(client.stream(_request("durable-restart")))
    stack.processes.pop("gateway").stop()
    restarted = stack.start_gateway()
    with TrellisBoxClient(restarted, timeout=60) as client:
        after = client.fetch("durable-restart")
    assert after.glb == before.glb and after.refined_images == before.refined_images


def test_a_gateway_shutting_down_ends_durable_requests_within_one_grace(tmp_path: Path) -> None:
    """SIGTERM with a durable request running: its caller hears the request's own CANCELLED message (not gRPC's
    'Cancelling all calls'), and the gateway exits within --grace-s, not twice that (calls, then jobs)."""
    grace_s = 4.0
    with LocalStack(tmp_path, refiner_args=["--backend", "fixed-latency", "--fixed-latency-ms", "12000"],
                    trellis_args=["--backend", "preview"], gateway_args=["--grace-s", str(grace_s)]) as running:
        outcome: list[grpc.RpcError] = []

        def follow() -> None:
            with grpc.insecure_channel(running.gateway_target) as channel, pytest.raises(grpc.RpcError) as caught:
                list(_stub(channel).Generate(_request("durable-shutdown"), timeout=60))
            outcome.append(caught.value)

        caller = threading.Thread(target=follow)
        caller.start()
        _wait_until_started(running, "durable-shutdown", caller)
        gateway = running.processes["gateway"]
        began = time.monotonic()
        gateway.stop(grace=30)
        took = time.monotonic() - began
        caller.join(30)
    assert took < grace_s + 3.0, f"the gateway took {took:.1f} s to stop with --grace-s {grace_s}"
    (error,) = outcome
    assert error.code() == grpc.StatusCode.CANCELLED, error  # type: ignore[attr-defined]
    assert "request durable-shutdown was cancelled (Cancel, or the gateway shut down)" in (
        error.details() or "")  # type: ignore[attr-defined]
