"""Refiner throughput with dynamic batching: images/s at batch 1, 2, 4, and what batching changes in the pixels.

``python -m bench.refiner_batching [--quick] [--device auto|cpu|cuda] [--batches 1 2 4] [--requests N]``

1. **Model call**: one ``SDXLBackend`` call per batch size, timed round-robin (1, 2, 4, 1, 2, 4, ...) so that
   a noisy neighbour slows every batch size alike. Batch 1 is the unbatched path (``refine``, what a request
   alone runs); 2 and 4 are ``refine_batch`` with one image, seed and prompt per request.
2. **Tolerance**: each batched image against the same image refined alone (max and mean absolute difference
   in grey levels, share of values that differ).
3. **Service path**: ``--requests`` single-image requests arriving at once, through the real
   ``ModelWorker`` with batching off (one job per request) and on (``DynamicBatcher``, 5 ms window, up to 4
   images): wall time, images/s, mean latency, calls made.

CPU (no CUDA): the tiny random-weight refiner (``--model tiny``) at 256×256 (128 with ``--quick``).
CUDA: the full-size SDXL-refiner architecture with random weights (``bench.refiner_gpu``), fp16 + SDPA, at
1024×1024. Both at 20 steps × strength 0.3 (6 UNet steps). Writes bench/results/refiner_batching.json and
prints a Markdown table.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import load_average, summarize  # noqa: E402
from bench.refiner_gpu import (  # noqa: E402
    build_components,
    device_info,
    image_size,
    make_pipeline,
    publish,
    refiner_bench_parser,
    select_device,
    set_attention,
    sync,
)
from refiner_service.backends.base import BatchMember  # noqa: E402
from refiner_service.backends.sdxl import SDXLBackend  # noqa: E402
from trellisbox._domain.params import RefineParams  # noqa: E402

RESULTS = REPO / "bench" / "results" / "refiner_batching.json"
PROMPTS = ("a ceramic vase, studio light", "a wooden chair", "a brass lamp", "a leather boot",
           "a red teapot", "a toy robot", "a glass bottle", "a straw hat")


def test_image(size: int, seed: int) -> Image.Image:
    """A smooth synthetic photo (gradients, a disc), different per seed."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 1, 3)
    rgb = np.stack([200 * ((xx + phase[0]) % 1) + 30, 180 * ((yy + phase[1]) % 1) + 40,
                    120 * (1 - xx * yy) + 60 + 40 * phase[2]], axis=-1)
    disc = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.08
    rgb[disc] = (220, 90 + 80 * phase[0], 60)
    rgb += rng.normal(0, 2.0, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


class Workload:
    """The images, seeds and per-request parameters every measurement draws from."""

    def __init__(self, size: int, count: int, steps: int, strength: float) -> None:
        self.images = [test_image(size, i) for i in range(count)]
        self.seeds = [1000 + i for i in range(count)]
        self.params = [RefineParams(num_inference_steps=steps, strength=strength, prompt=PROMPTS[i % len(PROMPTS)])
                       for i in range(count)]

    def members(self, batch: int) -> list[BatchMember]:
        return [BatchMember([self.images[i]], [self.seeds[i]], self.params[i]) for i in range(batch)]


def call(backend: SDXLBackend, work: Workload, batch: int) -> list[Image.Image]:
    """One model call of ``batch`` single-image requests (batch 1: the unbatched path)."""
    if batch == 1:
        return backend.refine([work.images[0]], work.params[0], [work.seeds[0]])
    outcomes = backend.refine_batch(work.members(batch))
    images = []
    for outcome in outcomes:
        if not isinstance(outcome, list):
            raise outcome
        images.extend(outcome)
    return images


def measure_calls(backend: SDXLBackend, work: Workload, batches: list[int], repeats: int,
                  device: str) -> tuple[list[dict[str, Any]], dict[int, list[Image.Image]]]:
    outputs = {b: call(backend, work, b) for b in batches}  # warm-up, and the pictures for the tolerance
    sync(device)
    times: dict[int, list[float]] = {b: [] for b in batches}
    peak: dict[int, int] = dict.fromkeys(batches, 0)
    cuda = device.startswith("cuda")
    for _ in range(repeats):
        for b in batches:  # round-robin: load from other processes hits every batch size alike
            if cuda:
                import torch

                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            call(backend, work, b)
            sync(device)
            times[b].append(time.perf_counter() - started)
            if cuda:
                peak[b] = max(peak[b], torch.cuda.max_memory_allocated(device))
    base = 1 / statistics.median(times[batches[0]]) * batches[0]
    rows = []
    for b in batches:
        per_call = statistics.median(times[b])
        rate = b / per_call
        row = {"batch": b, "seconds_per_call": summarize(times[b]), "images_per_s": round(rate, 3),
               "seconds_per_image": round(per_call / b, 4), "speedup_vs_first": round(rate / base, 3)}
        if cuda:
            row["peak_vram_mib"] = round(peak[b] / 2**20, 1)
        rows.append(row)
    return rows, outputs


def measure_tolerance(backend: SDXLBackend, work: Workload, outputs: dict[int, list[Image.Image]]) -> dict[str, Any]:
    largest = max(outputs)
    alone = [backend.refine([work.images[i]], work.params[i], [work.seeds[i]])[0] for i in range(largest)]
    per_batch: dict[str, dict[str, Any]] = {}
    worst = 0
    for b, images in sorted(outputs.items()):
        if b == 1:
            same = np.array_equal(np.asarray(images[0]), np.asarray(alone[0]))
            per_batch["1"] = {"bit_identical_to_unbatched": bool(same)}
            continue
        diffs = [np.abs(np.asarray(g, np.int16) - np.asarray(e, np.int16)) for g, e in zip(images, alone, strict=False)]
        stacked = np.stack(diffs)
        worst = max(worst, int(stacked.max()))
        per_batch[str(b)] = {"max_abs": int(stacked.max()), "mean_abs": round(float(stacked.mean()), 5),
                             "share_of_values_differing": round(float((stacked > 0).mean()), 5)}
    return {"max_abs_grey_levels": worst, "per_batch": per_batch}


async def _service_path(backend: SDXLBackend, work: Workload, requests: int, batching: bool,
                        window_s: float, max_images: int) -> dict[str, Any]:
    from refiner_service.backends import RefinerBackend
    from refiner_service.batching import DynamicBatcher
    from trellisbox._runtime.lease import LeaseSettings
    from trellisbox._runtime.model import ModelHost
    from trellisbox._runtime.worker import Finished, JobContext

    host: ModelHost[RefinerBackend] = ModelHost("bench-refiner", requests + 1, LeaseSettings())
    host.start(lambda: backend)  # already loaded: this is its warm-up
    worker = host.worker
    batcher = DynamicBatcher(host, window_s=window_s, max_images=max_images)
    calls: list[int] = []
    original = backend.refine_batch

    def counting(members: Sequence[BatchMember]) -> Any:
        calls.append(sum(len(m.images) for m in members))
        return original(members)

    backend.refine_batch = counting  # type: ignore[method-assign]
    latencies: list[float] = []

    async def one(i: int) -> None:
        image, params, seed = work.images[i % len(work.images)], work.params[i % len(work.params)], work.seeds[0] + i
        started = time.perf_counter()
        if batching:
            stream = batcher.run([image], params, [seed], request_id=f"r{i}")
        else:
            def job(ctx: JobContext) -> list[Image.Image]:
                calls.append(1)
                return backend.refine([image], params, [seed], ctx)

            stream = worker.run(job, request_id=f"r{i}")
        async for item in stream:
            if isinstance(item, Finished):
                sync(backend.device)
        latencies.append(time.perf_counter() - started)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    finally:
        backend.refine_batch = original  # type: ignore[method-assign]
        worker.shutdown()
    alone = requests - sum(calls) if batching else 0  # requests that ran by themselves took the refine() path
    return {"batching": batching, "requests": requests, "wall_s": round(wall, 3),
            "images_per_s": round(requests / wall, 3), "mean_latency_s": round(statistics.mean(latencies), 3),
            "model_calls": len(calls) + alone if batching else len(calls),
            "images_per_call": sorted(calls + [1] * alone) if batching else calls}


def measure_service_path(backend: SDXLBackend, work: Workload, requests: int) -> list[dict[str, Any]]:
    rows = []
    for batching in (False, True):
        rows.append(asyncio.run(_service_path(backend, work, requests, batching, window_s=0.005, max_images=4)))
    return rows


def make_backend(device: str) -> tuple[SDXLBackend, str]:
    """The tiny model on a CPU; the full-size architecture (random weights, fp16 + SDPA) on CUDA."""
    if not device.startswith("cuda"):
        backend = SDXLBackend("tiny", "cpu")  # the service's CPU settings: fp32, attention slicing
        backend.show_progress_bars = False
        backend.load()
        return backend, "tiny random-weight SDXL refiner (refiner_service.tiny), fp32, attention slicing"
    import torch

    components = build_components(1.0, device=device)
    for name in ("unet", "text_encoder_2", "vae"):
        components[name].to(dtype=torch.float16)
    pipe = make_pipeline(components)
    set_attention(pipe, "sdpa")
    pipe.to(device)
    return SDXLBackend.from_pipeline(pipe, device), "full-size SDXL-refiner architecture, random weights, fp16 + SDPA"


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"{result['model']} on {result['machine']['device_name']} ({result['machine']['cpu_threads']} threads), "
        f"{cfg['size']}×{cfg['size']}, {cfg['steps']} steps × strength {cfg['strength']}",
        "",
        "| batch | s / call (median) | s / image | images/s | speedup | peak VRAM MiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["calls"]:
        vram = row.get("peak_vram_mib", "—")
        lines.append(f"| {row['batch']} | {row['seconds_per_call']['median']:.3f} | {row['seconds_per_image']:.3f} "
                     f"| {row['images_per_s']:.2f} | {row['speedup_vs_first']:.2f}× | {vram} |")
    tol = result["tolerance"]
    lines += ["", f"Batched vs unbatched: max |Δ| = {tol['max_abs_grey_levels']} grey level(s); "
              + "; ".join(f"batch {b}: " + ", ".join(f"{k} {v}" for k, v in d.items())
                          for b, d in tol["per_batch"].items())]
    if result.get("service_path"):
        lines += ["", "| service path | requests | wall s | images/s | mean latency s | model calls |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in result["service_path"]:
            lines.append(f"| batching {'on' if row['batching'] else 'off'} | {row['requests']} | {row['wall_s']:.2f} "
                         f"| {row['images_per_s']:.2f} | {row['mean_latency_s']:.2f} | {row['model_calls']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = refiner_bench_parser("python -m bench.refiner_batching", __doc__ or "", RESULTS,
                                  "timed rounds (default 7, 1 with --quick)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, default=None,
                        help="concurrent requests of the service-path run (default 8, 4 with --quick; 0 skips it)")
    args = parser.parse_args(argv)

    device = select_device(args.device, args.threads, args.quick)
    size = image_size(args, device)
    repeats = args.repeats or (1 if args.quick else 7)
    requests = args.requests if args.requests is not None else (4 if args.quick else 8)
    batches = sorted(set(args.batches))
    started = time.monotonic()
    machine = device_info(device)
    print(f"loading the refiner on {device} ...", flush=True)
    backend, model = make_backend(device)
    work = Workload(size, max(max(batches), 8), args.steps, args.strength)
    print(f"timing batches {batches} at {size}×{size}, {repeats} round(s) ...", flush=True)
    calls, outputs = measure_calls(backend, work, batches, repeats, device)
    tolerance = measure_tolerance(backend, work, outputs)
    service = measure_service_path(backend, work, requests) if requests > 0 else []
    machine["load_average_at_end"] = load_average()
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "machine": machine,
        "model": model,
        "config": {"size": size, "steps": args.steps, "strength": args.strength,
                   "unet_steps": min(int(args.steps * args.strength), args.steps), "repeats": repeats},
        "calls": calls,
        "tolerance": tolerance,
        "service_path": service,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    backend.unload()
    publish(result, args.out, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
