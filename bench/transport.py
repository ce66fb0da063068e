"""Artifact transport: MiB/s of a large artifact from the TRELLIS service through the gateway to a client,
against a bare grpcio server streaming the same bytes in the same chunks, in the same run.

Only the streaming phase is timed, at the client: from the arrival of the first artifact chunk to the
arrival of the last one. The TRELLIS servicer starts streaming only after its model job has finished,
so generation time is not in the window; what is in it is the trellis servicer chunking, both gRPC
hops, the gateway's relay and the client's reassembly (order and size checks, the CRC-32C of each chunk). The
client code is the same for both rows (``TrellisBoxClient.frames`` + ``collect``, as ``generate`` reads a call).
It runs in this process for the headline rows, and in fresh processes for the rows of :func:`fresh_clients`
(``python -m bench.transport TARGET ...`` is one of those).

Throughput on a shared 2-core machine moves with other people's load, so each row also gives the CPU
time every process spent per MiB streamed (``/proc/<pid>/task/*/schedstat``, read when the first chunk arrives
and after the last): the cost of the code path, which load barely moves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Processes,
    object_image,
    png,
    run_child,
    start_raw_relay,
    summarize,
    thread_cpu_seconds,
    usable_cores,
    wait_serving,
)
from tools.stack import LocalStack, ServiceProcess, free_port
from trellisbox._domain.artifacts import CHUNK_EVENT_FIELD, read_chunk_frame
from trellisbox._domain.contract import GATEWAY_SERVICE, TRELLIS_SERVICE
from trellisbox._domain.wire import single_field
from trellisbox._runtime.allocator import RECEIVING
from trellisbox.client import TrellisBoxClient, build_request
from trellisbox.v1 import gateway_pb2

MIB = 2**20


@dataclass
class StreamTiming:
    total_bytes: int  # artifact bytes received
    window_bytes: int  # bytes received after the first chunk (the timed part)
    window_s: float  # first chunk -> last chunk
    request_s: float  # call start -> done
    cpu_s: dict[str, float]  # CPU seconds per process between the first chunk and the end of the call

    @property
    def mib_s(self) -> float:
        return self.window_bytes / MIB / self.window_s if self.window_s > 0 else float("nan")


def _cpu(pids: dict[str, int | None]) -> dict[str, float]:
    # Per thread, to the nanosecond: /proc/<pid>/stat counts in 10 ms ticks, a tenth of a bare stream's 5 calls.
    return {name: thread_cpu_seconds(pid) for name, pid in pids.items()}


def timed_stream(client: TrellisBoxClient, request: gateway_pb2.GenerateRequest,
                 pids: dict[str, int | None]) -> tuple[StreamTiming, Any]:
    """Run one Generate call, timing the chunk phase; returns the timing and the collected result.

    The call is read as ``TrellisBoxClient.generate`` reads it (``frames`` + ``collect``); only the first chunk is
    looked into here (its size: what arrived before the window opened). ``pids`` names the processes whose CPU
    time is taken (None: this one, the client).
    """
    arrivals: list[float] = []
    first_chunk_bytes = 0
    cpu_start: dict[str, float] = {}

    def watch(frames: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal first_chunk_bytes
        for frame in frames:
            if single_field(frame) == CHUNK_EVENT_FIELD:
                arrivals.append(time.perf_counter())
                if not cpu_start:
                    cpu_start.update(_cpu(pids))
                    framed = read_chunk_frame(frame)
                    first_chunk_bytes = len(framed[1]) if framed is not None else 0
            yield frame

    started = time.perf_counter()
    result = client.collect(watch(client.frames(request)))
    elapsed = time.perf_counter() - started
    cpu_end = _cpu(pids)
    if not arrivals:
        raise RuntimeError("the call returned no artifact chunk")
    total = sum(len(a.data) for a in result.artifacts)
    cpu = {name: cpu_end[name] - cpu_start[name] for name in pids}
    timing = StreamTiming(total, total - first_chunk_bytes, arrivals[-1] - arrivals[0], elapsed, cpu)
    return timing, result


def big_image(quick: bool) -> bytes:
    """The PNG of the large-artifact request: a noisy object, whose baked texture does not compress."""
    return png(object_image(512 if quick else 1024, seed=7, noisy=True))


def big_generation(quick: bool) -> dict[str, Any]:
    """Preview settings that make a large GLB (+ PLY): full-resolution mesh, 4096² texture of noise."""
    return {"seed": 1, "mesh_simplify": 0.0, "texture_size": 2048 if quick else 4096}


def big_request(quick: bool) -> gateway_pb2.GenerateRequest:
    """The large-artifact request: :func:`big_image` with :func:`big_generation`, GLB and PLY."""
    return build_request([big_image(quick)], generation=big_generation(quick), formats=["glb", "ply"])


def measure(target: str, request: gateway_pb2.GenerateRequest, repeats: int, pids: dict[str, int | None],
            warmup: int = 1) -> tuple[list[StreamTiming], Any]:
    timings: list[StreamTiming] = []
    result = None
    with TrellisBoxClient(target, timeout=600, max_message_bytes=64 * MIB) as client:
        for i in range(warmup + repeats):
            result = None  # a client handling one result at a time has let the last one go before the next call
            timing, result = timed_stream(client, request, pids)
            if i >= warmup:
                timings.append(timing)
    return timings, result


@contextlib.contextmanager
def bare_server(procs: Processes, files: list[Path], chunk_bytes: int) -> Iterator[ServiceProcess]:
    """The bare grpcio server streaming ``files`` in ``chunk_bytes`` chunks, SERVING, stopped on exit."""
    bare = procs.start("bare", "bench.stubs", ["--mode", "bare", "--chunk-bytes", str(chunk_bytes),
                                                "--file", *map(str, files)], port=free_port())
    try:
        wait_serving(bare.target, GATEWAY_SERVICE, 60, bare)
        yield bare
    finally:
        procs.stop(bare)


def bare_rate(procs: Processes, files: list[Path], chunk_bytes: int, repeats: int) -> list[StreamTiming]:
    with bare_server(procs, files, chunk_bytes) as bare:
        return measure(bare.target, gateway_pb2.GenerateRequest(), repeats,
                       {"bare server": bare.process.pid, "client": None})[0]


def relay_rate(procs: Processes, bare: ServiceProcess, repeats: int) -> list[StreamTiming]:
    """The bare server's stream through a raw relay (``bench/stubs.py --mode relay``): two hops and three processes,
    as served, with nothing but grpcio on the path."""
    relay = start_raw_relay(procs, bare.target)
    try:
        return measure(relay.target, gateway_pb2.GenerateRequest(), repeats,
                       {"bare server": bare.process.pid, "raw relay": relay.process.pid, "client": None})[0]
    finally:
        procs.stop(relay)


def _row(timings: list[StreamTiming]) -> dict[str, Any]:
    mib = sum(t.total_bytes for t in timings) / MIB
    return {
        "mib_s": summarize([t.mib_s for t in timings], 1),
        "stream_s": summarize([t.window_s for t in timings], 4),
        "request_s": summarize([t.request_s for t in timings], 4),  # the whole call: what moved out of the window
        "artifact_mib": round(timings[0].total_bytes / MIB, 2),
        "cpu_ms_per_mib": {name: round(sum(t.cpu_s[name] for t in timings) * 1000 / mib, 2)
                           for name in timings[0].cpu_s},
    }


def cpu_bound(served: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """The most the served stream can reach on this machine's cores at the CPU it spends per MiB, all its processes
    together: no scheduling gets more MiB/s out of the cores than ``cores / CPU per MiB``. Against the bare stream as
    measured, that bounds "served / bare" from above, whatever the relay does with its time."""
    cores = usable_cores()
    served_cpu = sum(served["cpu_ms_per_mib"].values())
    most = cores * 1000 / served_cpu
    return {"cores": cores, "served_cpu_ms_per_mib": round(served_cpu, 2),
            "bare_cpu_ms_per_mib": round(sum(bare["cpu_ms_per_mib"].values()), 2),
            "served_max_mib_s": round(most, 1), "ratio_to_bare_max": round(most / bare["mib_s"]["median"], 3)}


#: The client processes of :func:`fresh_clients`: glibc's defaults, and the receiving profile (what the ``trellisbox``
#: command applies, and any program gets from :meth:`~trellisbox._runtime.allocator.MallocProfile.environment`).
CLIENT_ALLOCATORS: dict[str, dict[str, str]] = {"glibc defaults": {}, "receiving profile": RECEIVING.environment()}


def fresh_clients(target: str, served: bool, quick: bool, repeats: int,
                  pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The same streams read by a client in a fresh process, once with each of :data:`CLIENT_ALLOCATORS`.

    The client of the other rows is this benchmark process, whose allocator has been shaped by all it ran before
    (glibc raises its mmap threshold each time a larger block is freed), so its CPU per MiB depends on what ran
    first. A fresh process has no such history: these rows are what a program that receives artifacts spends.
    ``served``: the served request (its generation runs for every call) rather than the bare server's stream.
    """
    args = [target, "--repeats", str(repeats), "--pids", json.dumps(pids), *(["--served"] if served else []),
            *(["--quick"] if quick else [])]
    return {name: run_child("bench.transport", args, env) for name, env in CLIENT_ALLOCATORS.items()}


