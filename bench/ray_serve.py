"""This project's stack against the same pipeline on Ray Serve, in one run: ``make bench-ray``.

Issue 16 asked for the served path to lead Ray Serve where a user feels it, per request and when streaming. This
puts both in front of the same backends on the same machine at the same time:

- *This project*: gateway → refiner (classic) → TRELLIS service (preview), each a process on loopback, called with
  ``TrellisBoxClient`` (gRPC).
- *Ray Serve* (2.60, as its model-composition guide builds it): a ``Refiner`` and a ``Trellis`` deployment wrapping
  the same backend objects, behind an ``Ingress`` deployment that chains their ``DeploymentHandle`` calls (the
  refiner's response is passed to the TRELLIS call unresolved, so the refined image goes between the replicas through
  Ray's object store, not through the ingress), called over HTTP through Ray's proxy with a keep-alive session. The
  artifact stream is a streaming handle call relayed by the ingress as a ``StreamingResponse``.

Both sides get the same 512² image, parameters and seeds, and both return byte-identical GLBs (checked on every
call). Both clients hash what they receive (SHA-256, which ``TrellisBoxClient`` verifies), so the clients do the
same work per byte. Figures, all from one run:

- *Added per request*: served wall time minus the same backends in this process (as ``bench/overhead.py``), in
  triplets (this project, Ray, in-process) whose order rotates, so each triplet sees the same load; medians of the
  per-triplet differences, 3D only and refine + 3D.
- *Artifact streaming*: the preview backend's large GLB + PLY (54 MiB, as ``bench/transport.py``), first chunk to
  last chunk at the client; this project and Ray alternate.
- *Throughput*: requests per second with 16 closed-loop clients (refine + 3D), each on its own connection, in two
  12 s windows per stack, ordered this project, Ray, Ray, this project.
- *Idle memory and CPU*: proportional set size (PSS: shared pages counted once) summed over every process of each
  stack once warm, and the CPU each stack burns in 5 s with no request.

Ray is not a dependency of the project: ``make bench-ray`` builds a separate virtual environment (``.venv-ray``)
with the project and ``ray[serve]==2.60.0``. ``--ray-mode throughput`` sets ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``,
the mode Ray documents for throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import crc32c

from bench.common import REPO, cpu_seconds, exit_on_sigterm, machine_info, object_image, png, summarize, write_json
from bench.overhead import GENERATION, ONE_THREAD, REFINE, InProcess
from bench.report import write_section
from bench.transport import MIB, StreamTiming, big_generation, big_image, big_request, timed_stream
from tools.stack import LocalStack, free_port
from trellisbox._domain.artifacts import CHUNK_BYTES
from trellisbox._domain.imaging import decode_image
from trellisbox._domain.kinds import ArtifactKind
from trellisbox._domain.params import GenerationParams, RefineParams
from trellisbox._runtime.worker import JobContext
from trellisbox.client import TrellisBoxClient

IMAGE_SIDE = 512
TRIPLETS = 31
STREAM_REPEATS = 5


# --- the Ray Serve application (built only where ray is installed) -------------------------------------------------

def build_app() -> Any:
    """The Ray Serve application: Ingress(Refiner, Trellis), each wrapping the backend the services run."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse

    @serve.deployment
    class Refiner:
        def __init__(self) -> None:
            from refiner_service.backends.classic import ClassicBackend

            self._backend = ClassicBackend()
            self._backend.load()
            self._ctx = JobContext("ray", None, lambda _event: None)

        def refine(self, data: bytes) -> Any:
            params = RefineParams(**REFINE)  # type: ignore[arg-type]
            return self._backend.refine([decode_image(data)], params, [REFINE["seed"]], self._ctx)[0]

    @serve.deployment
    class Trellis:
        def __init__(self) -> None:
            from trellis_service.backends.preview import PreviewBackend

            self._backend = PreviewBackend()
            self._backend.load()
            self._ctx = JobContext("ray", None, lambda _event: None)

        def _artifacts(self, image: Any, big: bool) -> list[bytes]:
            from trellis_service.exporters import encode_asset

            if isinstance(image, bytes):
                image = decode_image(image)
            generation = big_generation(quick=False) if big else GENERATION
            formats = {ArtifactKind.GLB, ArtifactKind.GAUSSIAN_PLY} if big else {ArtifactKind.GLB}
            result = self._backend.generate([image], GenerationParams(**generation),  # type: ignore[arg-type]
                                            formats, self._ctx)
            return [artifact.data for artifact in encode_asset(result)]

        def generate(self, image: Any) -> bytes:
            return self._artifacts(image, big=False)[0]

        def stream(self, image: Any) -> Iterator[bytes]:
            for data in self._artifacts(image, big=True):
                view = memoryview(data)
                for offset in range(0, len(data), CHUNK_BYTES):
                    yield bytes(view[offset:offset + CHUNK_BYTES])

    @serve.deployment(ray_actor_options={"num_cpus": 0})  # each model replica reserves one of the 2 cores
    class Ingress:
        def __init__(self, refiner: Any, trellis: Any) -> None:
            self._refiner = refiner
            self._trellis = trellis

        async def __call__(self, request: Request) -> Response:
            data = await request.body()
            image: Any = self._refiner.refine.remote(data) if request.query_params.get("refine") == "1" else data
            if request.query_params.get("stream") == "1":
                chunks = self._trellis.options(stream=True).stream.remote(image)

                async def body() -> AsyncIterator[bytes]:
                    async for chunk in chunks:
                        yield chunk

                return StreamingResponse(body(), media_type="application/octet-stream")
            return Response(await self._trellis.generate.remote(image), media_type="model/gltf-binary")

    return Ingress.bind(Refiner.bind(), Trellis.bind())  # type: ignore[attr-defined]


