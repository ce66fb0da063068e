"""GPU turns: hand-off batching, bounded hold, fairness, failure handling, ModelWorker wiring."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import Histogram

from tests.lease.lease_helpers import Occupancy, check_records, wait_until
from trellisbox._domain.errors import Cancelled, DeadlineExceeded, Unavailable
from trellisbox._runtime.lease import (
    FlockLease,
    GpuTurns,
    LeaseRecorder,
    LeaseSettings,
    make_gpu_turns,
    make_lease,
    residency_hooks,
)
from trellisbox._runtime.lease.turns import LEASE_HOLD, LEASE_WAIT
from trellisbox._runtime.worker import JobContext, ModelWorker

pytestmark = pytest.mark.timeout(60)


class FakeGpu:
    """Tracks which model is resident: a model may only arrive once the previous one was parked."""

    def __init__(self) -> None:
        self.resident: str | None = None
        self.errors: list[str] = []
        self.busy = Occupancy()

    def load(self, who: str) -> None:
        if self.resident not in (None, who):
            self.errors.append(f"{who} moved onto the GPU while {self.resident} was still resident")
        self.resident = who

    def park(self, who: str) -> None:
        if self.resident == who:
            self.resident = None


class FakeService:
    """A model service in miniature: a queue of jobs run one at a time through a GpuTurns guard."""

    def __init__(self, name: str, lease_dir: Path, gpu: FakeGpu, *, jobs: int, job_s: float, max_hold_s: float,
                 record: Path | None = None, swap_s: float = 0.0, watch_peer: bool = False) -> None:
        self.name, self.gpu, self.job_s, self.swap_s = name, gpu, job_s, swap_s
        self.watch_peer = watch_peer
        self.pending = jobs
        self.lease = FlockLease("gpu-0", name, lease_dir, service=name,
                                recorder=LeaseRecorder(record) if record else None)
        self.turns = GpuTurns(self.lease, name, queue_depth=lambda: self.pending, on_acquire=self._to_gpu,
                              on_release=self._park, max_hold_s=max_hold_s)
        self.waits: list[float] = []
        # With watch_peer: per turn (numbered by swaps), how many of its jobs started while a peer waited.
        self.jobs_with_peer_waiting: dict[int, int] = {}

    def _to_gpu(self) -> None:
        time.sleep(self.swap_s)
        self.gpu.load(self.name)

    def _park(self) -> None:
        self.gpu.park(self.name)

    def run_one(self) -> None:
        self.pending -= 1
        asked = time.monotonic()
        with self.turns(JobContext(f"{self.name}-job", None, lambda _: None)):
            self.waits.append(time.monotonic() - asked)
            if self.watch_peer and self.lease.peer_waiting():
                turn = self.turns.stats.swaps
                self.jobs_with_peer_waiting[turn] = self.jobs_with_peer_waiting.get(turn, 0) + 1
            self.gpu.busy.enter(self.name)
            if self.gpu.resident != self.name:
                self.gpu.errors.append(f"{self.name} computed while {self.gpu.resident} was resident")
            time.sleep(self.job_s)
            self.gpu.busy.leave(self.name)

    def run_all(self, barrier: threading.Barrier | None = None) -> None:
        if barrier is not None:
            barrier.wait()
        while self.pending > 0:
            self.run_one()


def _race(services: list[FakeService]) -> None:
    barrier = threading.Barrier(len(services))
    threads = [threading.Thread(target=s.run_all, args=(barrier,)) for s in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40)
    assert not any(t.is_alive() for t in threads)
    for s in services:
        s.turns.close()


def test_batching_makes_far_fewer_swaps_than_2n(tmp_path: Path, record_path: Path) -> None:
    n, gpu = 16, FakeGpu()
    services = [FakeService(name, tmp_path, gpu, jobs=n, job_s=0.003, max_hold_s=10.0, record=record_path)
                for name in ("refiner", "trellis")]
    _race(services)
    swaps = sum(s.turns.stats.swaps for s in services)
    assert sum(s.turns.stats.jobs for s in services) == 2 * n
    assert swaps <= 4, f"{swaps} swaps for {2 * n} jobs with batching"
    assert not gpu.errors and not gpu.busy.violations
    check_records(record_path)


def test_without_batching_contenders_alternate_at_about_2n_swaps(tmp_path: Path, record_path: Path) -> None:
    n, gpu = 16, FakeGpu()
    services = [FakeService(name, tmp_path, gpu, jobs=n, job_s=0.01, max_hold_s=0.0, record=record_path)
                for name in ("refiner", "trellis")]
    _race(services)
    swaps = sum(s.turns.stats.swaps for s in services)
    # ~2N: every job is a turn. A few may merge when, on 2 busy CPUs, the peer was not yet back in
    # line when a job ended (a holder keeps the GPU when nobody waits).
    assert swaps >= 2 * n - n // 4, f"only {swaps} swaps: the contenders did not alternate"
    assert not gpu.errors and not gpu.busy.violations
    summary = check_records(record_path)["summary"]["gpu-0"]
    assert summary["alternations"] >= swaps - 2  # a service that yielded never re-grabbed first


def test_bounded_hold_and_waiting_peer_gets_the_gpu(tmp_path: Path, record_path: Path) -> None:
    """A holder with work queued yields to a waiting peer once it has held for max_hold_s.

    Counted in jobs, not seconds, so that a stalled thread on shared CPUs cannot fail it: every job
    sleeps at least ``job`` s, so after j jobs of one turn the holder has held for at least j × job,
    and it keeps the GPU past a job's end only while it has held for less than max_hold. At most
    max_hold / job + 1 of its jobs can therefore start while the peer waits.
    """
    gpu, max_hold, job = FakeGpu(), 0.15, 0.01
    busy = FakeService("trellis", tmp_path, gpu, jobs=1_000_000, job_s=job, max_hold_s=max_hold,
                       record=record_path, watch_peer=True)
    light = FakeService("refiner", tmp_path, gpu, jobs=0, job_s=job, max_hold_s=max_hold, record=record_path)
    runner = threading.Thread(target=busy.run_all)
    runner.start()
    try:
        for _ in range(3):  # the light service's jobs arrive while the busy one keeps its queue full
            time.sleep(0.2)
            light.pending = 1
            light.run_one()
    finally:
        busy.pending = 0  # the busy service had work queued all along; stop it now
        runner.join(timeout=30)
    assert not runner.is_alive()
    for s in (busy, light):
        s.turns.close()
    assert len(light.waits) == 3 and light.turns.stats.swaps == 3  # the peer got the GPU for every job
    assert busy.turns.stats.yields >= 3  # ... each time because the busy holder yielded with work queued
    assert not gpu.errors and not gpu.busy.violations
    bound = max_hold / job + 1
    # Usually none: the peer arrives during a job whose end is past max_hold, and the holder yields there.
    assert max(busy.jobs_with_peer_waiting.values(), default=0) <= bound, busy.jobs_with_peer_waiting
    turns = check_records(record_path)["turns"]
    assert len([t for t in turns if t.contender.startswith("trellis")]) >= 3


def test_lease_wait_and_hold_are_histograms_per_turn(tmp_path: Path) -> None:
    """Each turn observes its wait (once per acquisition) and its hold (acquired to given up, the jobs inside)."""
    gpu, n, job = FakeGpu(), 6, 0.02
    services = [FakeService(name, tmp_path, gpu, jobs=n, job_s=job, max_hold_s=0.0)
                for name in ("metrics-refiner", "metrics-trellis")]
    _race(services)
    for service in services:
        turns = service.turns.stats.swaps
        assert LEASE_WAIT.labels(service.name)._sum.get() == pytest.approx(service.turns.stats.wait_s)
        assert _count(LEASE_WAIT, service.name) == turns
        assert _count(LEASE_HOLD, service.name) == turns
        assert LEASE_HOLD.labels(service.name)._sum.get() >= n * job  # every job ran inside a held turn


def _count(histogram: Histogram, service: str) -> float:
    return sum(sample.value for metric in histogram.collect() for sample in metric.samples
               if sample.name.endswith("_count") and sample.labels["service"] == service)


def test_holder_keeps_the_gpu_past_max_hold_when_nobody_waits(tmp_path: Path) -> None:
    gpu = FakeGpu()
    solo = FakeService("refiner", tmp_path, gpu, jobs=30, job_s=0.005, max_hold_s=0.02)
    solo.run_all()
    solo.turns.close()
    assert solo.turns.stats.swaps == 1 and solo.turns.stats.yields == 0


def test_idle_release_when_queued_job_never_starts(tmp_path: Path) -> None:
    gpu = FakeGpu()
    svc = FakeService("refiner", tmp_path, gpu, jobs=1, job_s=0.001, max_hold_s=10.0)
    svc.turns.idle_release_s = 0.1
    svc.pending = 2  # the queue claims one more job, which is then cancelled before it runs
    svc.run_one()
    assert svc.turns.holding
    assert wait_until(lambda: not svc.turns.holding, 2.0)
    assert not svc.lease.held and gpu.resident is None
    other = FlockLease("gpu-0", "peer", tmp_path)
    assert other.acquire(timeout=1) > 0


def test_failed_on_acquire_gives_the_gpu_back(tmp_path: Path) -> None:
    lease = FlockLease("gpu-0", "a", tmp_path)
    calls: list[str] = []

    def explode() -> None:
        raise RuntimeError("CUDA out of memory")

    turns = GpuTurns(lease, "refiner", queue_depth=lambda: 0, on_acquire=explode,
                     on_release=lambda: calls.append("park"), max_hold_s=1)
    with pytest.raises(RuntimeError, match="out of memory"), turns(None):
        pass
    assert not lease.held and calls == ["park"] and not turns.holding


def test_wait_limits_deadline_and_cancel(tmp_path: Path) -> None:
    holder = FlockLease("gpu-0", "holder", tmp_path)
    holder.acquire()
    turns = GpuTurns(FlockLease("gpu-0", "b", tmp_path), "refiner", queue_depth=lambda: 0,
                     on_acquire=lambda: None, on_release=lambda: None, max_hold_s=1, wait_s=0.2,
                     handoff_grace_s=0.05)
    with pytest.raises(Unavailable, match=r"no turn on GPU gpu-0 within 0\.2 s"), turns(None):
        pass
    job = JobContext("r1", time.monotonic() + 0.1, lambda _: None)
    turns.wait_s = 30
    with pytest.raises(DeadlineExceeded, match="waiting"), turns(job):
        pass
    job = JobContext("r2", None, lambda _: None)
    threading.Timer(0.1, job.cancel).start()
    with pytest.raises(Cancelled), turns(job):
        pass
    holder.release()
    with turns(JobContext("r3", None, lambda _: None)):
        assert turns.lease.held


def test_residency_hooks() -> None:
    log: list[str] = []
    moves = {name: (lambda n=name: log.append(n)) for name in ("to_gpu", "to_host", "load", "unload")}
    resident = residency_hooks("resident", to_gpu=moves["to_gpu"])
    resident.on_acquire()
    resident.on_release()
    offload = residency_hooks("offload", to_gpu=moves["to_gpu"], to_host=moves["to_host"])
    offload.on_acquire()
    offload.on_release()
    unload = residency_hooks("unload", to_gpu=moves["to_gpu"], load=moves["load"], unload=moves["unload"])
    unload.on_acquire()
    unload.on_release()
    assert log == ["to_gpu", "to_gpu", "to_host", "load", "to_gpu", "unload"]
    with pytest.raises(ValueError, match="to_host"):
        residency_hooks("offload", to_gpu=moves["to_gpu"])
    with pytest.raises(ValueError, match="load and unload"):
        residency_hooks("unload", to_gpu=moves["to_gpu"], load=moves["load"])


def test_make_gpu_turns_follows_placement(tmp_path: Path) -> None:
    hooks = residency_hooks("resident", to_gpu=lambda: None)
    assert make_gpu_turns(LeaseSettings(), "refiner", queue_depth=lambda: 0, hooks=hooks) is None
    assert make_lease(LeaseSettings(), "refiner") is None
    settings = LeaseSettings(placement="shared", lease_dir=tmp_path, lease_record=tmp_path / "r.jsonl",
                             max_hold_s=3, lease_wait_s=7)
    turns = make_gpu_turns(settings, "refiner", queue_depth=lambda: 0, hooks=hooks)
    assert isinstance(turns, GpuTurns) and isinstance(turns.lease, FlockLease)
    assert (turns.max_hold_s, turns.wait_s) == (3, 7)
    with turns(None):
        pass
    turns.close()
    assert [r["event"] for r in check_records(tmp_path / "r.jsonl")["records"]] == ["acquire", "release"]


def test_wired_into_two_model_workers(tmp_path: Path, record_path: Path) -> None:
    """The real ModelWorker hook: two services on one event loop share a GPU; each batch of queued
    jobs costs one swap, and the recorded turns never overlap."""
    gpu = FakeGpu()

    async def main() -> dict[str, int]:
        workers: dict[str, ModelWorker] = {}
        turns: dict[str, GpuTurns] = {}
        for name in ("refiner", "trellis"):
            settings = LeaseSettings(placement="shared", lease_dir=tmp_path, lease_record=record_path,
                                     lease_holder=f"pod-{name}", max_hold_s=5)
            hooks = residency_hooks("offload", to_gpu=functools.partial(gpu.load, name),
                                    to_host=functools.partial(gpu.park, name))
            t = make_gpu_turns(settings, name, queue_depth=functools.partial(lambda n: workers[n].queue_depth, name),
                               hooks=hooks)
            assert t is not None
            turns[name] = t
            workers[name] = ModelWorker(name, max_queue=16, gpu_turn=t)

        def job_for(name: str):  # type: ignore[no-untyped-def]
            def job(ctx: JobContext) -> str:
                gpu.busy.enter(name)
                assert gpu.resident == name
                time.sleep(0.004)
                gpu.busy.leave(name)
                return name
            return job

        async def call(name: str, i: int) -> str:
            result = ""
            async for item in workers[name].run(job_for(name), request_id=f"{name}-{i}"):
                result = getattr(item, "value", result)
            return result

        results = await asyncio.gather(*(call(name, i) for i in range(8) for name in ("refiner", "trellis")))
        assert sorted(results) == ["refiner"] * 8 + ["trellis"] * 8
        for name in workers:
            workers[name].call_blocking(turns[name].close)
            workers[name].shutdown()
        return {name: t.stats.swaps for name, t in turns.items()}

    swaps = asyncio.run(main())
    assert sum(swaps.values()) <= 4, swaps  # 16 jobs, far fewer than 16 swaps
    assert not gpu.errors and not gpu.busy.violations
    check_records(record_path)