def run(stack: LocalStack, procs: Processes, quick: bool, repeats: int) -> dict[str, Any]:
    """Headline: the real TRELLIS service (preview) through the real gateway vs a bare grpcio stream."""
    request = big_request(quick)
    stack_pids = {"trellis": stack.processes["trellis"].process.pid,
                  "gateway": stack.processes["gateway"].process.pid}
    served, result = measure(stack.gateway_target, request, repeats, {**stack_pids, "client": None})
    fresh_served = fresh_clients(stack.gateway_target, True, quick, 1 if quick else 3, stack_pids)
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        files = []
        for artifact in result.artifacts:
            path = Path(tmp) / f"{getattr(artifact.kind, 'name', artifact.kind)}.bin"
            path.write_bytes(artifact.data)
            files.append(path)
        with bare_server(procs, files, 2**20) as server:
            bare = measure(server.target, gateway_pb2.GenerateRequest(), max(repeats, 5),
                           {"bare server": server.process.pid, "client": None})[0]
            relayed = relay_rate(procs, server, max(repeats, 5))
            fresh_bare = fresh_clients(server.target, False, quick, max(repeats, 5),
                                       {"bare server": server.process.pid})
    served_row, bare_row, floor_row = _row(served), _row(bare), _row(relayed)
    ratio = served_row["mib_s"]["median"] / bare_row["mib_s"]["median"]
    return {
        "method": "client-side first chunk -> last chunk; bytes after the first chunk / that time",
        "artifacts": [{"kind": str(getattr(a.kind, "name", a.kind)), "bytes": len(a.data)} for a in result.artifacts],
        "chunk_bytes": 2**20,
        "served": served_row,
        "bare": bare_row,
        "ratio_to_bare": round(ratio, 3),
        # The same bytes from the bare server through a raw relay: two hops and three processes, as served, with
        # nothing of this project in them. Served against it: how close the whole served path comes to bare gRPC.
        "relay_floor": floor_row,
        "ratio_to_relay_floor": round(served_row["mib_s"]["median"] / floor_row["mib_s"]["median"], 3),
        "floor_ratio_to_bare": round(floor_row["mib_s"]["median"] / bare_row["mib_s"]["median"], 3),
        # The most the served path's CPU per MiB lets it reach on these cores, against bare.
        "cpu_bound": cpu_bound(served_row, bare_row),
        # Both streams read by a client in a fresh process, with glibc's defaults and with the receiving profile.
        "fresh_client": {name: {"served": fresh_served[name], "bare": fresh_bare[name]} for name in CLIENT_ALLOCATORS},
    }


