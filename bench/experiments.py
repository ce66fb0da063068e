"""Experiments behind the tuning decisions in docs/benchmarks.md; not part of ``make bench``.

    python -m bench.experiments malloc      # the gateway relaying a 48 MiB stream with and without its
                                            #   malloc setting (tune_malloc), alternating in one run
    python -m bench.experiments grpc-args   # HTTP/2 flow-control arguments (BDP, lookahead, frame size)
                                            #   on a raw relay in the gateway's place
    python -m bench.experiments loop        # latency of small calls while the gateway validates big images
                                            #   (run it in another checkout to compare code versions)
    python -m bench.experiments faults      # CPU time and page faults per request of every process of the
                                            #   stack, model services' malloc profile on and off
    python -m bench.experiments client      # the client's CPU per MiB received, step by step, and its check
                                            #   of each chunk (CRC-32C) against hashing (SHA-256)
    python -m bench.experiments processes   # the same 3D-only job in fresh processes: how much one process's
                                            #   compute differs from the next, benchmark-like and service-like
    python -m bench.experiments small-chunks  # one 3D-only call's GLB through a raw relay in smaller chunks
                                            #   (would the two hops overlap?)
    python -m bench.experiments grpc-experiments  # gRPC core's read-path experiments (GRPC_EXPERIMENTS) on the
                                            #   whole stream: stub TRELLIS, raw relay and client
    python -m bench.experiments gateway-hop  # one 3D-only call's bytes through the gateway and through a raw
                                            #   grpcio relay, from the same bare server: what the gateway adds
    python -m bench.experiments process-pairs  # the same 3D-only job in two identical processes alive at once,
                                            #   jobs alternating, a fresh pair each round: process or drift?
    python -m bench.experiments grpc-costs  # gRPC's own cost per call, per message and per MiB, one hop and two
                                            #   (bare servers, raw relays): what the gRPC floor is made of
    python -m bench.experiments stage-gap   # the TRELLIS service's stage times called directly and through the
                                            #   gateway, alternating, by progress interval, against the same
                                            #   compute in this process
    python -m bench.experiments worker-gap  # the same 3D-only job in this process on this thread, on another, and
                                            #   through the service's model worker, alternating: no gRPC, one process
    python -m bench.experiments service-threads  # the TRELLIS service's CPU per call thread by thread (event loop,
                                            #   model thread, encoding, gRPC's), against the same compute here

Each prints its rows and writes ``bench/results/experiment-<name>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import subprocess  # nosec B404  # the benchmark's own child processes
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c

from bench.common import (
    REPO,
    Processes,
    child_env,
    exit_on_sigterm,
    machine_info,
    minor_faults,
    object_image,
    png,
    run_child,
    start_bare_and_relay,
    start_raw_relay,
    summarize,
    thread_cpu_seconds,
    wait_serving,
)
from bench.load import closed_loop
from bench.stubs import payload
from bench.transport import MIB, _row, measure
from trellisbox._domain.artifacts import read_chunk_frame
from trellisbox._domain.contract import GATEWAY_SERVICE, REFINER_SERVICE, TRELLIS_SERVICE
from trellisbox.client import TrellisBoxClient, build_request
from trellisbox.v1 import gateway_pb2

ARTIFACT_BYTES = 48 * MIB


def _3d_only_call() -> tuple[gateway_pb2.GenerateRequest, bytes]:
    """The overhead benchmark's 3D-only call (its 512² image and generation settings, GLB only) and the GLB it returns,
    computed in this process: what the experiments that replay that call's bytes send and expect back."""
    from bench.overhead import GENERATION, InProcess

    data = png(object_image(512))
    glb, _ = InProcess().run(data, False)
    return build_request([data], generation=GENERATION, formats=["glb"]), glb


def _small_request() -> Any:
    return build_request([png(object_image(64))], generation={"seed": 1})


def malloc(procs: Processes, rounds: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(rounds):
        for setting in ("default", "tuned"):
            env = {"TRELLISBOX_MALLOC": "default"} if setting == "default" else {}
            stub = procs.start("stub", "bench.stubs", ["--mode", "trellis", "--artifact-bytes", str(ARTIFACT_BYTES)])
            wait_serving(stub.target, TRELLIS_SERVICE, 60, stub)
            gateway = procs.start("gateway", "gateway", ["--refiner-target", stub.target,
                                                         "--trellis-target", stub.target], env=env)
            wait_serving(gateway.target, GATEWAY_SERVICE, 60, gateway)
            timings, _ = measure(gateway.target, _small_request(), repeats,
                                 {"trellis stub": stub.process.pid, "gateway": gateway.process.pid, "client": None})
            procs.stop(gateway)
            procs.stop(stub)
            rows.append({"malloc": setting, **_row(timings)})
            print(json.dumps(rows[-1]["cpu_ms_per_mib"]), setting, rows[-1]["mib_s"]["median"], flush=True)
    return rows


GRPC_ARGS: dict[str, list[tuple[str, int]]] = {
    "defaults (BDP probing on)": [],
    "BDP off, lookahead 1 MiB": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", MIB)],
    "BDP off, lookahead 4 MiB": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4 * MIB)],
    "BDP off, lookahead 16 MiB": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * MIB)],
    "max frame 1 MiB": [("grpc.http2.max_frame_size", MIB)],
}


def grpc_args(procs: Processes, rounds: int, repeats: int) -> list[dict[str, Any]]:
    stub = procs.start("stub", "bench.stubs", ["--mode", "trellis", "--artifact-bytes", str(ARTIFACT_BYTES)])
    wait_serving(stub.target, TRELLIS_SERVICE, 60, stub)
    rows = []
    for _ in range(rounds):
        for name, args in GRPC_ARGS.items():
            relay = start_raw_relay(procs, stub.target, "--grpc-args", json.dumps(args), name="relay")
            timings, _ = measure(relay.target, _small_request(), repeats,
                                 {"trellis stub": stub.process.pid, "relay": relay.process.pid, "client": None})
            procs.stop(relay)
            rows.append({"grpc_args": name, **_row(timings)})
            print(name, rows[-1]["mib_s"]["median"], json.dumps(rows[-1]["cpu_ms_per_mib"]), flush=True)
    procs.stop(stub)
    return rows


