"""``python -m bench [--quick] [--out DIR] [--docs FILE] [--only SECTION ...]``: the serving benchmarks.

Sections: overhead, transport, scaling, coldstart, memory. Each writes ``<out>/<section>.json``; the
lease benchmark's ``<out>/lease.json`` (``bench/lease_bench.py``) is read when present. The Markdown
table in ``--docs`` (docs/benchmarks.md) is regenerated between its markers. Every service runs as a
real process on loopback; every load loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from bench import coldstart, memory, overhead, scaling, transport
from bench.common import REPO, Processes, exit_on_sigterm, machine_info, write_json
from bench.report import write_docs
from tools.stack import LocalStack

SECTIONS = ("overhead", "transport", "scaling", "coldstart", "memory")


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # a killed benchmark still stops the services it started
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats and smaller inputs (smoke test)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--log-dir", type=Path, default=None, help="service logs (default: a temporary folder)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    quick = args.quick
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": quick,
        "machine": machine_info(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        with Processes(log_dir) as procs:
            if {"overhead", "transport"} & set(args.only):
                print("starting gateway + refiner (classic) + trellis (preview) ...", flush=True)
                # One OpenMP thread in the services (overhead.py says why).
                with LocalStack(log_dir / "stack", refiner_args=["--backend", "classic"],
                                trellis_args=["--backend", "preview"], ready_timeout=300,
                                env=overhead.ONE_THREAD) as stack:
                    if "overhead" in args.only:
                        print("overhead ...", flush=True)
                        pids: dict[str, int | None] = {name: stack.processes[name].process.pid
                                                       for name in ("gateway", "refiner", "trellis")}
                        results["overhead"] = overhead.run(stack.gateway_target, quick, 2 if quick else overhead.PAIRS,
                                                           {**pids, "client": None}, procs)
                    if "transport" in args.only:
                        print("transport ...", flush=True)
                        results["transport"] = transport.run(stack, procs, quick, 1 if quick else 5)
                if "transport" in args.only:
                    sizes = [2**20] if quick else [256 * 1024, 2**20, 2 * 2**20]
                    results["transport"]["chunk_sweep"] = transport.run_chunk_sweep(
                        procs, [], sizes, (16 if quick else 48) * 2**20, 2 if quick else 7)
            if "scaling" in args.only:
                print("scaling ...", flush=True)
                results["scaling"] = scaling.run(procs, quick, 1 if quick else 3, latency_ms=200.0)
            if "coldstart" in args.only:
                print("cold start ...", flush=True)
                results["coldstart"] = coldstart.run(procs, 1 if quick else 3)
            if "memory" in args.only:
                print("memory ...", flush=True)
                results["memory"] = memory.run(procs, quick)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    for name in SECTIONS:
        if name in results:
            write_json(args.out / f"{name}.json",
                       {"when": results["when"], "quick": quick, "machine": results["machine"], **results[name]})
    lease = args.out / "lease.json"
    if lease.exists():
        results["lease"] = json.loads(lease.read_text())
    write_docs(args.docs, results)
    print(f"done in {results['elapsed_s']:.0f} s: {args.out}/*.json, table in {args.docs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