def run_chunk_sweep(procs: Processes, gateway_args: list[str], sizes: list[int], artifact_bytes: int,
                    repeats: int) -> list[dict[str, Any]]:
    """Chunk size sweep with the stub TRELLIS (no generation between calls), gateway in between, vs bare."""
    rows = []
    request = build_request([png(object_image(64))], generation={"seed": 1})
    with tempfile.TemporaryDirectory(prefix="bench-chunks-") as tmp:
        payload_path = Path(tmp) / "payload.bin"
        for chunk in sizes:
            stub = procs.start(f"stub-trellis-{chunk}", "bench.stubs",
                               ["--mode", "trellis", "--artifact-bytes", str(artifact_bytes),
                                "--chunk-bytes", str(chunk)])
            wait_serving(stub.target, TRELLIS_SERVICE, 60, stub)
            gateway = procs.start(f"gateway-chunks-{chunk}", "gateway",
                                  ["--refiner-target", stub.target, "--trellis-target", stub.target, *gateway_args])
            wait_serving(gateway.target, GATEWAY_SERVICE, 60, gateway)
            served, result = measure(gateway.target, request, repeats,
                                     {"trellis stub": stub.process.pid, "gateway": gateway.process.pid,
                                      "client": None})
            procs.stop(gateway)
            procs.stop(stub)
            payload_path.write_bytes(result.artifacts[0].data)
            bare = bare_rate(procs, [payload_path], chunk, repeats)
            served_row, bare_row = _row(served), _row(bare)
            rows.append({"chunk_bytes": chunk, "served": served_row, "bare": bare_row,
                         "ratio_to_bare": round(served_row["mib_s"]["median"] / bare_row["mib_s"]["median"], 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """One client process of :func:`fresh_clients`: its row (``_row``) as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=main.__doc__)
    parser.add_argument("target")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pids", default="{}", help="JSON: the other processes whose CPU per MiB is taken, by name")
    parser.add_argument("--served", action="store_true", help="send the served request, not the bare server's")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    request = big_request(args.quick) if args.served else gateway_pb2.GenerateRequest()
    timings, _ = measure(args.target, request, args.repeats, {**json.loads(args.pids), "client": None})
    print(json.dumps(_row(timings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
