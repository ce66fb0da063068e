from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from trellisbox._domain.errors import Cancelled, DeadlineExceeded, QueueFull
from trellisbox._domain.kinds import Stage
from trellisbox._runtime.worker import Finished, JobContext, ModelWorker, ProgressEvent


def _stepper(steps: int, delay: float, seen: list[int] | None = None):  # type: ignore[no-untyped-def]
    def job(ctx: JobContext) -> str:
        for i in range(steps):
            ctx.raise_if_stopped()
            time.sleep(delay)
            if seen is not None:
                seen.append(i)
            ctx.report(Stage.REFINE, i + 1, steps)
        return threading.current_thread().name

    return job


async def _drain(worker: ModelWorker, job, request_id: str = "r"):  # type: ignore[no-untyped-def]
    return [item async for item in worker.run(job, request_id=request_id)]


def test_progress_then_result_on_the_model_thread() -> None:
    worker = ModelWorker("test", max_queue=2)
    items = asyncio.run(_drain(worker, _stepper(3, 0)))
    assert [i.step for i in items if isinstance(i, ProgressEvent)] == [1, 2, 3]
    assert isinstance(items[-1], Finished) and items[-1].value.startswith("test-model")
    worker.shutdown()


def test_jobs_run_one_at_a_time_and_the_queue_is_bounded() -> None:
    worker = ModelWorker("test", max_queue=1)
    active = 0
    peak = 0
    lock = threading.Lock()

    def job(ctx: JobContext) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1

    async def main() -> list[object]:
        return await asyncio.gather(*(_drain(worker, job) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert peak == 1
    assert sum(isinstance(r, QueueFull) for r in results) == 1  # 1 running + 1 waiting admitted
    worker.shutdown()


def test_a_caller_behind_a_running_job_is_told_its_place_at_once() -> None:
    """The first event of a call that waits is its place: the jobs ahead of it, the running one included (a call
    behind one running job heard nothing until its own job started)."""
    worker = ModelWorker("test", max_queue=4)

    async def main() -> list[list[object]]:
        first = asyncio.create_task(_drain(worker, _stepper(3, 0.1)))
        await asyncio.sleep(0.05)  # the first job runs; nothing waits
        second = asyncio.create_task(_drain(worker, _stepper(1, 0)))
        await asyncio.sleep(0.01)
        third = asyncio.create_task(_drain(worker, _stepper(1, 0)))
        return [await first, await second, await third]

    first, second, third = asyncio.run(main())
    assert not any(isinstance(i, ProgressEvent) and i.stage == Stage.QUEUED for i in first)
    for items, ahead in ((second, 1), (third, 2)):
        event = items[0]
        assert isinstance(event, ProgressEvent) and event.stage == Stage.QUEUED, items
        assert (event.total, event.message) == (ahead, f"{ahead} ahead in the queue")
    worker.shutdown()


def test_a_caller_that_leaves_stops_its_job() -> None:
    worker = ModelWorker("test", max_queue=2)
    seen: list[int] = []

    async def main() -> None:
        stream = worker.run(_stepper(200, 0.01, seen), request_id="r")
        async for item in stream:
            if isinstance(item, ProgressEvent) and item.step == 2:
                break
        assert isinstance(stream, AsyncGenerator)
        await stream.aclose()  # what grpc does when the client cancels
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert 2 <= len(seen) < 50
    worker.shutdown()


def test_deadline_raises_deadline_exceeded() -> None:
    from trellisbox._domain.errors import DeadlineExceeded

    worker = ModelWorker("test", max_queue=2)

    async def main() -> None:
        async for _ in worker.run(_stepper(100, 0.01), request_id="r", deadline=time.monotonic() + 0.05):
            pass

    with pytest.raises(DeadlineExceeded):
        asyncio.run(main())
    worker.shutdown()


def test_cancel_before_start_never_touches_the_model() -> None:
    ctx = JobContext("r", None, lambda e: None)
    ctx.cancel()
    with pytest.raises(Cancelled):
        ctx.raise_if_stopped()


def test_a_deadline_that_passed_first_is_reported_as_the_deadline() -> None:
    # gRPC cancels a call whose deadline passed: the job then sees both, and the deadline came first.
    ctx = JobContext("r", time.monotonic() - 0.01, lambda _: None)
    ctx.cancel()
    with pytest.raises(DeadlineExceeded):
        ctx.raise_if_stopped()
    early = JobContext("r", time.monotonic() + 60, lambda _: None)
    early.cancel()
    with pytest.raises(Cancelled, match="cancelled by the caller"):
        early.raise_if_stopped()


def test_a_stopped_job_is_logged_with_its_reason_and_stop_latency(caplog: pytest.LogCaptureFixture) -> None:
    worker = ModelWorker("test", max_queue=2)

    async def main() -> None:
        stream = worker.run(_stepper(200, 0.01), request_id="late-one", deadline=time.monotonic() + 0.2)
        with pytest.raises(DeadlineExceeded):
            async for _ in stream:
                pass

    with caplog.at_level("INFO", logger="trellisbox._runtime.worker"):
        asyncio.run(main())
    worker.shutdown()
    line = next(r.getMessage() for r in caplog.records if "late-one stopped" in r.getMessage())
    stopped = re.search(r"its deadline passed; it stopped ([\d.]+) s after it was asked", line)
    assert stopped and float(stopped.group(1)) < 0.5, line


def test_memory_is_released_once_the_worker_is_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[float] = []
    monkeypatch.setattr("trellisbox._runtime.worker.release_memory", lambda **_: released.append(time.monotonic()))
    worker = ModelWorker("test", max_queue=2, release_when_idle_s=0.2)

    async def main() -> list[int]:
        counts = []
        await _drain(worker, _stepper(1, 0))
        await asyncio.sleep(0.1)  # jobs that follow each other closely: nothing released in between
        await _drain(worker, _stepper(1, 0))
        counts.append(len(released))
        # A job running when the delay runs out keeps the memory until the worker is idle again.
        long_job = asyncio.ensure_future(_drain(worker, _stepper(1, 0.4)))
        await asyncio.sleep(0.3)
        counts.append(len(released))
        await long_job
        for _ in range(100):  # bounded wait for the release, in the loop's default executor
            if released:
                break
            await asyncio.sleep(0.05)
        counts.append(len(released))
        return counts

    assert asyncio.run(main()) == [0, 0, 1]
    worker.shutdown()


def test_no_release_without_a_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[bool] = []
    monkeypatch.setattr("trellisbox._runtime.worker.release_memory", lambda **_: released.append(True))
    worker = ModelWorker("test", max_queue=2)

    async def main() -> None:
        await _drain(worker, _stepper(1, 0))
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert released == []
    worker.shutdown()


# -- the progress gate: a fast job's events at a bounded rate, every stage's start and end kept -------------------

def _progress(items: list[object]) -> list[tuple[Stage, int, int]]:
    return [(i.stage, i.step, i.total) for i in items if isinstance(i, ProgressEvent)]


def _two_stages(ctx: JobContext) -> str:
    """Stage PREPROCESS in 20 steps, then EXPORT in 10, all at once (a fast CPU model)."""
    for step in range(21):
        ctx.report(Stage.PREPROCESS, step, 20)
    for step in range(11):
        ctx.report(Stage.EXPORT, step, 10)
    return "ok"


def test_without_an_interval_every_event_goes_out() -> None:
    worker = ModelWorker("test", max_queue=2, progress_interval_s=0)
    progress = _progress(asyncio.run(_drain(worker, _two_stages)))
    assert progress == [(Stage.PREPROCESS, s, 20) for s in range(21)] + [(Stage.EXPORT, s, 10) for s in range(11)]
    worker.shutdown()


def test_a_fast_job_sends_each_stage_start_and_end_and_nothing_in_between() -> None:
    worker = ModelWorker("test", max_queue=2, progress_interval_s=5.0)  # far longer than the job
    items = asyncio.run(_drain(worker, _two_stages))
    assert _progress(items) == [(Stage.PREPROCESS, 0, 20), (Stage.PREPROCESS, 20, 20),
                                (Stage.EXPORT, 0, 10), (Stage.EXPORT, 10, 10)]
    assert isinstance(items[-1], Finished) and items[-1].value == "ok"
    worker.shutdown()


def test_slow_steps_all_go_out() -> None:
    worker = ModelWorker("test", max_queue=2, progress_interval_s=0.02)
    progress = _progress(asyncio.run(_drain(worker, _stepper(5, 0.05))))  # a step every 50 ms
    assert progress == [(Stage.REFINE, s, 5) for s in range(1, 6)]
    worker.shutdown()


def test_a_held_step_goes_out_when_the_interval_ends_without_waiting_for_the_next() -> None:
    """Step 2 comes right after step 1 and is held; the job then waits for the caller to have seen it. The gate's
    timer must deliver it: otherwise the job waits out its 10 s bound and the test fails."""
    worker = ModelWorker("test", max_queue=2, progress_interval_s=0.05)
    seen_two = threading.Event()
    waited: list[bool] = []

    def job(ctx: JobContext) -> str:
        ctx.report(Stage.REFINE, 1, 4)
        ctx.report(Stage.REFINE, 2, 4)
        waited.append(seen_two.wait(10))
        ctx.report(Stage.REFINE, 4, 4)
        return "ok"

    async def main() -> list[tuple[Stage, int, int]]:
        got = []
        async for item in worker.run(job, request_id="r"):
            if isinstance(item, ProgressEvent):
                got.append((item.stage, item.step, item.total))
                if item.step == 2:
                    seen_two.set()
        return got

    assert asyncio.run(main()) == [(Stage.REFINE, 1, 4), (Stage.REFINE, 2, 4), (Stage.REFINE, 4, 4)]
    assert waited == [True]
    worker.shutdown()


def test_the_newest_held_step_is_the_one_that_goes_out_in_order() -> None:
    """Steps 2..9 come within one interval: only the newest (9) goes out when it ends, before the stage's last."""
    worker = ModelWorker("test", max_queue=2, progress_interval_s=0.05)
    seen: list[int] = []
    got_nine = threading.Event()

    def job(ctx: JobContext) -> str:
        for step in range(1, 10):
            ctx.report(Stage.REFINE, step, 10)
        got_nine.wait(10)
        ctx.report(Stage.REFINE, 10, 10)
        return "ok"

    async def main() -> None:
        async for item in worker.run(job, request_id="r"):
            if isinstance(item, ProgressEvent):
                seen.append(item.step)
                if item.step == 9:
                    got_nine.set()

    asyncio.run(main())
    assert seen == [1, 9, 10]
    worker.shutdown()


def test_held_steps_do_not_wake_the_loop_while_its_timer_runs() -> None:
    """Each wake of the loop takes the GIL from the model thread. After a hand-off, the loop sets the interval's timer
    itself, so the steps held within that interval cost the model thread no wake: only what goes out does."""
    worker = ModelWorker("test", max_queue=2, progress_interval_s=5.0)  # the steps fall within it, however slow
    first_seen = threading.Event()
    wakes_while_held: list[int] = []
    wakes = [0]

    def job(ctx: JobContext) -> str:
        ctx.report(Stage.REFINE, 1, 10)
        assert first_seen.wait(10)  # the loop has delivered step 1, and with it set the interval's timer
        before = wakes[0]
        for step in range(2, 10):
            ctx.report(Stage.REFINE, step, 10)  # within the interval: held, the newest replacing the one before
        wakes_while_held.append(wakes[0] - before)
        ctx.report(Stage.EXPORT, 0, 1)  # opens a stage: step 9, then this, in one hand-off
        return "ok"

    async def main() -> list[tuple[Stage, int, int]]:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            if threading.get_ident() != loop_thread:
                wakes[0] += 1
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
        got = []
        async for item in worker.run(job, request_id="r"):
            if isinstance(item, ProgressEvent):
                got.append((item.stage, item.step, item.total))
                first_seen.set()
        return got

    assert asyncio.run(main()) == [(Stage.REFINE, 1, 10), (Stage.REFINE, 9, 10), (Stage.EXPORT, 0, 1)]
    assert wakes_while_held == [0]
    assert wakes[0] == 3  # the two hand-offs and the job's result (run_in_executor's own wake); none to count it
    worker.shutdown()


def test_the_running_job_and_the_waiting_line_are_counted_without_the_loop() -> None:
    """The model thread counts the job it runs (no wake of the loop for it); the queue depth the GPU lease reads at a
    turn's end, on that thread, is the jobs still waiting."""
    worker = ModelWorker("test", max_queue=4)
    all_admitted, recorded, release = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[int, int]] = []

    def job(ctx: JobContext) -> None:
        all_admitted.wait(10)
        seen.append((worker.in_flight, worker.queue_depth))
        recorded.set()
        release.wait(10)

    async def main() -> None:
        calls = [asyncio.ensure_future(_drain(worker, job)) for _ in range(3)]
        await asyncio.sleep(0)  # each call runs up to its admission
        assert worker.queue_depth + worker.in_flight == 3
        all_admitted.set()
        assert await asyncio.to_thread(recorded.wait, 10)
        assert (worker.in_flight, worker.queue_depth) == (1, 2)
        release.set()
        await asyncio.gather(*calls)
        assert (worker.in_flight, worker.queue_depth) == (0, 0)

    asyncio.run(main())
    assert seen == [(1, 2), (1, 1), (1, 0)]
    worker.shutdown()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc: Linux")
def test_the_model_thread_is_named_for_the_operating_system() -> None:
    """`top -H`, `perf` and /proc tell the model thread apart (Python leaves every thread named after the process)."""
    worker = ModelWorker("trellis", max_queue=1)
    comm = worker.call_blocking(lambda: Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text())
    assert comm.strip() == "trellis-model_0"
    worker.shutdown()
