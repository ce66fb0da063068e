"""Dynamic batching of the refiner: who shares a pipeline call, what each request gets back, and how close a
batched result is to the unbatched one.

Most tests drive :class:`DynamicBatcher` in-process with the real tiny SDXL-refiner backend and a real
:class:`ModelWorker`; the last one runs the service as a process and checks the log and the metric.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from refiner_service.backends.base import BatchMember, MemberOutcome, RefinerBackend
from refiner_service.backends.classic import ClassicBackend
from refiner_service.backends.sdxl import SDXLBackend
from refiner_service.batching import BATCH_IMAGES, BATCH_REQUESTS, DynamicBatcher
from refiner_service.config import RefinerSettings
from tests.refiner.refiner_helpers import png_bytes, scene, with_alpha
from tools.stack import free_port, start_service
from trellisbox._domain.errors import Cancelled, DeadlineExceeded, QueueFull
from trellisbox._domain.kinds import Stage
from trellisbox._domain.params import RefineParams
from trellisbox._runtime.lease import LeaseSettings
from trellisbox._runtime.model import ModelHost
from trellisbox._runtime.worker import Finished, JobContext, ModelWorker, ProgressEvent
from trellisbox.v1 import common_pb2, refiner_pb2, refiner_pb2_grpc

# A batched image may differ from the same image refined alone by this many grey levels (of 255) per
# channel: a batch runs the text encoder, UNet and VAE on a larger tensor, and CPU (and GPU) kernels sum
# in another order for another batch size. Measured on the tiny model: at most 1 (docs/refiner-performance.md).
TOLERANCE = 2
FAST: dict[str, Any] = {"num_inference_steps": 10, "strength": 0.5}  # 5 UNet steps


@pytest.fixture(scope="module")
def backend(cache_home: Path) -> Iterator[SDXLBackend]:
    import torch

    # One thread: on shared cores two OpenMP threads spin and a test takes 10× longer; batched and unbatched
    # runs compared here are all in this process, so they use the same kernels either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sdxl = SDXLBackend("tiny", "cpu")
    sdxl.show_progress_bars = False
    sdxl.load()
    try:
        yield sdxl
    finally:
        sdxl.unload()
        torch.set_num_threads(threads)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size and a.mode == b.mode
    return int(np.abs(pixels(a) - pixels(b)).max())


class Spy:
    """Records the model calls a backend receives (refine = one request alone, refine_batch = shared)."""

    def __init__(self, backend: SDXLBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, list[int]]] = []  # ("alone" | "batch", images per request)
        self.outcomes: list[list[MemberOutcome]] = []
        refine, refine_batch = backend.refine, backend.refine_batch

        def spy_refine(images: Sequence[Image.Image], *args: Any, **kwargs: Any) -> list[Image.Image]:
            self.calls.append(("alone", [len(images)]))
            return refine(images, *args, **kwargs)

        def spy_batch(members: Sequence[BatchMember]) -> list[MemberOutcome]:
            self.calls.append(("batch", [len(m.images) for m in members]))
            outcomes = refine_batch(members)
            self.outcomes.append(outcomes)
            return outcomes

        monkeypatch.setattr(backend, "refine", spy_refine)
        monkeypatch.setattr(backend, "refine_batch", spy_batch)


async def consume(stream: AsyncIterator[ProgressEvent | Finished[list[Image.Image]]],
                  stop_after: int | None = None) -> tuple[list[ProgressEvent], Any]:
    """Progress events and the final value (or the exception); ``stop_after`` progress events then go away."""
    progress: list[ProgressEvent] = []
    try:
        async for item in stream:
            if isinstance(item, Finished):
                return progress, item
            progress.append(item)
            if stop_after is not None and len(progress) >= stop_after:
                await stream.aclose()  # type: ignore[attr-defined]  # what gRPC does when the caller cancels
                return progress, "gone"
    except Exception as exc:
        return progress, exc
    raise AssertionError("stream ended without a result")


def make_batcher(backend: RefinerBackend, window_s: float = 0.3, max_images: int = 4,
                 max_queue: int = 8, progress_interval_s: float = 0.0) -> tuple[DynamicBatcher, ModelWorker]:
    """A batcher over a host that has loaded and warmed up ``backend`` (spy on it only after this); every progress
    event goes out unless ``progress_interval_s`` says otherwise."""
    host: ModelHost[RefinerBackend] = ModelHost("batch-test", max_queue, LeaseSettings(),
                                                progress_interval_s=progress_interval_s)
    host.start(lambda: backend)
    return DynamicBatcher(host, window_s=window_s, max_images=max_images), host.worker


def request(batcher: DynamicBatcher, images: list[Image.Image], params: RefineParams, seeds: list[int],
            request_id: str, deadline: float | None = None
            ) -> AsyncIterator[ProgressEvent | Finished[list[Image.Image]]]:
    return batcher.run(images, params, seeds, request_id=request_id, deadline=deadline)


def metric_count(histogram: Any, label: str) -> float:
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels == {"service": label}:
                return float(sample.value)
    return 0.0


# -- the batched call itself ----------------------------------------------------------------------------


def test_batched_matches_unbatched_within_tolerance(backend: SDXLBackend) -> None:
    members = [
        BatchMember([scene(64, seed=1)], [11], RefineParams(prompt="a ceramic vase", **FAST)),
        BatchMember([with_alpha(scene(64, seed=2)), scene(67, seed=3).crop((0, 0, 67, 66))], [12, 13],
                    RefineParams(prompt="a wooden chair", negative_prompt="smudge", **FAST)),
        BatchMember([scene(64, seed=4)], [14], RefineParams(negative_prompt="", **FAST)),
    ]
    assert len({backend.batch_key(m.images, m.params) for m in members}) == 1  # 67×66 snaps to 64×64
    batched = backend.refine_batch(members)
    worst = 0
    for member, outcome in zip(members, batched, strict=True):
        assert isinstance(outcome, list)
        alone = backend.refine(member.images, member.params, member.seeds)
        for image, got, expected in zip(member.images, outcome, alone, strict=True):
            assert got.size == image.size and got.mode == image.mode
            worst = max(worst, max_diff(got, expected))
            if image.mode == "RGBA":
                assert np.array_equal(np.asarray(got.getchannel("A")), np.asarray(image.getchannel("A")))
    assert worst <= TOLERANCE, f"batched differs from unbatched by {worst} grey levels"


def test_each_request_keeps_its_seed_and_prompt(backend: SDXLBackend) -> None:
    image = scene(64, seed=5)
    a = RefineParams(prompt="a ceramic vase, studio light", **FAST)
    b = RefineParams(prompt="a rusty robot", negative_prompt="smudge, noise", **FAST)
    members = [BatchMember([image], [100], a), BatchMember([image], [100], b), BatchMember([image], [200], a)]
    outcomes = backend.refine_batch(members)
    got = [o[0] for o in outcomes if isinstance(o, list)]
    assert len(got) == 3
    alone = [backend.refine([image], m.params, m.seeds)[0] for m in members]
    for g, e in zip(got, alone, strict=True):
        assert max_diff(g, e) <= TOLERANCE
    # Another prompt or another seed gives another image: nothing was shared but the call.
    assert max_diff(alone[0], alone[1]) > 4 * TOLERANCE  # same seed, other prompt
    assert max_diff(alone[0], alone[2]) > 4 * TOLERANCE  # same prompt, other seed
    assert max_diff(got[0], got[1]) > 4 * TOLERANCE and max_diff(got[0], got[2]) > 4 * TOLERANCE


def test_batch_key_separates_incompatible_requests(backend: SDXLBackend) -> None:
    base = RefineParams(**FAST)
    key = backend.batch_key([scene(64)], base)
    assert key == backend.batch_key([scene(64, seed=9)], RefineParams(prompt="other", seed=3, **FAST))
    assert key == backend.batch_key([scene(71)], base)  # 71 snaps to 64
    others = (RefineParams(num_inference_steps=12, strength=0.5), RefineParams(num_inference_steps=10, strength=0.6),
              RefineParams(guidance_scale=3.0, **FAST), RefineParams(aesthetic_score=5.0, **FAST),
              RefineParams(negative_aesthetic_score=1.0, **FAST))
    for other in others:
        assert backend.batch_key([scene(64)], other) != key, other
    assert backend.batch_key([scene(72)], base) != key
    assert backend.batch_key([scene(64), scene(72)], base) is None  # mixed sizes never share a call
    with pytest.raises(ValueError, match="batch_key"):
        backend.refine_batch([BatchMember([scene(64)], [1], base), BatchMember([scene(72)], [2], base)])


# -- the batcher ------------------------------------------------------------------------------------------


def test_concurrent_requests_share_one_call(backend: SDXLBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    batcher, worker = make_batcher(backend)
    spy = Spy(backend, monkeypatch)
    inputs = [scene(64, seed=1), with_alpha(scene(64, seed=2)), scene(64, seed=3)]
    params = [RefineParams(prompt=p, **FAST) for p in ("a vase", "a chair", "a lamp")]
    images_before = metric_count(BATCH_IMAGES, "batch-test")
    requests_before = metric_count(BATCH_REQUESTS, "batch-test")

    async def main() -> list[tuple[list[ProgressEvent], Any]]:
        return await asyncio.gather(*(
            consume(request(batcher, [image], p, [40 + i], f"r{i}"))
            for i, (image, p) in enumerate(zip(inputs, params, strict=True))
        ))

    results = asyncio.run(main())
    worker.shutdown()
    assert spy.calls == [("batch", [1, 1, 1])]
    assert metric_count(BATCH_IMAGES, "batch-test") == images_before + 1
    assert metric_count(BATCH_REQUESTS, "batch-test") == requests_before + 1
    for i, (progress, finished) in enumerate(results):
        assert isinstance(finished, Finished), finished
        assert [(e.stage, e.step, e.total) for e in progress] == [(Stage.REFINE, s, 5) for s in range(1, 6)]
        assert "batch of 3 images" in progress[0].message
        assert finished.queued_s >= 0 and finished.run_s > 0
        expected = backend.refine([inputs[i]], params[i], [40 + i])[0]
        assert max_diff(finished.value[0], expected) <= TOLERANCE


def test_each_member_of_a_batch_gets_its_own_rate_limited_progress(backend: SDXLBackend) -> None:
    """The shared call reports each step to every member; each member's gate lets the first and last through (the
    tiny model's steps come well within the interval), independently of the other members'."""
    batcher, worker = make_batcher(backend, progress_interval_s=30.0)
    inputs = [scene(64, seed=1), scene(64, seed=2)]
    params = [RefineParams(prompt=p, **FAST) for p in ("a vase", "a lamp")]

    async def main() -> list[tuple[list[ProgressEvent], Any]]:
        return await asyncio.gather(*(consume(request(batcher, [image], p, [7 + i], f"g{i}"))
                                      for i, (image, p) in enumerate(zip(inputs, params, strict=True))))

    results = asyncio.run(main())
    worker.shutdown()
    for progress, finished in results:
        assert isinstance(finished, Finished), finished
        assert [(e.stage, e.step, e.total) for e in progress] == [(Stage.REFINE, 1, 5), (Stage.REFINE, 5, 5)]
        assert "batch of 2 images" in progress[0].message


def test_a_request_alone_takes_the_unbatched_path_bit_for_bit(backend: SDXLBackend,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = [scene(64, seed=6), scene(64, seed=7)]
    params = RefineParams(prompt="a teapot", **FAST)
    expected = backend.refine(inputs, params, [3, 4])
    batcher, worker = make_batcher(backend, window_s=0.01)
    spy = Spy(backend, monkeypatch)
    progress, finished = asyncio.run(consume(request(batcher, inputs, params, [3, 4], "alone")))
    worker.shutdown()
    assert spy.calls == [("alone", [2])]
    assert isinstance(finished, Finished)
    assert all(np.array_equal(pixels(g), pixels(e)) for g, e in zip(finished.value, expected, strict=True))
    # Progress per image, as without batching (the pixel-identity service test relies on it too).
    assert [(e.step, e.message) for e in progress] == \
        [(s, "image 1/2") for s in range(1, 6)] + [(s, "image 2/2") for s in range(1, 6)]


def test_incompatible_requests_run_in_separate_calls(backend: SDXLBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    batcher, worker = make_batcher(backend)
    spy = Spy(backend, monkeypatch)
    jobs = [
        ([scene(64)], RefineParams(**FAST)),
        ([scene(64, seed=1)], RefineParams(prompt="compatible with the first", **FAST)),
        ([scene(64, seed=2)], RefineParams(num_inference_steps=12, strength=0.5)),  # other steps
        ([scene(72, seed=3)], RefineParams(**FAST)),  # other size
        ([scene(64, seed=4)], RefineParams(guidance_scale=2.0, **FAST)),  # other guidance
    ]

    async def main() -> list[tuple[list[ProgressEvent], Any]]:
        return await asyncio.gather(*(consume(request(batcher, images, p, [i], f"r{i}"))
                                      for i, (images, p) in enumerate(jobs)))

    results = asyncio.run(main())
    worker.shutdown()
    assert all(isinstance(finished, Finished) for _, finished in results)
    assert sorted(spy.calls) == sorted([("batch", [1, 1]), ("alone", [1]), ("alone", [1]), ("alone", [1])])


def test_multi_image_requests_count_toward_the_limit(backend: SDXLBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    batcher, worker = make_batcher(backend, max_images=4)
    spy = Spy(backend, monkeypatch)
    params = RefineParams(**FAST)
    sizes = [2, 2, 2, 5]  # two pairs fill one call; the third pair waits for the next; five never fit

    async def main() -> list[tuple[list[ProgressEvent], Any]]:
        return await asyncio.gather(*(
            consume(request(batcher, [scene(64, seed=k) for k in range(n)], params, list(range(n)), f"r{i}"))
            for i, n in enumerate(sizes)
        ))

    results = asyncio.run(main())
    worker.shutdown()
    assert [len(f.value) for _, f in results] == sizes
    assert sorted(spy.calls) == sorted([("batch", [2, 2]), ("alone", [2]), ("alone", [5])])


def test_requests_arriving_while_the_model_is_busy_ride_in_the_next_call(
        backend: SDXLBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    batcher, worker = make_batcher(backend, window_s=0.001)  # the window alone would batch nothing here
    spy = Spy(backend, monkeypatch)
    params = RefineParams(**FAST)
    release = threading.Event()

    async def main() -> list[tuple[list[ProgressEvent], Any]]:
        blocker = asyncio.ensure_future(_drain(worker.run(lambda ctx: release.wait(10), request_id="busy")))
        await asyncio.sleep(0.05)
        followers = []
        for i in range(3):  # arrive one by one, far apart compared with the window
            stream = request(batcher, [scene(64, seed=i)], params, [i], f"r{i}")
            followers.append(asyncio.ensure_future(consume(stream)))
            await asyncio.sleep(0.05)
        release.set()
        await blocker
        return list(await asyncio.gather(*followers))

    results = asyncio.run(main())
    worker.shutdown()
    assert all(isinstance(finished, Finished) for _, finished in results)
    assert spy.calls == [("batch", [1, 1, 1])]
    # The queue wait is each request's own: the first one waited longest.
    queued = [finished.queued_s for _, finished in results]
    assert queued[0] > queued[1] > queued[2] > 0


async def _drain(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


def test_one_cancelled_member_does_not_stop_the_others(backend: SDXLBackend, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="refiner_service")
    batcher, worker = make_batcher(backend)
    spy = Spy(backend, monkeypatch)
    params = RefineParams(num_inference_steps=40, strength=1.0)
    inputs = [scene(64, seed=i) for i in range(3)]

    async def main() -> list[tuple[list[ProgressEvent], Any]]:
        return await asyncio.gather(*(
            consume(request(batcher, [image], params, [i], f"r{i}"), stop_after=2 if i == 1 else None)
            for i, image in enumerate(inputs)
        ))

    results = asyncio.run(main())
    worker.shutdown()
    assert spy.calls == [("batch", [1, 1, 1])]
    assert results[1] == (results[1][0], "gone") and len(results[1][0]) == 2
    assert isinstance(spy.outcomes[0][1], Cancelled)  # its result was dropped ...
    for i in (0, 2):  # ... and the others ran every step and got theirs
        progress, finished = results[i]
        assert isinstance(finished, Finished) and [e.step for e in progress] == list(range(1, 41))
        assert max_diff(finished.value[0], backend.refine([inputs[i]], params, [i])[0]) <= TOLERANCE
    assert re.search(r"request r1 left the batch after step \d+ of 40 .*2 request\(s\) go on", caplog.text)


def test_the_loop_stops_when_every_member_stopped(backend: SDXLBackend, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="refiner_service")
    batcher, worker = make_batcher(backend)
    spy = Spy(backend, monkeypatch)
    params = RefineParams(num_inference_steps=200, strength=1.0)

    async def main() -> list[tuple[list[ProgressEvent], Any]]:
        return await asyncio.gather(*(
            consume(request(batcher, [scene(64, seed=i)], params, [i], f"r{i}"), stop_after=2 + i)
            for i in range(2)
        ))

    started = time.monotonic()
    asyncio.run(main())
    # The worker is free again only after the loop stopped: a new job runs right after.
    done = asyncio.run(_drain(worker.run(lambda ctx: "next", request_id="next")))
    worker.shutdown()
    assert done[-1].value == "next"
    assert all(isinstance(o, Cancelled) for o in spy.outcomes[0])
    stopped = re.search(r"stopping the denoising loop after step (\d+) of 200: every request", caplog.text)
    assert stopped and int(stopped.group(1)) < 200, caplog.text
    assert time.monotonic() - started < 60


def test_a_member_past_its_deadline_fails_alone_and_at_once(backend: SDXLBackend,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    batcher, worker = make_batcher(backend, window_s=0.05)
    spy = Spy(backend, monkeypatch)
    # Past the API's limit of 200 steps (built unvalidated): a call that surely outlasts the deadline.
    params = RefineParams.model_construct(num_inference_steps=300, strength=1.0)
    ended: dict[str, float] = {}

    async def timed(name: str, deadline: float | None) -> tuple[list[ProgressEvent], Any]:
        result = await consume(request(batcher, [scene(64)], params, [1], name, deadline))
        ended[name] = time.monotonic()
        return result

    async def main() -> list[tuple[list[ProgressEvent], Any]]:
        # The deadline passes once the call has run some steps: the window is 50 ms, the call takes seconds.
        deadline = time.monotonic() + 0.6
        return list(await asyncio.gather(timed("late", deadline), timed("patient", None)))

    (late_progress, late), (_, patient) = asyncio.run(main())
    worker.shutdown()
    assert spy.calls == [("batch", [1, 1])]
    assert isinstance(late, DeadlineExceeded), late
    assert 0 < len(late_progress) < 300
    assert isinstance(patient, Finished)
    assert ended["late"] < ended["patient"]  # told when it happened, not when the batch ended


def test_every_member_hears_a_worker_refusal(backend: SDXLBackend) -> None:
    batcher, worker = make_batcher(backend, window_s=0.05, max_queue=0)
    release = threading.Event()

    async def main() -> list[tuple[list[ProgressEvent], Any]]:
        blocker = asyncio.ensure_future(_drain(worker.run(lambda ctx: release.wait(10), request_id="busy")))
        await asyncio.sleep(0.05)
        try:
            return list(await asyncio.gather(*(
                consume(request(batcher, [scene(64)], RefineParams(**FAST), [i], f"r{i}")) for i in range(2)
            )))
        finally:
            release.set()
            await blocker

    results = asyncio.run(main())
    worker.shutdown()
    assert [type(r) for _, r in results] == [QueueFull, QueueFull]


# -- configuration and wiring --------------------------------------------------------------------------


def test_batching_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = RefinerSettings()
    assert settings.batch_window_ms == 5.0 and settings.max_batch_images == 4 and settings.batching
    assert not RefinerSettings(batch_window_ms=0).batching
    assert not RefinerSettings(max_batch_images=1).batching
    monkeypatch.setenv("TRELLISBOX_REFINER_BATCH_WINDOW_MS", "0")
    assert not RefinerSettings().batching


class _OneAtATime(ClassicBackend):
    """Classic restoration that records each call: it cannot share one, so it must never be asked to."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def refine(self, images: Sequence[Image.Image], params: RefineParams, seeds: Sequence[int],
               ctx: JobContext | None = None) -> list[Image.Image]:
        self.calls.append(len(images))
        return super().refine(images, params, seeds, ctx)

    def refine_batch(self, members: Sequence[BatchMember]) -> list[MemberOutcome]:
        raise AssertionError("a backend without batching support was given a batch")