def loop(procs: Processes, seconds: float, big_side: int = 2048) -> dict[str, Any]:
    """Small 3D-only calls, one at a time, alone and while 2 clients keep sending big noisy PNGs."""
    stub = procs.start("stub", "bench.stubs", ["--mode", "trellis", "--artifact-bytes", str(64 * 1024)])
    wait_serving(stub.target, TRELLIS_SERVICE, 60, stub)
    gateway = procs.start("gateway", "gateway", ["--refiner-target", stub.target, "--trellis-target", stub.target,
                                                 "--max-concurrent", "16", "--max-queue", "64"])
    wait_serving(gateway.target, GATEWAY_SERVICE, 60, gateway)
    small = _small_request().SerializeToString()
    big_png = png(object_image(big_side, seed=3, noisy=True))
    big_request = build_request([big_png], generation={"seed": 1})
    result: dict[str, Any] = {"big_image": f"{big_side}x{big_side} noisy RGBA PNG, {len(big_png) / MIB:.1f} MiB"}
    def load(stop: threading.Event) -> None:
        # The synchronous client in threads: grpc.aio wants one event loop per process.
        with TrellisBoxClient(gateway.target, timeout=60) as client:
            while not stop.is_set():  # bounded: stopped below
                for _ in client.stream(big_request):
                    pass

    for label, background in (("alone", 0), ("with 2 clients sending big images", 2)):
        stop = threading.Event()
        threads = [threading.Thread(target=load, args=(stop,), daemon=True) for _ in range(background)]
        for thread in threads:
            thread.start()
        if threads:
            time.sleep(1.0)
        run = closed_loop(gateway.target, small, 1, 0.0, seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        latencies = sorted(run.latencies_s)
        result[label] = {"calls": len(latencies), "latency_ms": summarize([x * 1000 for x in latencies], 1),
                         "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1),
                         "mean_ms": round(statistics.fmean(latencies) * 1000, 1)}
        print(label, json.dumps(result[label]), flush=True)
    procs.stop(gateway)
    procs.stop(stub)
    return result


def faults(log_dir: Path, rounds: int, repeats: int) -> list[dict[str, Any]]:
    """The overhead benchmark's requests (512², classic refiner, preview TRELLIS) through a fresh stack per
    setting: CPU milliseconds and minor page faults per request in each process. ``default`` runs every process
    with glibc's allocator defaults (``TRELLISBOX_MALLOC=default``), ``tuned`` with the services' profiles."""
    from bench.common import thread_cpu_seconds
    from bench.overhead import GENERATION, ONE_THREAD, REFINE
    from tools.stack import LocalStack

    data = png(object_image(512))
    rows = []
    for round_ in range(rounds):
        for setting in ("default", "tuned"):
            env = {**ONE_THREAD, **({"TRELLISBOX_MALLOC": "default"} if setting == "default" else {})}
            with LocalStack(log_dir / f"faults-{round_}-{setting}", refiner_args=["--backend", "classic"],
                            trellis_args=["--backend", "preview"], ready_timeout=300, env=env) as stack, \
                    TrellisBoxClient(stack.gateway_target, timeout=300) as client:
                pids = {name: stack.processes[name].process.pid for name in ("gateway", "refiner", "trellis")}
                for case, refine in (("refine_and_3d", True), ("3d_only", False)):
                    options: dict[str, Any] = {"refine": refine, "generation": GENERATION, "formats": ["glb"],
                                               **({"refine_params": REFINE} if refine else {})}
                    for _ in range(3):  # warm-up
                        client.generate([data], **options)
                    cpu0 = {name: thread_cpu_seconds(pid) for name, pid in pids.items()}
                    faults0 = {name: minor_faults(pid) for name, pid in pids.items()}
                    for _ in range(repeats):
                        client.generate([data], **options)
                    cpu = {name: thread_cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
                    row = {"malloc": setting, "case": case, "requests": repeats,
                           "cpu_ms_per_request": {name: round(v * 1000 / repeats, 1) for name, v in cpu.items()},
                           "minor_faults_per_request": {name: round((minor_faults(pid) - faults0[name]) / repeats)
                                                        for name, pid in pids.items()}}
                    rows.append(row)
                    print(setting, case, row["cpu_ms_per_request"], row["minor_faults_per_request"], flush=True)
    return rows


def _drain(frames: Iterator[bytes]) -> None:
    for _ in frames:
        pass


def _read(frames: Iterator[bytes]) -> None:
    for frame in frames:
        read_chunk_frame(frame)


def _read_crc32c(frames: Iterator[bytes]) -> None:
    for frame in frames:
        read = read_chunk_frame(frame)
        if read is not None:
            crc32c.crc32c(read[1])


def _read_sha256(frames: Iterator[bytes]) -> None:
    digest = hashlib.sha256()
    for frame in frames:
        read = read_chunk_frame(frame)
        if read is not None:
            digest.update(read[1])


CLIENT_STEPS: dict[str, Callable[[Iterator[bytes]], object]] = {
    "receive: gRPC only, frames dropped": _drain,
    "+ chunk frames read (read_chunk_frame)": _read,
    "+ CRC-32C of each chunk": _read_crc32c,
    "+ SHA-256 of each chunk instead": _read_sha256,
    "TrellisBoxClient.collect: read, checked, kept": TrellisBoxClient.collect,
}


def client(procs: Processes, rounds: int, repeats: int) -> list[dict[str, Any]]:
    """The client (this process) reading the transport benchmark's sizes (41.4 + 13.0 MiB, incompressible, 1 MiB
    chunks) from a bare server: CPU milliseconds per MiB of each step in :data:`CLIENT_STEPS`, and of the whole
    ``collect`` on chunks without a CRC-32C (a server older than the field: checked with SHA-256, as every client did
    before the field). Steps and servers alternate within each round."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        files = [Path(tmp) / "glb.bin", Path(tmp) / "ply.bin"]
        for path, size in zip(files, (round(41.4 * MIB), 13 * MIB), strict=True):
            path.write_bytes(payload(size))
        mib = sum(path.stat().st_size for path in files) / MIB
        servers = {chunks: procs.start(f"bare-{chunks}", "bench.stubs", [
            "--mode", "bare", "--file", *map(str, files), *(["--legacy-chunks"] if chunks == "legacy" else [])])
            for chunks in ("with CRC-32C", "legacy")}
        for server in servers.values():
            wait_serving(server.target, GATEWAY_SERVICE, 60, server)
        cases = [(name, "with CRC-32C", step) for name, step in CLIENT_STEPS.items()]
        cases.append(("TrellisBoxClient.collect on chunks without CRC-32C: SHA-256 of the whole (before)", "legacy",
                      TrellisBoxClient.collect))
        for round_ in range(rounds):
            order = cases if round_ % 2 == 0 else cases[::-1]
            for name, chunks, step in order:
                with TrellisBoxClient(servers[chunks].target, timeout=60, max_message_bytes=64 * MIB) as client:
                    step(client.frames(gateway_pb2.GenerateRequest()))  # warm-up
                    cpu = []
                    for _ in range(repeats):
                        started = time.process_time()
                        step(client.frames(gateway_pb2.GenerateRequest()))
                        cpu.append((time.process_time() - started) * 1000 / mib)
                rows.append({"round": round_, "step": name, "chunks": chunks,
                             "cpu_ms_per_mib": summarize(cpu, 3)})
                print(f"{round_} {name}: {rows[-1]['cpu_ms_per_mib']['median']:.2f} ms/MiB", flush=True)
    return rows


#: The two arms of :func:`processes`: the overhead benchmark's in-process run (glibc's allocator defaults, the main
#: thread), and the TRELLIS service's (its allocator profile, applied before any thread starts, and a worker thread).
PROCESS_ARMS = ("benchmark-like", "service-like")


def compute_in_this_process(arm: str, jobs: int) -> dict[str, Any]:
    """A child of :func:`processes`: the overhead benchmark's 3D-only in-process job (decode, preview generate, GLB
    export), ``jobs`` times after one warm-up, as ``arm`` runs it; wall and CPU milliseconds and minor page faults
    per job (medians)."""
    from bench.overhead import InProcess
    from trellisbox._runtime.allocator import MODEL, tune_malloc

    if arm == "service-like":
        tune_malloc(MODEL)
    data = png(object_image(512))
    local = InProcess()
    per_job: list[tuple[float, float, int]] = []

    def run() -> None:
        for i in range(jobs + 1):
            faults0 = minor_faults()
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            local.run(data, False)
            wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
            if i:
                per_job.append((wall, cpu, minor_faults() - faults0))

    if arm == "service-like":
        worker = threading.Thread(target=run, name="model")
        worker.start()
        worker.join()
    else:
        run()
    return {"arm": arm, "jobs": jobs, "wall_ms": round(statistics.median(w for w, _, _ in per_job) * 1000, 1),
            "cpu_ms": round(statistics.median(c for _, c, _ in per_job) * 1000, 1),
            "minor_faults": statistics.median(f for _, _, f in per_job)}


def processes(rounds: int, jobs: int) -> dict[str, Any]:
    """The overhead benchmark compares the TRELLIS service's compute with the same compute in the benchmark process:
    two processes. This runs that compute in ``2 * rounds`` fresh processes, the two arms of :data:`PROCESS_ARMS`
    alternating, each the median of ``jobs`` jobs: how far one process's time is from the next one's, and whether the
    service's way of running it (allocator profile, worker thread) is slower by itself."""
    from bench.overhead import ONE_THREAD

    rows = []
    for round_ in range(rounds):
        for arm in PROCESS_ARMS:
            child = run_child("bench.experiments", ["processes", "--child", arm, "--repeats", str(jobs)], ONE_THREAD)
            rows.append({"round": round_, **child})
            print(json.dumps(rows[-1]), flush=True)
    walls = {arm: [row["wall_ms"] for row in rows if row["arm"] == arm] for arm in PROCESS_ARMS}
    paired = [service - benchmark for benchmark, service in zip(*walls.values(), strict=True)]
    summary = {arm: {**summarize(values, 1), "sd": round(statistics.stdev(values), 1) if len(values) > 1 else None}
               for arm, values in walls.items()}
    summary["service-like − benchmark-like, per round"] = {**summarize(paired, 1),
                                                            "mean": round(statistics.fmean(paired), 1)}
    print(json.dumps(summary, indent=1), flush=True)
    return {"processes": rows, "summary": summary}


def serve_jobs() -> None:
    """A child of :func:`process_pairs`: runs the overhead benchmark's 3D-only in-process job (the benchmark's way:
    glibc's defaults, main thread) each time a line arrives on stdin, and answers with its wall milliseconds."""
    from bench.overhead import InProcess

    data = png(object_image(512))
    local = InProcess()
    for _ in sys.stdin:
        started = time.perf_counter()
        local.run(data, False)
        print(json.dumps({"wall_ms": (time.perf_counter() - started) * 1000}), flush=True)


def _job_in(child: subprocess.Popen[str]) -> float:
    """Have a :func:`serve_jobs` child run one job; its wall milliseconds."""
    assert child.stdin is not None and child.stdout is not None  # nosec B101  # for mypy: pipes
    child.stdin.write("run\n")
    child.stdin.flush()
    wall: float = json.loads(child.stdout.readline())["wall_ms"]
    return wall


def process_pairs(rounds: int, pairs: int) -> dict[str, Any]:
    """Is the process lottery of :func:`processes` the processes, or the machine's speed drifting between them?

    Each round starts two identical children (:func:`serve_jobs`), warms both up, then runs ``pairs`` jobs in each,
    alternating A B B A so that a drift of the machine's speed weighs on both alike. Per round: each child's median,
    and the median of the per-pair differences A − B. Drift cancels in that difference; what is left, and varies from
    round to round beyond its own noise, belongs to the processes."""
    from bench.overhead import ONE_THREAD

    command = [sys.executable, "-m", "bench.experiments", "process-pairs", "--child", "serve-jobs"]
    rows = []
    for round_ in range(rounds):
        children = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,  # nosec B603
                                     cwd=REPO, env=child_env(ONE_THREAD)) for _ in range(2)]
        try:
            for _ in range(3):  # warm-up
                for child in children:
                    _job_in(child)
            walls: list[list[float]] = [[], []]
            for i in range(pairs):
                order = (0, 1) if i % 2 == 0 else (1, 0)
                for which in order:
                    walls[which].append(_job_in(children[which]))
        finally:
            for child in children:
                assert child.stdin is not None  # nosec B101  # for mypy: a pipe
                child.stdin.close()
                child.wait(timeout=60)
        differences = [a - b for a, b in zip(*walls, strict=True)]
        half = len(differences) // 2
        rows.append({"round": round_, "A_ms": round(statistics.median(walls[0]), 1),
                     "B_ms": round(statistics.median(walls[1]), 1),
                     "A_minus_B_ms": round(statistics.median(differences), 1),
                     # the same difference from each half of the round: how steady it is within one pair of processes
                     "A_minus_B_halves_ms": [round(statistics.median(differences[:half]), 1),
                                             round(statistics.median(differences[half:]), 1)],
                     "jobs_ms": {"A": [round(x) for x in walls[0]], "B": [round(x) for x in walls[1]]}})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "jobs_ms"}), flush=True)
    across = [row["A_minus_B_ms"] for row in rows]
    summary = {"A − B per round": {**summarize(across, 1), "sd": round(statistics.stdev(across), 1)
                                   if len(across) > 1 else None},
               "A, B medians per round": summarize([row[k] for row in rows for k in ("A_ms", "B_ms")], 1)}
    print(json.dumps(summary, indent=1), flush=True)
    return {"pairs_per_round": pairs, "rounds": rows, "summary": summary}


