#!/usr/bin/env python3
"""GPU lease benchmark (CPU only, a few seconds).

1. Hand-off latency of the ``flock`` backend between two processes: the time from one holder's
   ``release`` record to the other's ``acquire`` record (both ``time.monotonic()``, one clock for
   the host), while the other is blocked waiting. Includes the fencing-token bump and both record
   writes: what a service sees, not just the kernel wake-up.
2. Model swaps per job when two contender processes each have a queue of jobs, with hand-off
   batching on (bounded hold) and off (``max_hold_s=0``), using the real ``GpuTurns`` guard.

Writes bench/results/lease.json and prints a Markdown table.
Usage: python bench/lease_bench.py [--rounds 300] [--jobs 32] [--job-ms 2] [--swap-ms 5]
                                  [--max-hold-s 1.0 0.02]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from bench.common import percentile, write_json  # noqa: E402
from trellisbox._runtime.lease import FlockLease, GpuTurns, LeaseRecorder, read_records  # noqa: E402

RESULTS = REPO / "bench" / "results" / "lease.json"


# -- 1. hand-off latency ----------------------------------------------------------------------------


def _handoff_worker(index: int, lease_dir: str, record: str, rounds: int, start: Any, finished: Any) -> None:
    lease = FlockLease("gpu-0", f"proc-{index}", lease_dir, service=f"proc-{index}",
                       recorder=LeaseRecorder(record, backend="flock"))
    peer_done = finished[1 - index]
    start.wait()
    for _ in range(rounds):
        lease.acquire(timeout=30)
        time.sleep(0.0005)  # "GPU work"
        # Release only once the peer is blocked waiting, so every release is a real hand-off.
        deadline = time.monotonic() + 2.0
        while not lease.peer_waiting() and not peer_done.is_set() and time.monotonic() < deadline:
            time.sleep(0.0001)
        lease.release()
        lease.wait_for_peer(1.0)  # do not re-grab before the peer had its turn
    finished[index].set()
    lease.close()


def bench_handoff(rounds: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lease-bench-") as tmp:
        record = os.path.join(tmp, "handoff.jsonl")
        start = ctx.Barrier(2)
        finished = [ctx.Event(), ctx.Event()]
        procs = [ctx.Process(target=_handoff_worker, args=(i, tmp, record, rounds, start, finished))
                 for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
            if p.exitcode != 0:
                raise RuntimeError(f"hand-off worker failed with exit code {p.exitcode}")
        records = read_records(record)
    latencies: list[float] = []
    for before, after in itertools.pairwise(records):
        if before["event"] == "release" and after["event"] == "acquire" and before["holder"] != after["holder"]:
            latencies.append(after["t_mono"] - before["t_mono"])
    if not latencies:
        raise RuntimeError("no hand-offs were recorded")
    return {
        "backend": "flock", "processes": 2, "handoffs": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 4),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 4),
        "max_ms": round(max(latencies) * 1000, 4),
        "mean_ms": round(sum(latencies) / len(latencies) * 1000, 4),
    }


# -- 2. swaps per job -------------------------------------------------------------------------------


def _service_worker(name: str, lease_dir: str, record: str, jobs: int, job_s: float, swap_s: float,
                    max_hold_s: float, start: Any, out: Any) -> None:
    lease = FlockLease("gpu-0", name, lease_dir, service=name, recorder=LeaseRecorder(record, backend="flock"))
    pending = jobs

    def to_gpu() -> None:
        time.sleep(swap_s)  # stands in for copying the weights to the GPU

    turns = GpuTurns(lease, name, queue_depth=lambda: pending, on_acquire=to_gpu, on_release=lambda: None,
                     max_hold_s=max_hold_s)
    start.wait()
    began = time.monotonic()
    while pending > 0:
        pending -= 1  # the job leaves the queue as it starts, like ModelWorker.queue_depth
        with turns(None):
            time.sleep(job_s)
    turns.close()
    out.put({"service": name, "jobs": turns.stats.jobs, "swaps": turns.stats.swaps,
             "yields": turns.stats.yields, "wall_s": time.monotonic() - began,
             "wait_s": turns.stats.wait_s})


def bench_swaps(jobs: int, job_s: float, swap_s: float, max_hold_s: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lease-bench-") as tmp:
        record = os.path.join(tmp, "swaps.jsonl")
        start, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_service_worker,
                             args=(name, tmp, record, jobs, job_s, swap_s, max_hold_s, start, out))
                 for name in ("refiner", "trellis")]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        records = read_records(record)
    acquires = [r for r in records if r["event"] == "acquire"]
    alternations = sum(1 for a, b in itertools.pairwise(acquires) if a["holder"] != b["holder"])
    total_jobs = sum(r["jobs"] for r in results)
    swaps = sum(r["swaps"] for r in results)
    return {
        "batching": max_hold_s > 0, "max_hold_s": max_hold_s, "jobs_per_contender": jobs,
        "jobs": total_jobs, "swaps": swaps, "swaps_per_job": round(swaps / total_jobs, 4),
        "alternations": alternations, "wall_s": round(max(r["wall_s"] for r in results), 3),
        "job_ms": job_s * 1000, "swap_ms": swap_s * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="hand-offs per process")
    parser.add_argument("--jobs", type=int, default=32, help="queued jobs per contender")
    parser.add_argument("--job-ms", type=float, default=2.0)
    parser.add_argument("--swap-ms", type=float, default=5.0, help="simulated cost of one model swap")
    parser.add_argument("--max-hold-s", type=float, nargs="+", default=[1.0, 0.02],
                        help="bounded holds to try with batching on (batching off is always run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    started = time.monotonic()
    handoff = bench_handoff(args.rounds)
    swaps = [bench_swaps(args.jobs, args.job_ms / 1000, args.swap_ms / 1000, hold)
             for hold in (*args.max_hold_s, 0.0)]
    result: dict[str, Any] = {
        "benchmark": "gpu-lease", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "handoff": handoff, "swaps": swaps, "elapsed_s": round(time.monotonic() - started, 2),
    }
    write_json(args.out, result)

    print(f"## GPU lease benchmark ({result['machine']['cpus']} CPUs, {result['machine']['platform']})\n")
    print("| hand-off (flock, 2 processes) | hand-offs | p50 | p99 | max |")
    print("|---|---:|---:|---:|---:|")
    print(f"| release → peer's acquire | {handoff['handoffs']} | {handoff['p50_ms']:.3f} ms | "
          f"{handoff['p99_ms']:.3f} ms | {handoff['max_ms']:.3f} ms |")
    print(f"\n| {args.jobs} queued jobs per contender, 2 contenders | max_hold_s | jobs | swaps | swaps/job "
          "| alternations | wall |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in swaps:
        label = "hand-off batching on" if row["batching"] else "batching off"
        print(f"| {label} | {row['max_hold_s']:g} | {row['jobs']} | {row['swaps']} | {row['swaps_per_job']:.3f} | "
              f"{row['alternations']} | {row['wall_s']:.3f} s |")
    print(f"\n(job {args.job_ms:g} ms, swap {args.swap_ms:g} ms; total {result['elapsed_s']} s; "
          f"written to {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
