"""Admission: a request is admitted or refused when it arrives, and a refused one hears nothing but the
refusal, with a retry hint."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.admission import RETRY_AFTER_S, Admission, ByteBudget
from tests.images import png_bytes
from tools.stack import LocalStack
from trellisbox._domain.errors import QueueFull
from trellisbox.client import build_request
from trellisbox.v1 import gateway_pb2_grpc


def test_refused_at_once_and_queue_places_given_back() -> None:
    async def main() -> None:
        admission = Admission(max_concurrent=1, max_queue=1)
        first = admission.enter()
        assert not first.waits
        async with first.slot():
            second = admission.enter()
            assert second.waits and second.ahead == 0 and admission.waiting == 1
            with pytest.raises(QueueFull) as refused:
                admission.enter()
            assert refused.value.retry_after_s == RETRY_AFTER_S
            second.leave()  # its caller went away before it got the slot
            assert admission.waiting == 0
            third = admission.enter()
            assert third.waits and third.ahead == 0 and admission.waiting == 1
            third.leave()
        first.leave()  # a no-op once it had its slot
        assert admission.waiting == 0 and not admission._slots.locked()

    asyncio.run(main())


@pytest.fixture(scope="module")
def one_slot_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A gateway with one slot and no queue, in front of a refiner that takes 2 s per image."""
    with LocalStack(
        tmp_path_factory.mktemp("one-slot"),
        refiner_args=["--backend", "fixed-latency", "--fixed-latency-ms", "2000"],
        trellis_args=["--backend", "preview"],
        gateway_args=["--max-concurrent", "1", "--max-queue", "0"],
    ) as stack:
        yield stack


@pytest.mark.integration
def test_a_refused_request_hears_only_the_refusal_with_a_retry_hint(one_slot_stack: LocalStack,
                                                                    tmp_path: Path) -> None:
    request = build_request([png_bytes(64)], refine=True, generation={"seed": 1})
    with grpc.insecure_channel(one_slot_stack.gateway_target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        finished: list[str] = []
        admitted = threading.Event()

        def busy() -> None:
            for response in stub.Generate(request, timeout=60):
                finished.append(response.WhichOneof("event") or "")
                admitted.set()  # its first event: it holds the only slot for about 2 s more

        holder = threading.Thread(target=busy)
        holder.start()
        assert admitted.wait(30), "the first request was never admitted"
        received = []
        call = stub.Generate(request, timeout=30)
        with pytest.raises(grpc.RpcError):
            for response in call:
                received.append(response)
        holder.join(60)
    assert received == [], "a refused request must hear nothing but the refusal"
    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "gateway is at capacity" in (call.details() or "")
    trailing = dict(call.trailing_metadata() or ())
    assert trailing.get("grpc-retry-pushback-ms") == str(round(RETRY_AFTER_S * 1000))
    assert finished and finished[-1] == "done", "the admitted request still completes"


def test_the_byte_budget_lets_one_large_request_in_and_refuses_past_it() -> None:
    budget = ByteBudget(100)
    with budget.hold(150) as hold:  # alone: let in, however large (the transport bounds it)
        assert budget.held == 150
        with pytest.raises(QueueFull, match="holding 0 MiB of requests") as refused, budget.hold(10):
            pass
        assert refused.value.retry_after_s == RETRY_AFTER_S
        hold.resize(40)  # it finished with 40 still held
        with budget.hold(60):
            assert budget.held == 100
    assert budget.held == 0


def test_requests_waiting_for_room_get_it_in_order_or_are_refused_after_waiting() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(100)
        order: list[str] = []

        async def wait_then_hold(name: str, nbytes: int, wait_s: float) -> None:
            try:
                async with budget.hold_when_free(nbytes, wait_s):
                    order.append(name)
                    await asyncio.sleep(0.01)
            except QueueFull as refused:
                order.append(f"{name} refused: {refused}")

        with budget.hold(80) as hold:
            waiting = [asyncio.create_task(wait_then_hold(name, 40, 5)) for name in ("first", "second", "third")]
            late = asyncio.create_task(wait_then_hold("late", 10, 0.05))  # fits, but may not overtake the waiters
            await asyncio.sleep(0.1)
            (refusal,) = order
            assert refusal.startswith("late refused: gateway is holding") and "and 3 more wait; retry later" in refusal
            hold.resize(20)  # room for one 40-byte request
            await asyncio.gather(*waiting, late)
        assert budget.held == 0
        return order

    order = asyncio.run(scenario())
    assert [name for name in order if "refused" not in name] == ["first", "second", "third"]