class RayStack:
    """A local Ray cluster with the application on an HTTP port of loopback; shut down on exit."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = free_port()

    def __enter__(self) -> RayStack:
        import ray
        from ray import serve

        # The deployments import the project: its folder on every worker's path. One OpenMP thread, as the services.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        os.environ.update(ONE_THREAD)
        if self.mode == "throughput":
            os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        serve.run(build_app(), name="trellisbox", route_prefix="/")
        self.url = f"http://127.0.0.1:{self.port}/"
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        ray.shutdown()  # stops every process of the local cluster (Serve's own graceful shutdown waits 30 s here)


class RayClient:
    """HTTP calls to the Ray application on one keep-alive session; checks and keeps what it receives, as ours
    does."""

    def __init__(self, url: str) -> None:
        import requests

        self._url = url
        self._session = requests.Session()

    def generate(self, data: bytes, refine: bool) -> bytes:
        response = self._session.post(self._url, data=data, params={"refine": "1" if refine else "0"}, timeout=300)
        response.raise_for_status()
        glb = response.content
        crc32c.crc32c(glb)  # the client's check per byte, as TrellisBoxClient checks each chunk's CRC-32C
        return glb

    def stream(self, data: bytes) -> tuple[StreamTiming, bytes]:
        """One streaming call, timed like ``bench.transport.timed_stream``: first chunk to last at the client, which
        checks each piece's CRC-32C and keeps the bytes, as ours does; with the SHA-256 of all that arrived."""
        started = time.perf_counter()
        kept = io.BytesIO()
        total = first = 0
        arrivals: list[float] = []
        with self._session.post(self._url, data=data, params={"stream": "1"}, stream=True, timeout=600) as response:
            response.raise_for_status()
            for piece in response.raw.stream(CHUNK_BYTES, decode_content=False):
                arrivals.append(time.perf_counter())
                if not first:
                    first = len(piece)
                crc32c.crc32c(piece)
                kept.write(piece)
                total += len(piece)
        elapsed = time.perf_counter() - started
        digest = hashlib.sha256(kept.getvalue()).digest()
        return StreamTiming(total, total - first, arrivals[-1] - arrivals[0], elapsed, {}), digest

    def close(self) -> None:
        self._session.close()


# --- processes, memory and idle CPU --------------------------------------------------------------------------------

def _tree(pid: int) -> list[Any]:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def footprint(processes: list[Any], idle_s: float = 5.0) -> dict[str, Any]:
    """PSS summed over ``processes`` (psutil processes), and the CPU they burn together in ``idle_s`` of no requests."""
    import psutil

    alive = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.cpu_times()
            alive.append(process)

    def cpu() -> float:
        total = 0.0
        for process in alive:
            with contextlib.suppress(OSError):  # one that has just ended
                total += cpu_seconds(process.pid)
        return total

    pss = 0
    for process in alive:
        with contextlib.suppress(psutil.Error):
            pss += process.memory_full_info().pss
    before = cpu()
    time.sleep(idle_s)
    idle_cpu = (cpu() - before) / idle_s
    return {"processes": len(alive), "pss_mib": round(pss / MIB, 1),
            "idle_cpu_percent_of_a_core": round(idle_cpu * 100, 1)}


# --- the comparison ------------------------------------------------------------------------------------------------

def per_request(ours: TrellisBoxClient, ray: RayClient, local: InProcess, data: bytes, refine: bool,
                triplets: int) -> dict[str, Any]:
    """Added time per request over in-process, both stacks, in rotating triplets."""
    options: dict[str, Any] = {"refine": refine, "generation": GENERATION, "formats": ["glb"]}
    if refine:
        options["refine_params"] = REFINE
    times: dict[str, list[float]] = {"ours": [], "ray": [], "in_process": []}
    reference, _ = local.run(data, refine)
    identical = True

    def run(which: str) -> float:
        nonlocal identical
        started = time.perf_counter()
        if which == "ours":
            glb = ours.generate([data], **options).glb
        elif which == "ray":
            glb = ray.generate(data, refine)
        else:
            glb = local.run(data, refine)[0]
        elapsed = time.perf_counter() - started
        identical &= glb == reference
        return elapsed

    orders = itertools.cycle(itertools.permutations(("ours", "ray", "in_process")))
    for i in range(triplets + 1):  # the first warms every path up and is not counted
        measured = {which: run(which) for which in next(orders)}
        if i:
            for which, elapsed in measured.items():
                times[which].append(elapsed * 1000)
    added = {name: [s - local_ms for s, local_ms in zip(times[name], times["in_process"], strict=True)]
             for name in ("ours", "ray")}
    return {
        "served_ms": {name: summarize(times[name], 1) for name in ("ours", "ray")},
        "in_process_ms": summarize(times["in_process"], 1),
        "added_ms": {name: summarize(values, 1) for name, values in added.items()},
        "ours_minus_ray_ms": summarize([o - r for o, r in zip(times["ours"], times["ray"], strict=True)], 1),
        "identical_glb": identical,
    }


def streaming(ours: TrellisBoxClient, ray: RayClient, repeats: int) -> dict[str, Any]:
    """The 54 MiB GLB + PLY streamed by each stack, alternating; MiB/s from the first chunk to the last."""
    data, request = big_image(quick=False), big_request(quick=False)
    timings: dict[str, list[StreamTiming]] = {"ours": [], "ray": []}
    identical = True
    for i in range(repeats + 1):
        ours_timing, result = timed_stream(ours, request, {})
        ray_timing, ray_digest = ray.stream(data)
        identical &= hashlib.sha256(b"".join(a.data for a in result.artifacts)).digest() == ray_digest
        if i:
            timings["ours"].append(ours_timing)
            timings["ray"].append(ray_timing)
    rates = {name: [t.mib_s for t in values] for name, values in timings.items()}
    return {
        "artifact_mib": round(timings["ours"][0].total_bytes / MIB, 2),
        "ray_artifact_mib": round(timings["ray"][0].total_bytes / MIB, 2),
        "mib_s": {name: summarize(values, 1) for name, values in rates.items()},
        "whole_call_s": {name: summarize([t.request_s for t in values], 3) for name, values in timings.items()},
        "ours_over_ray": round(summarize(rates["ours"])["median"] / summarize(rates["ray"])["median"], 3),
        "identical_bytes": identical,  # the GLB then the PLY, the same bytes from both stacks
    }


def concurrent(target: str, url: str, data: bytes, clients: int, warm_s: float, window_s: float) -> dict[str, Any]:
    """Requests per second with ``clients`` closed-loop clients (refine + 3D), each with its own connection, for each
    stack in turn: completions that end inside the window, over the window; the mean of two windows per stack."""
    import threading

    def load(make_call: Any) -> dict[str, Any]:
        started = time.monotonic()
        window_start, window_end = started + warm_s, started + warm_s + window_s
        ends: list[float] = []
        failures: list[str] = []

        def client() -> None:
            call, close = make_call()
            try:
                while time.monotonic() < window_end:
                    try:
                        call()
                    except Exception as exc:  # counted and shown: a failed call is a result here
                        failures.append(type(exc).__name__)
                        time.sleep(0.05)
                        continue
                    ends.append(time.monotonic())
            finally:
                close()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=warm_s + window_s + 120)
        in_window = sum(window_start <= end < window_end for end in ends)
        return {"requests_per_s": round(in_window / window_s, 2), "completed": len(ends), "failed": len(failures)}

    def ours_call() -> tuple[Any, Any]:
        client = TrellisBoxClient(target, timeout=120)
        return (lambda: client.generate([data], refine=True, refine_params=REFINE, generation=GENERATION,
                                        formats=["glb"]), client.close)

    def ray_call() -> tuple[Any, Any]:
        client = RayClient(url)
        return (lambda: client.generate(data, refine=True)), client.close

    windows: dict[str, list[dict[str, Any]]] = {"ours": [], "ray": []}
    for name in ("ours", "ray", "ray", "ours"):  # ABBA: a drift of the machine's load weighs on both alike
        windows[name].append(load(ours_call if name == "ours" else ray_call))

    def total(name: str) -> dict[str, Any]:
        rates = [window["requests_per_s"] for window in windows[name]]
        return {"requests_per_s": round(sum(rates) / len(rates), 2), "windows": rates,
                "completed": sum(window["completed"] for window in windows[name]),
                "failed": sum(window["failed"] for window in windows[name])}

    ours, ray = total("ours"), total("ray")
    ratio = round(ours["requests_per_s"] / ray["requests_per_s"], 3) if ray["requests_per_s"] else None
    return {"clients": clients, "window_s": window_s, "ours": ours, "ray": ray, "ours_over_ray": ratio}


# --- the table in docs/benchmarks.md -------------------------------------------------------------------------------

BEGIN = "<!-- ray:begin (generated by `make bench-ray`; edit the text around it, not inside) -->"
END = "<!-- ray:end -->"
MODES = {"default": "Ray Serve defaults", "throughput": "Ray Serve, RAY_SERVE_THROUGHPUT_OPTIMIZED=1"}


def result_path(results_dir: Path, mode: str) -> Path:
    return results_dir / f"ray-serve-{mode}.json"


def render(runs: dict[str, dict[str, Any]]) -> str:
    """The comparison table of each run (by Ray mode) that has results."""
    lines = ["| run | figure | this project | Ray Serve | this project against Ray |", "|---|---|---:|---:|---:|"]
    for mode, label in MODES.items():
        run = runs.get(mode)
        if run is None:
            continue
        first = f"{label} ({run['when']}, Ray {run['ray']}, load {run['machine']['load_average_at_start'][0]})"
        rows: list[tuple[str, str, str, str]] = []
        for case, name in (("3d_only", "3D only"), ("refine_and_3d", "refine + 3D")):
            c = run[case]
            n = c["ours_minus_ray_ms"]["n"]
            identical = "yes" if c["identical_glb"] else "NO"
            rows.append((f"**added per request** over in-process, {name} (median of {n} triplets; "
                         f"in-process {c['in_process_ms']['median']} ms; GLBs identical: {identical})",
                         f"**{c['added_ms']['ours']['median']} ms**", f"{c['added_ms']['ray']['median']} ms",
                         f"**{c['ours_minus_ray_ms']['median']:+} ms** per triplet".replace("-", "−")))
        stream = run["streaming"]
        same = {True: "yes", False: "NO", None: "not checked"}[stream.get("identical_bytes")]
        rows.append((f"**artifact streaming**, {stream['artifact_mib']} MiB GLB + PLY, first chunk → last "
                     f"(median of {stream['mib_s']['ours']['n']}; same bytes: {same})",
                     f"**{stream['mib_s']['ours']['median']} MiB/s**", f"{stream['mib_s']['ray']['median']} MiB/s",
                     f"**{stream['ours_over_ray']}×**"))
        load = run.get("concurrent")
        if load is not None:
            rows.append((f"**throughput**, {load['clients']} concurrent clients, refine + 3D, requests/s (mean of "
                         f"{len(load['ours'].get('windows', [0]))} windows of {load['window_s']:.0f} s; failed calls: "
                         f"{load['ours']['failed']} / {load['ray']['failed']})",
                         f"**{load['ours']['requests_per_s']}**", f"{load['ray']['requests_per_s']}",
                         f"**{load['ours_over_ray']}×**"))
        idle = run["idle"]
        ours, ray = idle["ours"], idle["ray"]
        rows.append(("idle memory, PSS of every process once warm",
                     f"{ours['pss_mib']:.0f} MiB ({ours['processes']} processes)",
                     f"{ray['pss_mib']:.0f} MiB ({ray['processes']} processes)",
                     f"{ours['pss_mib'] / ray['pss_mib']:.2f}×"))
        rows.append(("idle CPU, all processes, 5 s without requests",
                     f"{ours['idle_cpu_percent_of_a_core']} % of a core",
                     f"{ray['idle_cpu_percent_of_a_core']} % of a core", ""))
        for index, (figure, a, b, c_) in enumerate(rows):
            lines.append(f"| {first if index == 0 else ''} | {figure} | {a} | {b} | {c_} |")
    return "\n".join(lines)


def write_docs(docs: Path, results_dir: Path) -> None:
    """Rewrite the comparison table in ``docs`` from the result files in ``results_dir``."""
    runs = {mode: json.loads(path.read_text()) for mode in MODES
            if (path := result_path(results_dir, mode)).exists()}
    write_section(docs, BEGIN, END, render(runs))


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # a killed benchmark still stops the services it started
    parser = argparse.ArgumentParser(prog="python -m bench.ray_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ray-mode", choices=("default", "throughput"), default="default")
    parser.add_argument("--triplets", type=int, default=TRIPLETS)
    parser.add_argument("--stream-repeats", type=int, default=STREAM_REPEATS)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the throughput figure")
    parser.add_argument("--window-s", type=float, default=12.0, help="its measuring window (after 2 s of warm-up)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                        help="folder of the result files (ray-serve-<mode>.json)")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--render", action="store_true", help="only rewrite the docs' table from the result files")
    args = parser.parse_args(argv)
    if args.render:
        write_docs(args.docs, args.out)
        return 0
    started = time.monotonic()
    results: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": machine_info(), "ray_mode": args.ray_mode}
    import ray

    results["ray"] = ray.__version__
    data = png(object_image(IMAGE_SIDE))
    local = InProcess()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp, \
            LocalStack(Path(tmp) / "stack", refiner_args=["--backend", "classic"],
                       trellis_args=["--backend", "preview"], ready_timeout=300, env=ONE_THREAD) as stack:
        ours_pids = {stack.processes[name].process.pid for name in ("gateway", "refiner", "trellis")}
        print("starting Ray Serve ...", flush=True)
        with RayStack(args.ray_mode) as ray_stack, \
                TrellisBoxClient(stack.gateway_target, timeout=600, max_message_bytes=64 * MIB) as ours:
            ray_client = RayClient(ray_stack.url)
            try:
                for refine in (False, True):  # warm both up before the footprint
                    ours.generate([data], refine=refine, generation=GENERATION, formats=["glb"])
                    ray_client.generate(data, refine)
                ours_processes = [p for pid in ours_pids for p in _tree(pid)]
                ours_tree = {p.pid for p in ours_processes}
                ray_processes = [p for p in _tree(os.getpid())[1:] if p.pid not in ours_tree]
                print("idle footprint ...", flush=True)
                results["idle"] = {"ours": footprint(ours_processes), "ray": footprint(ray_processes)}
                for name, refine in (("3d_only", False), ("refine_and_3d", True)):
                    print(f"per request, {name} ...", flush=True)
                    results[name] = per_request(ours, ray_client, local, data, refine, args.triplets)
                print("streaming ...", flush=True)
                results["streaming"] = streaming(ours, ray_client, args.stream_repeats)
                print(f"{args.clients} concurrent clients ...", flush=True)
                results["concurrent"] = concurrent(stack.gateway_target, ray_stack.url, data, args.clients, 2.0,
                                                   args.window_s)
            finally:
                ray_client.close()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    out = result_path(args.out, args.ray_mode)
    write_json(out, results)
    write_docs(args.docs, args.out)
    print(f"done in {results['elapsed_s']:.0f} s: {out}, table in {args.docs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