@pytest.mark.parametrize(("backend_name", "window_s"), [("classic", 0.3), ("sdxl", 0.0)])
def test_requests_run_alone_without_batching(backend_name: str, window_s: float, backend: SDXLBackend) -> None:
    # Every request goes through the batcher; a backend that cannot share a call (classic), or a zero window,
    # makes each request its own job, exactly as unbatched.
    chosen: RefinerBackend = _OneAtATime() if backend_name == "classic" else backend
    batcher, worker = make_batcher(chosen, window_s=window_s)
    if isinstance(chosen, _OneAtATime):
        chosen.calls.clear()  # the warm-up's call
    params = RefineParams(strength=0.5, num_inference_steps=4)
    jobs_before = BATCH_REQUESTS.labels("batch-test")._sum.get()

    async def both() -> list[tuple[list[ProgressEvent], Any]]:
        return list(await asyncio.gather(*(
            consume(request(batcher, [scene(64, seed=i)], params, [i], f"alone-{i}")) for i in range(2))))

    results = asyncio.run(both())
    worker.shutdown()
    assert all(isinstance(result, Finished) for _, result in results)
    if isinstance(chosen, _OneAtATime):
        assert chosen.calls == [1, 1]
    assert BATCH_REQUESTS.labels("batch-test")._sum.get() - jobs_before == 2  # two jobs of one request each