#: Chunk sizes of :func:`small_chunks`: the served default, and smaller ones that would let the relay start sending
#: a piece of the GLB while the next one is still arriving.
SMALL_CHUNKS = (MIB, 256 * 1024, 128 * 1024)


def small_chunks(procs: Processes, repeats: int) -> dict[str, Any]:
    """One 3D-only call's bytes (the overhead benchmark's 512² request, 5 progress events, its 0.74 MiB GLB) from a bare
    server through a raw relay to ``TrellisBoxClient``, the GLB cut in each of :data:`SMALL_CHUNKS`; the calls
    alternate between the sizes. Wall milliseconds per call."""
    request, glb = _3d_only_call()
    with tempfile.TemporaryDirectory(prefix="bench-small-chunks-") as tmp:
        path = Path(tmp) / "glb.bin"
        path.write_bytes(glb)
        clients: dict[int, TrellisBoxClient] = {}
        for size in SMALL_CHUNKS:
            _, relay = start_bare_and_relay(procs, f"chunks-{size}", path, 5, "--chunk-bytes", str(size))
            clients[size] = TrellisBoxClient(relay.target, timeout=60)
        wall_ms: dict[int, list[float]] = {size: [] for size in SMALL_CHUNKS}
        try:
            for i in range(repeats + 1):  # the first round warms every path up
                for size, client in clients.items():
                    started = time.perf_counter()
                    result = client.collect(client.frames(request))
                    if result.glb != glb:
                        raise RuntimeError(f"{size}-byte chunks: the GLB came back changed")
                    if i:
                        wall_ms[size].append((time.perf_counter() - started) * 1000)
        finally:
            for client in clients.values():
                client.close()
    rows = {f"{size // 1024} KiB chunks": summarize(values, 2) for size, values in wall_ms.items()}
    for name, row in rows.items():
        print(f"{name}: {row['median']:.2f} ms per call (p10 {row['p10']:.2f})", flush=True)
    return {"glb_bytes": len(glb), "wall_ms_per_call": rows}


#: The settings of :func:`grpc_experiments`: gRPC core's experiments on the read path, named in ``GRPC_EXPERIMENTS``
#: (``src/core/lib/experiments/experiments.yaml`` in grpc/grpc).
GRPC_EXPERIMENT_SETTINGS = {
    "defaults": "",
    "tcp_rcv_lowat (SO_RCVLOWAT: fewer wake-ups on reads)": "tcp_rcv_lowat",
    "tcp_frame_size_tuning (reads sized to the message)": "tcp_frame_size_tuning",
    "both": "tcp_rcv_lowat,tcp_frame_size_tuning",
}


def grpc_experiments(procs: Processes, rounds: int, repeats: int) -> list[dict[str, Any]]:
    """The stub TRELLIS's 48 MiB through a raw relay to a client, every process started with each setting of
    :data:`GRPC_EXPERIMENT_SETTINGS` (gRPC reads ``GRPC_EXPERIMENTS`` once, as a process starts: the client is a
    child too); settings alternate within each round. CPU milliseconds per MiB of each process while the stream
    runs, and MiB/s, as the transport benchmark measures them."""
    rows = []
    for round_ in range(rounds):
        for name, experiments in GRPC_EXPERIMENT_SETTINGS.items():
            env = {"GRPC_EXPERIMENTS": experiments}
            stub = procs.start("stub", "bench.stubs", ["--mode", "trellis", "--artifact-bytes", str(ARTIFACT_BYTES)],
                               env=env)
            wait_serving(stub.target, TRELLIS_SERVICE, 60, stub)
            relay = procs.start("relay", "bench.stubs", ["--mode", "relay", "--upstream", stub.target], env=env)
            wait_serving(relay.target, GATEWAY_SERVICE, 60, relay)
            pids = {"trellis stub": stub.process.pid, "relay": relay.process.pid}
            # The client: the transport benchmark's, in a child that starts with the setting (bench.transport).
            measured = run_child("bench.transport", [relay.target, "--repeats", str(repeats), "--pids",
                                                     json.dumps(pids)], env)
            procs.stop(relay)
            procs.stop(stub)
            rows.append({"round": round_, "setting": name, "mib_s": measured["mib_s"]["median"],
                         "cpu_ms_per_mib": measured["cpu_ms_per_mib"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def gateway_hop(procs: Processes, rounds: int, repeats: int) -> dict[str, Any]:
    """What the gateway's own code adds to a call, against gRPC's: the overhead benchmark's 3D-only request and its
    GLB (6 progress events, the most the served call delivers, its progress being rate-bounded; 1 MiB chunks) from one
    bare server (``bench/stubs.py``), through the project's gateway (a classic refiner behind it, not called) or
    through the raw grpcio relay of the gRPC floor row, calls alternating. Per round: medians of the wall
    milliseconds per call, of the CPU milliseconds per call of the hop (gateway or relay), the bare server and the
    client, and of the per-pair wall difference."""
    from bench.overhead import GrpcFloor

    request, glb = _3d_only_call()
    floor = GrpcFloor(procs, glb, 6)
    refiner = procs.start("refiner", "refiner_service", ["--backend", "classic"])
    wait_serving(refiner.target, REFINER_SERVICE, 60, refiner)
    gateway = procs.start("gateway", "gateway", ["--refiner-target", refiner.target,
                                                 "--trellis-target", floor.bare.target])
    wait_serving(gateway.target, GATEWAY_SERVICE, 60, gateway)
    hops = {"gateway": (gateway.process.pid, TrellisBoxClient(gateway.target, timeout=60)),
            "raw relay": (floor.relay.process.pid, TrellisBoxClient(floor.relay.target, timeout=60))}
    bare_pid = floor.bare.process.pid
    rows = []
    try:
        for round_ in range(rounds):
            per_call: dict[str, dict[str, list[float]]] = {
                hop: {"wall_ms": [], "hop_cpu_ms": [], "bare_cpu_ms": [], "client_cpu_ms": []} for hop in hops}
            for i in range(repeats + 1):  # the first call of each warms up
                for hop, (pid, client) in hops.items():
                    hop0, bare0, client0 = thread_cpu_seconds(pid), thread_cpu_seconds(bare_pid), thread_cpu_seconds()
                    started = time.perf_counter()
                    result = client.collect(client.frames(request))
                    wall = time.perf_counter() - started
                    client1, hop1, bare1 = thread_cpu_seconds(), thread_cpu_seconds(pid), thread_cpu_seconds(bare_pid)
                    if result.glb != glb:
                        raise RuntimeError(f"the {hop} returned other bytes than the GLB")
                    if i:
                        for key, value in (("wall_ms", wall), ("hop_cpu_ms", hop1 - hop0),
                                           ("bare_cpu_ms", bare1 - bare0), ("client_cpu_ms", client1 - client0)):
                            per_call[hop][key].append(value * 1000)
            walls = [per_call["gateway"]["wall_ms"], per_call["raw relay"]["wall_ms"]]
            rows.append({"round": round_, **{hop: {key: round(statistics.median(values), 2)
                                                   for key, values in figures.items()}
                                             for hop, figures in per_call.items()},
                         "gateway − raw relay, wall ms per pair": round(statistics.median(
                             g - r for g, r in zip(*walls, strict=True)), 2)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for _, client in hops.values():
            client.close()
        procs.stop(gateway)
        procs.stop(refiner)
        floor.close()
    summary = {f"{figure}, gateway − raw relay (per round)":
               [round(row["gateway"][figure] - row["raw relay"][figure], 2) for row in rows]
               for figure in ("wall_ms", "hop_cpu_ms", "client_cpu_ms", "bare_cpu_ms")}
    print(json.dumps(summary, indent=1), flush=True)
    return {"glb_bytes": len(glb), "calls_per_hop_per_round": repeats, "rounds": rows, "summary": summary}


#: The call shapes of :func:`grpc_costs`: (progress events, the artifact's size as a multiple of the 3D-only GLB, or
#: None for 1 KiB). Messages and bytes vary one at a time around the served 3D-only call (6 events, one GLB).
GRPC_COST_SHAPES = ((0, 1.0), (6, 1.0), (24, 1.0), (6, None), (6, 4.0))


def _shape_name(progress: int, glb_multiple: float | None) -> str:
    return f"{progress} progress, {'1 KiB' if glb_multiple is None else f'{glb_multiple:g} × GLB'}"


def _messages(progress: int, artifact_bytes: int) -> int:
    """The messages of a call that streams one artifact: its progress events, its 1 MiB chunks, ``done``."""
    return progress + -(-artifact_bytes // MIB) + 1


def _fit_costs(points: list[tuple[int, float, float]]) -> dict[str, float]:
    """Least squares of ``ms = per call + per message × messages + per MiB × MiB`` over (messages, MiB, ms)."""
    import numpy as np

    design = np.array([[1.0, messages, mib] for messages, mib, _ in points])
    (per_call, per_message, per_mib), *_ = np.linalg.lstsq(design, np.array([ms for *_, ms in points]), rcond=None)
    return {"per_call_ms": round(float(per_call), 3), "per_message_ms": round(float(per_message), 3),
            "per_mib_ms": round(float(per_mib), 3)}


def grpc_costs(procs: Processes, rounds: int, repeats: int) -> dict[str, Any]:
    """What gRPC alone charges for a call, a message and a MiB, on this machine: the shapes of :data:`GRPC_COST_SHAPES`
    from bare servers (``bench/stubs.py``), each reached directly (one hop) and through a raw relay (two hops, the gRPC
    floor row's path), by ``TrellisBoxClient`` with the 3D-only request; calls alternate over every shape and path.
    Per round: the median wall milliseconds per shape and path, and the least-squares fit of per call, per message
    (progress, chunk, done) and per MiB for each path. The fit, at the served 3D-only call's shape, is what its gRPC
    floor is made of."""
    request, glb = _3d_only_call()
    with tempfile.TemporaryDirectory(prefix="bench-grpc-costs-") as tmp:
        paths: dict[tuple[str, str], tuple[TrellisBoxClient, bytes, int]] = {}
        for progress, multiple in GRPC_COST_SHAPES:
            artifact = b"\x00" * 1024 if multiple is None else glb * int(multiple)
            name = _shape_name(progress, multiple)
            path = Path(tmp) / f"{len(paths)}.bin"
            path.write_bytes(artifact)
            bare, relay = start_bare_and_relay(procs, f"shape-{len(paths)}", path, progress)
            messages = _messages(progress, len(artifact))
            for hops, target in (("1 hop", bare.target), ("2 hops", relay.target)):
                paths[(name, hops)] = (TrellisBoxClient(target, timeout=60), artifact, messages)
        rows: list[dict[str, Any]] = []
        try:
            for round_ in range(rounds):
                wall_ms: dict[tuple[str, str], list[float]] = {key: [] for key in paths}
                for i in range(repeats + 1):  # the first call of each path warms it up
                    for key, (client, artifact, _) in paths.items():
                        started = time.perf_counter()
                        result = client.collect(client.frames(request))
                        wall = time.perf_counter() - started
                        if result.glb != artifact:
                            raise RuntimeError(f"{key}: other bytes came back")
                        if i:
                            wall_ms[key].append(wall * 1000)
                medians = {key: statistics.median(values) for key, values in wall_ms.items()}
                fits = {hops: _fit_costs([(paths[key][2], len(paths[key][1]) / MIB, ms)
                                          for key, ms in medians.items() if key[1] == hops])
                        for hops in ("1 hop", "2 hops")}
                rows.append({"round": round_, "median_ms": {f"{name}, {hops}": round(ms, 2)
                                                            for (name, hops), ms in medians.items()},
                             "fit": fits})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            for client, _, _ in paths.values():
                client.close()
    served = (_messages(6, len(glb)), len(glb) / MIB)  # the served 3D-only call: 6 events, the GLB, done
    summary: dict[str, Any] = {}
    for hops in ("1 hop", "2 hops"):
        for term in ("per_call_ms", "per_message_ms", "per_mib_ms"):
            summary[f"{hops}: {term}"] = summarize([row["fit"][hops][term] for row in rows], 3)
        summary[f"{hops}: the 3D-only call's shape, fitted ms"] = summarize(
            [row["fit"][hops]["per_call_ms"] + row["fit"][hops]["per_message_ms"] * served[0]
             + row["fit"][hops]["per_mib_ms"] * served[1] for row in rows], 2)
        summary[f"{hops}: the 3D-only call's shape, measured ms"] = summarize(
            [row["median_ms"][f"{_shape_name(6, 1.0)}, {hops}"] for row in rows], 2)
    print(json.dumps(summary, indent=1), flush=True)
    return {"glb_bytes": len(glb), "shapes": [_shape_name(*shape) for shape in GRPC_COST_SHAPES],
            "calls_per_path_per_round": repeats, "rounds": rows, "summary": summary}


#: The TRELLIS services of :func:`stage_gap`, by their progress interval: the default, and one long enough that only
#: each stage's first event and the job's last go out (the fewest the gate sends).
STAGE_GAP_INTERVALS = {"progress every 0.1 s (default)": "0.1", "progress at stage starts only (60 s)": "60"}


def _staged_ms(timings: dict[str, float]) -> float:
    """The TRELLIS service's own stage times (all but the queue), in milliseconds."""
    return sum(seconds for stage, seconds in timings.items() if stage != "QUEUED") * 1000


def stage_gap(procs: Processes, rounds: int, repeats: int) -> dict[str, Any]:
    """Does the path around the TRELLIS service slow its compute? The overhead benchmark finds its stage times a few ms
    above the same compute in the benchmark process. Here the same service process is called directly (the
    ``TrellisService`` stub, one hop) and through the gateway (the served path: every progress event relayed to the
    client), for each of :data:`STAGE_GAP_INTERVALS`, with the same compute in this process (the overhead benchmark's
    in-process run, with the SHA-256 the service puts on the GLB): each arm's three calls in a new random order every
    time, the arms too. Per round: medians of the service's stage times and of its CPU per call, by path, and of the
    per-call differences gateway − direct and direct − in-process."""
    import grpc

    from bench.overhead import GENERATION, ONE_THREAD, InProcess
    from trellisbox._domain.convert import params_to_proto, stage_name
    from trellisbox._domain.params import GenerationParams
    from trellisbox.v1 import common_pb2, trellis_pb2

    request, glb = _3d_only_call()
    direct_request = trellis_pb2.ImageTo3DRequest(images=request.images, formats=[common_pb2.ARTIFACT_KIND_GLB])
    params_to_proto(GenerationParams(**GENERATION), direct_request.parameters)  # type: ignore[arg-type]
    refiner = procs.start("refiner", "refiner_service", ["--backend", "classic"], env=ONE_THREAD)
    wait_serving(refiner.target, REFINER_SERVICE, 60, refiner)
    arms = {}
    for arm, interval in STAGE_GAP_INTERVALS.items():
        trellis = procs.start(f"trellis-{interval}", "trellis_service", ["--backend", "preview"],
                              env={**ONE_THREAD, "TRELLISBOX_TRELLIS_PROGRESS_INTERVAL_S": interval})
        wait_serving(trellis.target, TRELLIS_SERVICE, 120, trellis)
        gateway = procs.start(f"gateway-{interval}", "gateway", ["--refiner-target", refiner.target,
                                                                  "--trellis-target", trellis.target], env=ONE_THREAD)
        wait_serving(gateway.target, GATEWAY_SERVICE, 60, gateway)
        channel = grpc.insecure_channel(trellis.target, options=[("grpc.max_receive_message_length", 64 * MIB)])
        call = channel.unary_stream(f"/{TRELLIS_SERVICE}/ImageTo3D",
                                    request_serializer=trellis_pb2.ImageTo3DRequest.SerializeToString,
                                    response_deserializer=trellis_pb2.ImageTo3DResponse.FromString)
        arms[arm] = (trellis.process.pid, call, channel, TrellisBoxClient(gateway.target, timeout=60))

    def direct(call: Any) -> tuple[dict[str, float], bytes]:
        timings: dict[str, float] = {}
        data = bytearray()
        for response in call(direct_request, timeout=60):
            if response.HasField("chunk"):
                data += response.chunk.data
            elif response.HasField("done"):
                timings = {stage_name(t.stage): t.seconds for t in response.done.timings}
        return timings, bytes(data)

    local = InProcess()
    image = request.images[0].data

    def in_process_ms() -> float:
        """The overhead benchmark's in-process 3D-only run, its ``3D`` stage (generate and GLB export; the decode
        is outside the service's stages too), plus the GLB's SHA-256 (inside them)."""
        glb_here, stages = local.run(image, False)
        started = time.perf_counter()
        hashlib.sha256(glb_here).digest()
        if glb_here != glb:
            raise RuntimeError("the in-process GLB differs from the served one")
        return (stages["3D"] + time.perf_counter() - started) * 1000

    rows: list[dict[str, Any]] = []
    order = random.Random(0)  # nosec B311  # a shuffle, not a secret
    try:
        for round_ in range(rounds):
            per_call: dict[str, dict[str, list[float]]] = {
                arm: {key: [] for key in ("direct stages ms", "gateway stages ms", "direct TRELLIS CPU ms",
                                          "gateway TRELLIS CPU ms", "gateway − direct stages ms",
                                          "direct − in-process ms")} for arm in arms}
            in_process: list[float] = []
            for i in range(repeats + 1):  # the first pair of each arm warms it up
                # Each arm's three calls in a new random order each time: a fixed order biased paired figures by a
                # few ms (worker-gap, docs/benchmarks.md item 37).
                for arm in order.sample(list(arms), len(arms)):
                    pid, call, _, client = arms[arm]
                    staged: dict[str, float] = {}
                    cpu: dict[str, float] = {}
                    here_ms = 0.0
                    for path in order.sample(["direct", "gateway", "in-process"], 3):
                        if path == "in-process":
                            here_ms = in_process_ms()
                            continue
                        cpu0 = thread_cpu_seconds(pid)
                        if path == "direct":
                            timings, data = direct(call)
                        else:
                            result = client.collect(client.frames(request))
                            timings, data = result.timings, result.glb or b""
                        cpu[path] = (thread_cpu_seconds(pid) - cpu0) * 1000
                        staged[path] = _staged_ms(timings)
                        if data != glb:
                            raise RuntimeError(f"{arm}, {path}: the GLB came back changed")
                    if i:
                        in_process.append(here_ms)
                        figures = per_call[arm]
                        figures["direct − in-process ms"].append(staged["direct"] - here_ms)
                        figures["direct stages ms"].append(staged["direct"])
                        figures["gateway stages ms"].append(staged["gateway"])
                        figures["direct TRELLIS CPU ms"].append(cpu["direct"])
                        figures["gateway TRELLIS CPU ms"].append(cpu["gateway"])
                        figures["gateway − direct stages ms"].append(staged["gateway"] - staged["direct"])
            rows.append({"round": round_, "in-process ms": round(statistics.median(in_process), 2),
                         **{arm: {key: round(statistics.median(values), 2) for key, values in figures.items()}
                            for arm, figures in per_call.items()}})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for _, _, channel, client in arms.values():
            channel.close()
            client.close()
    summary = {f"{arm}: {figure}, per round": [row[arm][figure] for row in rows]
               for arm in arms for figure in ("gateway − direct stages ms", "direct − in-process ms")}
    print(json.dumps(summary, indent=1), flush=True)
    return {"pairs_per_arm_per_round": repeats, "rounds": rows, "summary": summary}


def _voluntary_switches(task: Path | None = None) -> int:
    """How often a thread has given up its core so far, waiting for something (a lock, the GIL, I/O): its
    ``voluntary_ctxt_switches`` (Linux). ``task``: its ``/proc/<pid>/task/<tid>`` folder; None: the calling thread."""
    task = task or Path(f"/proc/self/task/{threading.get_native_id()}")
    return int((task / "status").read_text().split("\nvoluntary_ctxt_switches:")[1].split()[0])


def worker_gap(rounds: int, repeats: int, malloc_profile: str) -> dict[str, Any]:
    """Is the TRELLIS service's compute slower than in-process because of how the service runs it, with gRPC and the
    second process out of the picture? The same 3D-only job in this process, in five arms, alternating (in a new
    random order each time, so that no arm always follows the same other):

    - ``this thread``: decode, generate, GLB export and SHA-256 on this thread, as the overhead benchmark's in-process
      run does;
    - ``a thread``: the same on one other thread, waited for;
    - ``model worker``: the service's own machinery: the image decoded on an event loop, the job on a
      :class:`~trellisbox._runtime.worker.ModelWorker` thread reporting its progress through the gate at the service's
      default interval, the GLB exported and hashed on another thread;
    - ``model worker, encoded on its thread``: the same, the GLB exported and hashed at the end of the job;
    - ``model worker, progress at stage starts only``: the same as ``model worker`` with a 60 s progress interval.

    Each arm's figures are what the service's stages count, ``stages``: ``generate``, then ``export`` (the GLB export
    and its SHA-256), in wall time, and the CPU time of the thread each ran on (``generate CPU``, ``export CPU``): wall
    time that CPU time does not follow is waiting, not work (``generate waiting``, wall − CPU). Two counts say what
    the waiting is: ``generate switches``, how often the generating thread gave up its core (a lock, the GIL), and
    ``caller switches``, how often the calling thread did during the call (in the model-worker arms: how often the
    event loop woke). ``malloc_profile`` ``model`` applies the model services' allocator profile first, as they do;
    ``default`` keeps glibc's defaults, as the overhead benchmark's process has them. Per round and arm: the medians
    of the figures and of their per-call differences from ``this thread``, and the counts' means."""
    import asyncio
    from concurrent.futures import Future, ThreadPoolExecutor

    from bench.overhead import GENERATION, InProcess
    from trellis_service.domain import GeneratedAsset
    from trellis_service.exporters import encode_result
    from trellisbox._domain.imaging import decode_image
    from trellisbox._domain.kinds import ArtifactKind
    from trellisbox._domain.params import GenerationParams
    from trellisbox._runtime.allocator import MODEL, tune_malloc
    from trellisbox._runtime.model import ModelSettings
    from trellisbox._runtime.servicing import JobEvents
    from trellisbox._runtime.worker import JobContext, ModelWorker

    malloc = tune_malloc(MODEL) if malloc_profile == "model" else "malloc: glibc defaults"
    request, glb = _3d_only_call()
    data = request.images[0].data  # the served call's PNG, as stage-gap uses it
    local = InProcess()
    params = GenerationParams(**GENERATION)  # type: ignore[arg-type]
    Timed = tuple[float, float, int]  # wall ms, this thread's CPU ms, its voluntary context switches

    def generate(images: list[Any], ctx: JobContext) -> tuple[GeneratedAsset, Timed]:
        switches, wall, cpu = _voluntary_switches(), time.perf_counter(), time.thread_time()
        result = local.preview.generate(images, params, {ArtifactKind.GLB}, ctx)
        return result, ((time.perf_counter() - wall) * 1000, (time.thread_time() - cpu) * 1000,
                        _voluntary_switches() - switches)

    def export(result: GeneratedAsset) -> Timed:
        wall, cpu = time.perf_counter(), time.thread_time()
        glb_here = encode_result(result)[0].data
        hashlib.sha256(glb_here).digest()
        timed = ((time.perf_counter() - wall) * 1000, (time.thread_time() - cpu) * 1000, 0)
        if glb_here != glb:
            raise RuntimeError("the GLB differs from the served one")
        return timed

    def here() -> tuple[Timed, Timed]:
        result, generated = generate([decode_image(data)], local.ctx)
        return generated, export(result)

    other_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="other")
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
    default_interval = ModelWorker("worker-gap", max_queue=4, progress_interval_s=ModelSettings().progress_interval_s)
    stage_starts = ModelWorker("worker-gap-60s", max_queue=4, progress_interval_s=60.0)
    loop = asyncio.new_event_loop()

    async def served(worker: ModelWorker, encode_on_model_thread: bool) -> tuple[Timed, Timed]:
        images = [decode_image(data)]  # a 512² PNG: on the loop, as the service decodes it

        def job(ctx: JobContext) -> tuple[Timed, Future[Timed]]:
            result, generated = generate(images, ctx)
            if encode_on_model_thread:
                exported: Future[Timed] = Future()
                exported.set_result(export(result))
                return generated, exported
            return generated, encoder.submit(export, result)  # as start_encoding does, from the model thread

        events = JobEvents(worker.run(job, request_id="worker-gap"))
        async for _ in events.progress():
            pass
        generated, exporting = events.finished.value
        return generated, await asyncio.wrap_future(exporting)

    arms: dict[str, Callable[[], tuple[Timed, Timed]]] = {
        "this thread": here,
        "a thread": lambda: other_thread.submit(here).result(),
        "model worker": lambda: loop.run_until_complete(served(default_interval, False)),
        "model worker, encoded on its thread": lambda: loop.run_until_complete(served(default_interval, True)),
        "model worker, progress at stage starts only": lambda: loop.run_until_complete(served(stage_starts, False)),
    }
    rows: list[dict[str, Any]] = []
    names = list(arms)
    parts = ("stages", "generate", "export", "generate CPU", "export CPU", "generate waiting", "generate switches",
             "caller switches")
    order = random.Random(0)  # nosec B311  # a shuffle, not a secret
    try:
        for round_ in range(rounds):
            times: dict[str, dict[str, list[float]]] = {arm: {part: [] for part in parts} for arm in arms}
            for i in range(repeats + 1):  # the first call of each arm warms it up
                for arm in order.sample(names, len(names)):
                    caller = _voluntary_switches()
                    (generate_ms, generate_cpu_ms, switches), (export_ms, export_cpu_ms, _) = arms[arm]()
                    caller = _voluntary_switches() - caller
                    if i:
                        for part, ms in zip(parts, (generate_ms + export_ms, generate_ms, export_ms, generate_cpu_ms,
                                                    export_cpu_ms, generate_ms - generate_cpu_ms, switches, caller),
                                            strict=True):
                            times[arm][part].append(ms)
            base = times["this thread"]
            row: dict[str, Any] = {"round": round_}
            for arm, figures in times.items():
                row[arm] = {f"{part} ms": round(statistics.median(values), 2) for part, values in figures.items()
                            if not part.endswith("switches")}
                row[arm].update({f"{part} per call": round(statistics.mean(values), 2)  # counts: the mean
                                 for part, values in figures.items() if part.endswith("switches")})
                if arm != "this thread":
                    row[arm].update({f"{part} − this thread ms": round(statistics.median(
                        [a - b for a, b in zip(values, base[part], strict=True)]), 2)
                        for part, values in figures.items() if not part.endswith("switches")})
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for worker in (default_interval, stage_starts):
            worker.shutdown()
        for executor in (other_thread, encoder):
            executor.shutdown()
        loop.close()
    summary = {f"{arm}: {part} − this thread ms, per round": [row[arm][f"{part} − this thread ms"] for row in rows]
               for arm in names[1:] for part in parts if not part.endswith("switches")}
    summary.update({f"{arm}: {part} per call, per round": [row[arm][f"{part} per call"] for row in rows]
                    for arm in names for part in parts if part.endswith("switches")})
    print(malloc, json.dumps(summary, indent=1), flush=True)
    return {"malloc": malloc, "calls_per_arm_per_round": repeats, "rounds": rows, "summary": summary}


#: How :func:`service_threads` groups a service's threads, by the name the system shows for each (``comm``); "other":
#: the Python threads the service does not name (gRPC's asyncio poller, the metrics server).
THREAD_GROUPS = ("event loop", "model thread", "encoding threads", "gRPC's threads", "other")


def _thread_group(pid: int, tid: int, comm: str) -> str:
    if tid == pid:
        return "event loop"  # the main thread runs the service's asyncio loop
    if comm.endswith("-model_0"):
        return "model thread"
    if comm.startswith("encode"):
        return "encoding threads"
    if comm.startswith(("event_engine", "grpc", "lifeguard", "default-executo", "resolver-execut", "timer_manager")):
        return "gRPC's threads"
    return "other"


def _threads(pid: int) -> dict[str, tuple[float, float, int]]:
    """Per group of ``pid``'s threads: CPU ms, ms spent runnable but waiting for a core (both from ``schedstat``), and
    voluntary context switches (waits for a lock, the GIL, I/O)."""
    groups = {group: [0.0, 0.0, 0] for group in THREAD_GROUPS}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            running_ns, waiting_ns = (int(x) for x in (task / "schedstat").read_text().split()[:2])
            switches = _voluntary_switches(task)
        except (OSError, IndexError):  # a thread that just ended
            continue
        figures = groups[_thread_group(pid, int(task.name), comm)]
        figures[0] += running_ns / 1e6
        figures[1] += waiting_ns / 1e6
        figures[2] += switches
    return {group: (cpu, waiting, int(switches)) for group, (cpu, waiting, switches) in groups.items()}


def service_threads(procs: Processes, rounds: int, repeats: int) -> dict[str, Any]:
    """Where the TRELLIS service spends its CPU on one 3D-only call, thread by thread, against the same compute in
    this process. The service is called directly (one hop); after each call, in a new random order each time, this
    process decodes the image, generates and exports the GLB (and its SHA-256) on this thread.

    Per call, for each group of the service's threads (:data:`THREAD_GROUPS`, told apart by the names the service
    gives them), from ``/proc/<pid>/task/*/{schedstat,status}``: CPU ms, ms runnable but waiting for a core (another
    thread or process had it), and voluntary context switches. For this process: the CPU ms of the decode, the
    generation and the export, and the wait for a core. The differences the service's own work makes: model thread −
    generate, encoding threads − export, event loop − decode (what the event loop does besides decoding: gRPC,
    asyncio, progress, the call's own Python). Per round: medians (the switches: means)."""
    import grpc

    from bench.overhead import GENERATION, ONE_THREAD, InProcess
    from trellis_service.exporters import encode_result
    from trellisbox._domain.convert import params_to_proto
    from trellisbox._domain.imaging import decode_image
    from trellisbox._domain.kinds import ArtifactKind
    from trellisbox._domain.params import GenerationParams
    from trellisbox.v1 import common_pb2, trellis_pb2

    request, glb = _3d_only_call()
    direct_request = trellis_pb2.ImageTo3DRequest(images=request.images, formats=[common_pb2.ARTIFACT_KIND_GLB])
    params = GenerationParams(**GENERATION)  # type: ignore[arg-type]
    params_to_proto(params, direct_request.parameters)
    trellis = procs.start("trellis", "trellis_service", ["--backend", "preview"], env=ONE_THREAD)
    wait_serving(trellis.target, TRELLIS_SERVICE, 120, trellis)
    pid = trellis.process.pid
    channel = grpc.insecure_channel(trellis.target, options=[("grpc.max_receive_message_length", 64 * MIB)])
    call = channel.unary_stream(f"/{TRELLIS_SERVICE}/ImageTo3D",
                                request_serializer=trellis_pb2.ImageTo3DRequest.SerializeToString,
                                response_deserializer=trellis_pb2.ImageTo3DResponse.FromString)
    local = InProcess()
    image = request.images[0].data
    me = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")

    def served() -> dict[str, float]:
        before = _threads(pid)
        data = b"".join(response.chunk.data for response in call(direct_request, timeout=60)
                        if response.HasField("chunk"))
        time.sleep(0.02)  # the call's last work after its status: the collection of its cycles (release_memory)
        after = _threads(pid)
        if data != glb:
            raise RuntimeError("the service's GLB differs from the in-process one")
        figures: dict[str, float] = {}
        for group in THREAD_GROUPS:
            (cpu, waiting, switches), (cpu0, waiting0, switches0) = after[group], before[group]
            figures.update({f"{group} CPU ms": cpu - cpu0, f"{group} waiting for a core ms": waiting - waiting0,
                            f"{group} switches": switches - switches0})
        figures["service CPU ms"] = sum(figures[f"{group} CPU ms"] for group in THREAD_GROUPS)
        return figures

    def here() -> dict[str, float]:
        waiting = int(me.read_text().split()[1])
        started = time.thread_time_ns()
        images = [decode_image(image)]
        decoded = time.thread_time_ns()
        result = local.preview.generate(images, params, {ArtifactKind.GLB}, local.ctx)
        generated = time.thread_time_ns()
        hashlib.sha256(encode_result(result)[0].data).digest()
        exported = time.thread_time_ns()
        return {"decode CPU ms": (decoded - started) / 1e6, "generate CPU ms": (generated - decoded) / 1e6,
                "export CPU ms": (exported - generated) / 1e6, "in-process CPU ms": (exported - started) / 1e6,
                "in-process waiting for a core ms": (int(me.read_text().split()[1]) - waiting) / 1e6}

    differences = {"model thread − generate CPU ms": ("model thread CPU ms", "generate CPU ms"),
                   "encoding threads − export CPU ms": ("encoding threads CPU ms", "export CPU ms"),
                   "event loop − decode CPU ms": ("event loop CPU ms", "decode CPU ms"),
                   "service − in-process CPU ms": ("service CPU ms", "in-process CPU ms")}
    rows: list[dict[str, Any]] = []
    order = random.Random(0)  # nosec B311  # a shuffle, not a secret
    try:
        for round_ in range(rounds):
            calls: list[dict[str, float]] = []
            for i in range(repeats + 1):  # the first pair warms both up
                pair: dict[str, float] = {}
                for arm in order.sample(("served", "here"), 2):
                    pair.update(served() if arm == "served" else here())
                if i:
                    pair.update({name: pair[a] - pair[b] for name, (a, b) in differences.items()})
                    calls.append(pair)
            row: dict[str, Any] = {"round": round_}
            for name in calls[0]:
                values = [call_[name] for call_ in calls]
                row[name] = round(statistics.mean(values) if name.endswith("switches") else statistics.median(values),
                                  2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        channel.close()
    summary = {f"{name}, per round": [row[name] for row in rows]
               for name in (*differences, *(f"{group} CPU ms" for group in THREAD_GROUPS),
                            *(f"{group} switches" for group in THREAD_GROUPS[:3]),
                            "model thread waiting for a core ms", "in-process waiting for a core ms")}
    print(json.dumps(summary, indent=1), flush=True)
    return {"pairs_per_round": repeats, "rounds": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # a killed benchmark still stops the services it started
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=("malloc", "grpc-args", "loop", "faults", "client", "processes", "small-chunks",
                                         "grpc-experiments", "gateway-hop", "process-pairs", "grpc-costs",
                                         "stage-gap", "worker-gap", "service-threads"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "trellisbox-bench-experiments")
    parser.add_argument("--malloc", choices=("default", "model"), default="model",
                        help="worker-gap: glibc's allocator defaults, or the model services' profile (the default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the arm a child of `processes` runs
    args = parser.parse_args(argv)
    if args.child == "serve-jobs":  # a child of `process-pairs`: one job per line read
        serve_jobs()
        return 0
    if args.child is not None:  # a child of `processes`: its result as one JSON line
        print(json.dumps(compute_in_this_process(args.child, args.repeats)))
        return 0
    with Processes(args.log_dir) as procs:
        if args.name == "malloc":
            data: Any = malloc(procs, args.rounds, args.repeats)
        elif args.name == "grpc-args":
            data = grpc_args(procs, args.rounds, args.repeats)
        elif args.name == "faults":
            data = faults(args.log_dir, args.rounds, 15)
        elif args.name == "client":
            data = client(procs, args.rounds, args.repeats)
        elif args.name == "processes":
            data = processes(args.rounds, args.repeats)
        elif args.name == "small-chunks":
            data = small_chunks(procs, args.repeats)
        elif args.name == "grpc-experiments":
            data = grpc_experiments(procs, args.rounds, args.repeats)
        elif args.name == "gateway-hop":
            data = gateway_hop(procs, args.rounds, args.repeats)
        elif args.name == "process-pairs":
            data = process_pairs(args.rounds, args.repeats)
        elif args.name == "grpc-costs":
            data = grpc_costs(procs, args.rounds, args.repeats)
        elif args.name == "stage-gap":
            data = stage_gap(procs, args.rounds, args.repeats)
        elif args.name == "worker-gap":
            data = worker_gap(args.rounds, args.repeats, args.malloc)
        elif args.name == "service-threads":
            data = service_threads(procs, args.rounds, args.repeats)
        else:
            data = loop(procs, args.seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"experiment-{args.name}.json"
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tree": str(REPO),
                               "machine": machine_info(), "rows": data}, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
