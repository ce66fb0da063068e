"""Gateway memory: peak RSS (``VmHWM`` in /proc/<pid>/status) of the gateway process while it relays 64
concurrent streams, each carrying one artifact of a known size (8 MiB, 1 MiB chunks) from the stub
TRELLIS service, which sends at once, so the gateway relays all 64 together.

Two cases, each on a fresh gateway process:

- ``fast readers``: 64 closed-loop clients that read as fast as they can (no parsing);
- ``stalled readers``: 64 calls that each read one message, then stop reading for 2 s once all 64 have
  started, then drain. What piles up in the gateway meanwhile is bounded only by HTTP/2 flow control
  (the client's window on each stream, the gateway's own receive window from the stage, and the one
  message in flight in the relay): the upper bound a slow client can cost.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Processes, object_image, png, rss_kib, summarize, wait_serving
from bench.load import closed_loop, stalled_streams
from tools.stack import ServiceProcess
from trellisbox._domain.contract import GATEWAY_SERVICE, TRELLIS_SERVICE
from trellisbox.client import build_request

MIB = 2**20


def _gateway(procs: Processes, stub: ServiceProcess, streams: int) -> ServiceProcess:
    gateway = procs.start("gateway-memory", "gateway",
                          ["--refiner-target", stub.target, "--trellis-target", stub.target,
                           "--max-concurrent", str(streams), "--max-queue", str(streams)])
    wait_serving(gateway.target, GATEWAY_SERVICE, 60, gateway)
    return gateway


def _once(procs: Processes, stub: ServiceProcess, case: str, streams: int, request: bytes, window: float,
          stall_s: float, artifact_mib: int) -> dict[str, Any]:
    gateway = _gateway(procs, stub, streams)
    try:
        closed_loop(gateway.target, request, 1, 0.0, 0.3)  # warm the call path up
        time.sleep(0.2)
        idle = rss_kib(gateway.process.pid)
        if case == "fast readers":
            load = closed_loop(gateway.target, request, streams, 0.0, window)
            calls, errors = load.completed, dict(load.errors)
        else:
            calls = stalled_streams(gateway.target, request, streams, stall_s)
            errors = {} if calls == streams else {"incomplete": streams - calls}
        peak = rss_kib(gateway.process.pid)
        time.sleep(0.5)
        after = rss_kib(gateway.process.pid)
    finally:
        procs.stop(gateway)
    return {
        "calls_completed": calls,
        "errors": errors,
        "relayed_mib": calls * artifact_mib,
        "idle_rss_mib": round(idle["VmRSS"] / 1024, 1),
        "peak_rss_mib": round(peak["VmHWM"] / 1024, 1),
        "rss_after_load_mib": round(after["VmRSS"] / 1024, 1),
        "peak_per_stream_mib": round((peak["VmHWM"] - idle["VmRSS"]) / 1024 / streams, 2),
    }


def run(procs: Processes, quick: bool, streams: int = 64, artifact_mib: int = 8, stall_s: float = 2.0
        ) -> dict[str, Any]:
    stub = procs.start("stub-trellis-memory", "bench.stubs",
                       ["--mode", "trellis", "--artifact-bytes", str(artifact_mib * MIB)])
    wait_serving(stub.target, TRELLIS_SERVICE, 60, stub)
    request = build_request([png(object_image(128))], generation={"seed": 1}, formats=["glb"]).SerializeToString()
    window = 1.5 if quick else 4.0
    repeats = 1 if quick else 3
    cases: dict[str, dict[str, Any]] = {}
    try:
        for case in ("fast readers", "stalled readers"):
            runs = [_once(procs, stub, case, streams, request, window, stall_s, artifact_mib) for _ in range(repeats)]
            cases[case] = {
                "peak_rss_mib": summarize([r["peak_rss_mib"] for r in runs], 1),
                "peak_per_stream_mib": summarize([r["peak_per_stream_mib"] for r in runs], 2),
                "idle_rss_mib": summarize([r["idle_rss_mib"] for r in runs], 1),
                "calls_completed": sum(r["calls_completed"] for r in runs),
                "relayed_mib": sum(r["relayed_mib"] for r in runs),
                "errors": sum(sum(r["errors"].values()) for r in runs),
                "runs": runs,
            }
    finally:
        procs.stop(stub)
    return {
        "method": f"{streams} concurrent streams, stub TRELLIS sends one {artifact_mib} MiB artifact (1 MiB chunks) "
                  f"per call; fast readers: closed loop for {window:g} s; stalled readers: one message, "
                  f"{stall_s:g} s pause, then drain; a fresh gateway for each of {repeats} runs per case",
        "repeats": repeats,
        "streams": streams,
        "artifact_mib": artifact_mib,
        "cases": cases,
    }