@pytest.mark.integration
@pytest.mark.slow
def test_service_batches_concurrent_requests(tmp_path: Path, cache_home: Path) -> None:
    metrics_port = free_port()
    process = start_service(
        "refiner", "refiner_service",
        ["--backend", "sdxl", "--model", "tiny", "--device", "cpu", "--batch-window-ms", "1000",
         "--max-batch-images", "4", "--metrics-port", str(metrics_port)],
        tmp_path, env={"HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cache_home), "OMP_NUM_THREADS": "2"},
    )
    try:
        process.wait_ready("trellisbox.v1.RefinerService", 120)
        with grpc.insecure_channel(process.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            stub = refiner_pb2_grpc.RefinerServiceStub(channel)
            dones: dict[int, refiner_pb2.RefineDone] = {}

            def call(i: int) -> None:
                req = refiner_pb2.RefineRequest(
                    request_id=f"req-{i}",
                    images=[common_pb2.Image(data=png_bytes(scene(64, seed=i)))],
                    parameters=common_pb2.RefineParameters(seed=10 * i, prompt=f"object {i}", strength=0.5,
                                                           num_inference_steps=10),
                )
                for response in stub.Refine(req, timeout=60):
                    if response.WhichOneof("event") == "done":
                        dones[i] = response.done

            threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        assert sorted(dones) == [0, 1, 2]
        assert [list(dones[i].seeds) for i in range(3)] == [[0], [10], [20]]  # each kept its own seed
        log = process.log_tail(400)
        assert re.search(r"batched 3 requests \(3 images\) into one pipeline call", log), log
        assert "dynamic batching on: window 1000 ms, up to 4 images per call" in log
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert f'trellisbox_batch_images_count{{service="{"refiner"}"}} 1.0' in metrics, metrics
        assert f'trellisbox_batch_images_sum{{service="{"refiner"}"}} 3.0' in metrics
        assert f'trellisbox_batch_images_bucket{{le="2.0",service="{"refiner"}"}} 0.0' in metrics
    finally:
        process.stop()


def test_the_autoscaling_signal_counts_requests_not_batched_jobs(backend: SDXLBackend,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 requests outstanding, shared by a couple of batched jobs: the signal must read 8, not the job count.
    from refiner_service.servicer import RefinerServicer
    from trellisbox._runtime.observability import IMAGES_OUTSTANDING, REQUESTS_OUTSTANDING

    # Hold every pipeline call until the signal is read, so no batch can finish first on a slow or fast machine.
    release = threading.Event()
    for name in ("refine", "refine_batch"):
        monkeypatch.setattr(backend, name, _held_until(release, getattr(backend, name)))
    settings = RefinerSettings(batch_window_ms=300, max_batch_images=4, max_queue=8)
    host: ModelHost[RefinerBackend] = ModelHost("autoscale-test", 8, settings)
    host.start(lambda: backend)
    servicer = RefinerServicer(host, settings)
    request = refiner_pb2.RefineRequest(images=[common_pb2.Image(data=png_bytes(scene(64)))],
                                        parameters=common_pb2.RefineParameters(seed=1, **FAST))

    class Context:
        def time_remaining(self) -> None:
            return None

    seen: list[tuple[float, float, float]] = []

    async def main() -> None:
        calls = [asyncio.ensure_future(_drain_call(servicer.Refine(request, Context()))) for _ in range(8)]  # type: ignore[arg-type]
        for _ in range(200):  # bounded wait until all 8 are admitted
            if REQUESTS_OUTSTANDING.labels("autoscale-test")._value.get() == 8:
                break
            await asyncio.sleep(0.05)
        seen.append((REQUESTS_OUTSTANDING.labels("autoscale-test")._value.get(),
                     IMAGES_OUTSTANDING.labels("autoscale-test")._value.get(), float(host.worker.queue_depth
                                                                                      + host.worker.in_flight)))
        release.set()
        await asyncio.gather(*calls)

    asyncio.run(main())
    host.close()
    requests, images, jobs = seen[0]
    assert (requests, images) == (8, 8) and jobs <= 2, seen
    assert REQUESTS_OUTSTANDING.labels("autoscale-test")._value.get() == 0


def _held_until(release: threading.Event, call: Any) -> Any:
    def held(*args: Any, **kwargs: Any) -> Any:
        release.wait(60)
        return call(*args, **kwargs)
    return held


async def _drain_call(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass
