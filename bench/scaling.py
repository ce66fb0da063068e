"""Refiner tier scaling: gateway throughput with 1, 2 and 4 refiner replicas behind ``dns:///`` + round_robin.

The replicas run the ``fixed-latency`` backend (a fixed sleep per image on the model thread, no CPU), so
one replica serves at most 1 / latency requests per second whatever the host, and the ratio to one
replica measures the router (resolution, round_robin, health checking, queueing), not the 2 cores.
Each replica binds its own loopback address (127.0.0.1 .. 127.0.0.4) on the same port; a DNS server on
loopback answers ``refiner.bench.test`` with the first N of them, and the gateway (``GRPC_DNS_RESOLVER=ares``)
is pointed at ``dns://127.0.0.1:<dns port>/refiner.bench.test:<port>``. The TRELLIS stage is the stub
(a 64 KiB artifact at once), so it is never the bottleneck.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from typing import Any

from bench.common import Processes, object_image, png, summarize, wait_serving
from bench.dns import LoopbackDns
from bench.load import closed_loop
from tools.stack import ServiceProcess, free_port
from trellisbox._domain.contract import GATEWAY_SERVICE, REFINER_SERVICE, TRELLIS_SERVICE
from trellisbox.client import build_request

NAME = "refiner.bench.test"
_REFINED = re.compile(r"refined \d+ image\(s\)")


def _refined_count(process: ServiceProcess) -> int:
    try:
        return len(_REFINED.findall(process.log_path.read_text(errors="replace")))
    except OSError:
        return 0


def _free_port_on_all(addresses: list[str]) -> int:
    """A port free on every replica address (each replica binds its own address, same port)."""
    for _ in range(50):
        port = free_port(addresses[0])
        try:
            for address in addresses[1:]:
                with socket.socket() as sock:
                    sock.bind((address, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every replica address")


def _first_refine_after(process: ServiceProcess, since: float, timeout: float) -> float | None:
    """Seconds from ``since`` (``time.monotonic()``) until ``process`` logs a new refinement; None on timeout."""
    seen = _refined_count(process)
    while time.monotonic() - since < timeout:
        if _refined_count(process) > seen:
            return time.monotonic() - since
        time.sleep(0.05)
    return None


def _replica_changes(procs: Processes, dns: LoopbackDns, replicas: list[ServiceProcess], addresses: list[str],
                     port: int, stub: ServiceProcess, request: bytes, quick: bool) -> dict[str, Any]:
    """At default settings, under steady load: how long until a replica added to DNS gets its first request, and
    how long a replica removed from DNS still gets requests (a removed pod drains, then terminates)."""
    dns.set(NAME, addresses[:1])
    gateway = procs.start("gateway-pickup", "gateway", ["--stage-tls", "off",  # the DNS name is served on loopback
                                                        "--refiner-target", dns.target(NAME, port),
                                                        "--trellis-target", stub.target],
                          env={"GRPC_DNS_RESOLVER": "ares"})
    stop = threading.Event()
    load = threading.Thread(target=closed_loop, args=(gateway.target, request, 8, 0.0, 60.0 if quick else 90.0),
                            kwargs={"stop": stop}, daemon=True)
    try:
        wait_serving(gateway.target, GATEWAY_SERVICE, 60, gateway)
        load.start()
        time.sleep(2.0)  # steady state on the first replica
        added_at = time.monotonic()
        dns.set(NAME, addresses)
        pickup_s = _first_refine_after(replicas[1], added_at, 45.0)
        time.sleep(2.0)
        dns.set(NAME, addresses[:1])
        removed_at = time.monotonic()
        last_served = removed_at
        count = _refined_count(replicas[1])
        while time.monotonic() - removed_at < 45.0:
            now = _refined_count(replicas[1])
            if now > count:
                count, last_served = now, time.monotonic()
            elif time.monotonic() - last_served > 15.0:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        if load.is_alive():
            load.join(30)
        procs.stop(gateway)
    return {
        "method": "8 closed-loop clients on the gateway; the replica is added to (then removed from) the DNS answer "
                  "while it is ready; seconds until its first request / after removal until its last",
        "settings": "defaults: model services' max_connection_age_s, the gateway's DNS re-resolution interval",
        "added_to_first_request_s": None if pickup_s is None else round(pickup_s, 2),
        "removed_to_last_request_s": round(last_served - removed_at, 2),
    }


def run(procs: Processes, quick: bool, repeats: int, latency_ms: float = 200.0, clients: int = 32,
        counts: tuple[int, ...] = (1, 2, 4)) -> dict[str, Any]:
    addresses = [f"127.0.0.{i}" for i in range(1, max(*counts, 2) + 1)]  # two at least: the pickup measurement
    port = _free_port_on_all(addresses)
    env = {"TRELLISBOX_REFINER_FIXED_LATENCY_MS": str(latency_ms)}
    replicas = [procs.start(f"refiner-{i + 1}", "refiner_service",
                            ["--host", address, "--backend", "fixed-latency", "--fixed-latency-ms", str(latency_ms),
                             "--max-queue", "128"], port=port, env=env)
                for i, address in enumerate(addresses)]
    stub = procs.start("stub-trellis-scaling", "bench.stubs",
                       ["--mode", "trellis", "--artifact-bytes", str(64 * 1024)])
    for address, replica in zip(addresses, replicas, strict=True):
        wait_serving(f"{address}:{port}", REFINER_SERVICE, 120, replica)
    wait_serving(stub.target, TRELLIS_SERVICE, 60, stub)
    request = build_request([png(object_image(128))], refine=True, refine_params={"seed": 1},
                            generation={"seed": 1}, formats=["glb"]).SerializeToString()
    warm_s, window_s = (0.5, 1.5) if quick else (1.0, 4.0)
    rows: list[dict[str, Any]] = []
    with LoopbackDns() as dns:
        for count in counts:
            dns.set(NAME, addresses[:count])
            target = dns.target(NAME, port)
            gateway = procs.start(f"gateway-scaling-{count}", "gateway",
                                  ["--stage-tls", "off", "--refiner-target", target, "--trellis-target", stub.target,
                                   "--max-concurrent", "128", "--max-queue", "256"],
                                  env={"GRPC_DNS_RESOLVER": "ares"})
            try:
                wait_serving(gateway.target, GATEWAY_SERVICE, 60, gateway)
                before = [_refined_count(r) for r in replicas]
                throughputs, errors, latencies = [], 0, []
                for _ in range(repeats):
                    result = closed_loop(gateway.target, request, clients, warm_s, window_s)
                    throughputs.append(result.throughput)
                    errors += sum(result.errors.values())
                    latencies += result.latencies_s
                time.sleep(0.3)  # let the last log lines land
                served = [_refined_count(r) - b for r, b in zip(replicas, before, strict=True)]
            finally:
                procs.stop(gateway)
            rows.append({
                "replicas": count,
                "throughput_rps": summarize(throughputs, 2),
                "latency_s": summarize(latencies, 3) if latencies else None,
                "errors": errors,
                "per_replica_refines": served[:count],
                "other_replicas_refines": sum(served[count:]),
            })
    base = rows[0]["throughput_rps"]["median"]
    for row in rows:
        row["ratio_to_one"] = round(row["throughput_rps"]["median"] / base, 2) if base else None
    with LoopbackDns() as dns:
        pickup = _replica_changes(procs, dns, replicas[:2], addresses[:2], port, stub, request, quick)
    for replica in replicas:
        procs.stop(replica)
    procs.stop(stub)
    return {
        "pickup": pickup,
        "method": "closed loop, concurrent clients on one channel; completions inside the window / window",
        "resolver": f"dns:/// via a loopback DNS server, GRPC_DNS_RESOLVER=ares, target {NAME}:{port}",
        "backend": f"fixed-latency {latency_ms:g} ms per image",
        "ideal_rps_per_replica": round(1000 / latency_ms, 2),
        "clients": clients,
        "window_s": window_s,
        "repeats": repeats,
        "rows": rows,
    }

