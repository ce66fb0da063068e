"""Cold start: process start (``Popen``) to readiness SERVING (grpc.health.v1, the service's own name),
polled every 50 ms with a fresh channel. Readiness includes the model load and one warm-up inference.
The tiny refiner's folder is built before the first run (it is cached on disk after the first start).
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Processes, summarize, wait_serving
from tools.stack import free_port
from trellisbox._domain.contract import GATEWAY_SERVICE, REFINER_SERVICE, TRELLIS_SERVICE

SERVICES: list[tuple[str, str, str, list[str]]] = [
    ("gateway", "gateway", GATEWAY_SERVICE, []),
    ("refiner (sdxl tiny, cpu)", "refiner_service", REFINER_SERVICE,
     ["--backend", "sdxl", "--model", "tiny", "--device", "cpu"]),
    ("refiner (classic)", "refiner_service", REFINER_SERVICE, ["--backend", "classic"]),
    ("trellis (preview)", "trellis_service", TRELLIS_SERVICE, ["--backend", "preview"]),
]


def run(procs: Processes, repeats: int) -> dict[str, Any]:
    from refiner_service.tiny import tiny_refiner_path

    tiny_refiner_path()  # build once, outside the timing
    dead = f"127.0.0.1:{free_port()}"
    samples: dict[str, list[float]] = {name: [] for name, *_ in SERVICES}
    for _ in range(repeats):
        for name, module, service, args in SERVICES:
            if module == "gateway":
                args = ["--refiner-target", dead, "--trellis-target", dead]
                # Its readiness follows its stages, and none runs here: its cold start is the port coming up.
                service = ""
            started = time.monotonic()
            process = procs.start(f"cold-{module}", module, args)
            try:
                ready = wait_serving(process.target, service, 240, process, poll_s=0.05)
            finally:
                procs.stop(process)
            samples[name].append(ready - started)
    return {
        "method": "Popen -> health SERVING for the service name, polled every 50 ms; services started one at a time",
        "repeats": repeats,
        "services": {name: summarize(values, 2) for name, values in samples.items()},
    }
