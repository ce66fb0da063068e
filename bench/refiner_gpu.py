"""Refiner speed and memory at real size: the SDXL-refiner architecture with random weights, no download.

``python -m bench.refiner_gpu [--quick] [--scale S] [--size PX] [--repeats N] [--only VARIANT ...]``

The UNet, ``text_encoder_2`` (CLIPTextModelWithProjection, OpenCLIP bigG) and VAE are built from the
values of the published ``stabilityai/stable-diffusion-xl-refiner-1.0`` configs (at ``--scale 1`` their
parameter counts equal the published fp16 weight files: 2.26 G, 0.69 G, 0.08 G); the tokenizer is the
project's small offline CLIP BPE tokenizer. Random weights run the same kernels as trained ones, so the
speed and VRAM figures hold; the pictures are noise.

On CUDA it measures, at 1024×1024 and 20 steps × strength 0.3 (6 UNet steps, each a batch of two under
classifier-free guidance), seconds per image and peak VRAM for each variant below, and the time of the
service's own ``to_gpu`` / ``to_host`` moves (a lease hand-off with ``offload`` residency). Without CUDA it
runs the variants that exist on a CPU at a reduced size (``--scale`` shrinks widths and depths, ``--size``
the image) so that CI keeps the script working; fp16, model CPU offload, ``torch.compile`` and the moves
are then recorded as skipped, with the reason.

Writes bench/results/refiner_gpu.json (with the device name) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # python bench/refiner_gpu.py works too
    sys.path.insert(0, str(REPO))

from bench.common import cpu_model, load_average, summarize, write_json  # noqa: E402

RESULTS = REPO / "bench" / "results" / "refiner_gpu.json"

# -- the published architecture ------------------------------------------------------------------------
# Values of stabilityai/stable-diffusion-xl-refiner-1.0 {unet,text_encoder_2,vae,scheduler}/config.json.
UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (384, 768, 1536, 1536),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 1280, "attention_head_dim": (6, 12, 24, 24), "transformer_layers_per_block": 4,
    "use_linear_projection": True, "norm_num_groups": 32, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "addition_embed_type_num_heads": 64,
    "projection_class_embeddings_input_dim": 2560,  # 256 × 5 time ids (with aesthetic score) + 1280 pooled text
}
TEXT_ENCODER_2: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu", "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
}
VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 1024, "scaling_factor": 0.13025,
    "force_upcast": True,
}
SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
    "timestep_spacing": "leading", "prediction_type": "epsilon", "num_train_timesteps": 1000,
}
# Parameter counts of the published weights (fp16 file size / 2): the full-size build must match them.
PUBLISHED_PARAMETERS = {"unet": 2_259_526_660, "text_encoder_2": 694_659_840, "vae": 83_653_863}


def _width(value: int, scale: float, multiple: int) -> int:
    return max(multiple, multiple * round(value * scale / multiple))


def _depth(value: int, scale: float) -> int:
    return max(1, round(value * scale))


def configs(scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """The three model configs, widths and depths multiplied by ``scale`` (1.0: exactly the published ones)."""
    if scale == 1.0:
        return {"unet": dict(UNET), "text_encoder_2": dict(TEXT_ENCODER_2), "vae": dict(VAE)}
    hidden = _width(1280, scale, 64)  # attention heads of 64 channels, as in bigG
    blocks = tuple(_width(c, scale, 32) for c in UNET["block_out_channels"])
    time_dim = _width(256, scale, 8)
    unet = {
        **UNET, "block_out_channels": blocks, "cross_attention_dim": hidden,
        # At least two heads: attention slicing ("auto" = half the heads per slice) needs them.
        "attention_head_dim": tuple(max(2, c // 64) for c in blocks),
        "transformer_layers_per_block": _depth(4, scale), "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": time_dim * 5 + hidden,
    }
    text = {**TEXT_ENCODER_2, "hidden_size": hidden, "intermediate_size": 4 * hidden, "projection_dim": hidden,
            "num_hidden_layers": _depth(32, scale), "num_attention_heads": hidden // 64}
    vae = {**VAE, "block_out_channels": tuple(_width(c, scale, 32) for c in VAE["block_out_channels"])}
    return {"unet": unet, "text_encoder_2": text, "vae": vae}


def build_components(scale: float = 1.0, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Random-weight UNet, text encoder 2, VAE (fp32 on ``device``, ``meta`` for shapes only), tokenizer, scheduler."""
    import importlib

    import torch

    import refiner_service.backends.sdxl  # noqa: F401  (installs the filter for diffusers' empty fp32 warning)
    from refiner_service.tiny import tiny_tokenizer_files

    # diffusers and transformers are only partly annotated: use them as untyped modules here.
    diffusers: Any = importlib.import_module("diffusers")
    transformers: Any = importlib.import_module("transformers")
    vocab, merges = tiny_tokenizer_files()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    cfg = configs(scale)
    end = vocab["<|endoftext|>"]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            **cfg["text_encoder_2"], bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end))
        unet = diffusers.UNet2DConditionModel(**cfg["unet"])
        vae = diffusers.AutoencoderKL(**cfg["vae"])
    return {"unet": unet, "text_encoder_2": text, "vae": vae, "tokenizer_2": tokenizer,
            "scheduler": diffusers.EulerDiscreteScheduler(**SCHEDULER)}


def parameter_counts(components: dict[str, Any]) -> dict[str, int]:
    return {name: sum(p.numel() for p in components[name].parameters()) for name in ("unet", "text_encoder_2", "vae")}


def architecture_parameters(scale: float = 1.0) -> dict[str, int]:
    """Parameter counts of the architecture at ``scale``, built on the meta device (no memory, < 2 s)."""
    return parameter_counts(build_components(scale, device="meta"))


def make_pipeline(components: dict[str, Any]) -> Any:
    """A ``StableDiffusionXLImg2ImgPipeline`` over ``components``, configured like the published refiner."""
    import importlib

    diffusers: Any = importlib.import_module("diffusers")
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=components["vae"], text_encoder=None, text_encoder_2=components["text_encoder_2"], tokenizer=None,
        tokenizer_2=components["tokenizer_2"], unet=components["unet"], scheduler=components["scheduler"],
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- variants ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration to time.

    Args:
        name: Short id (``--only``).
        dtype: ``fp32`` or ``fp16``.
        attention: ``sdpa`` (AttnProcessor2_0, diffusers' default with torch 2), ``eager`` (AttnProcessor:
            matmul + softmax) or ``sliced`` (``enable_attention_slicing()``: SlicedAttnProcessor, which
            replaces SDPA).
        channels_last: UNet in channels-last memory format.
        compile: ``torch.compile`` the UNet.
        offload: ``enable_model_cpu_offload()``.
        note: What it stands for.
        cuda_only: Not measured without CUDA (and why).
    """

    name: str
    dtype: str
    attention: str
    channels_last: bool = False
    compile: bool = False
    offload: bool = False
    note: str = ""
    cuda_only: str = ""


VARIANTS = (
    Variant("fp32", "fp32", "sdpa", note="fp32, SDPA (diffusers default attention)"),
    Variant("fp32-sliced", "fp32", "sliced", note="fp32 with attention slicing (the service's CPU setting)"),
    Variant("fp32-eager", "fp32", "eager", note="fp32, plain matmul-softmax attention"),
    Variant("fp32-channels-last", "fp32", "sdpa", channels_last=True, note="fp32, SDPA, channels-last UNet"),
    Variant("fp16", "fp16", "eager", note="fp16, plain matmul-softmax attention (no SDPA)",
            cuda_only="fp16 is not a serving configuration on a CPU"),
    Variant("fp16-sdpa", "fp16", "sdpa", note="fp16 + SDPA, resident",
            cuda_only="fp16 is not a serving configuration on a CPU"),
    Variant("fp16-sliced", "fp16", "sliced", note="fp16 + attention slicing, resident",
            cuda_only="fp16 is not a serving configuration on a CPU"),
    Variant("fp16-sdpa-channels-last", "fp16", "sdpa", channels_last=True, note="fp16 + SDPA, channels-last UNet",
            cuda_only="fp16 is not a serving configuration on a CPU"),
    Variant("fp16-sdpa-compile", "fp16", "sdpa", compile=True, note="fp16 + SDPA, torch.compile(unet)",
            cuda_only="torch.compile needs a C++ toolchain and minutes of compilation on a CPU"),
    Variant("fp16-sdpa-offload", "fp16", "sdpa", offload=True, note="fp16 + SDPA + model CPU offload",
            cuda_only="model CPU offload requires an accelerator"),
    Variant("fp16-sliced-offload", "fp16", "sliced", offload=True,
            note="fp16 + attention slicing + model CPU offload: the service's CUDA default today",
            cuda_only="model CPU offload requires an accelerator"),
)


def set_attention(pipe: Any, attention: str) -> None:
    """``sliced``: ``enable_attention_slicing()``; ``sdpa``: AttnProcessor2_0; ``eager``: AttnProcessor."""
    import importlib

    if attention == "sliced":
        pipe.enable_attention_slicing()
        return
    processors: Any = importlib.import_module("diffusers.models.attention_processor")
    processor = processors.AttnProcessor2_0 if attention == "sdpa" else processors.AttnProcessor
    pipe.unet.set_attn_processor(processor())
    pipe.vae.set_attn_processor(processor())


def sync(device: str) -> None:
    """Wait for queued CUDA work, so a timer stops when the work is done (a no-op on a CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _mib(value: int) -> float:
    return round(value / 2**20, 1)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN casts of random-weight pictures, deprecation notes
        yield


def refine_call(pipe: Any, size: int, steps: int, strength: float, batch: int = 1, seed: int = 0) -> Any:
    """One img2img call on ``batch`` grey-noise images of ``size``² (the service's default parameters)."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]
    with _quiet():
        return pipe(
            prompt=["high quality, detailed, sharp"] * batch,
            negative_prompt=["blurry, low quality, distorted"] * batch,
            image=images, strength=strength, guidance_scale=7.5, num_inference_steps=steps,
            aesthetic_score=6.0, negative_aesthetic_score=2.5,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)],
        )


def _on_host(master: dict[str, Any], dtype: Any = None) -> dict[str, Any]:
    """The master components back on the host in the default memory format, converted in place to ``dtype``
    when given. In place, never copied: the full-size model is 12 GB in fp32, and two would not fit many hosts."""
    import torch

    for name in ("unet", "text_encoder_2", "vae"):
        master[name].to("cpu", dtype=dtype) if dtype is not None else master[name].to("cpu")
        master[name].to(memory_format=torch.contiguous_format)
    return dict(master)


def measure_variant(master: dict[str, Any], variant: Variant, device: str, size: int, steps: int,
                    strength: float, repeats: int) -> dict[str, Any]:
    """Seconds per image (median of ``repeats`` after a warm-up) and peak memory of one variant."""
    import torch

    cuda = device.startswith("cuda")
    components = _on_host(master, torch.float16 if variant.dtype == "fp16" else torch.float32)
    pipe = make_pipeline(components)
    set_attention(pipe, variant.attention)
    record: dict[str, Any] = {"variant": variant.name, "note": variant.note}
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if variant.offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        if variant.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if variant.compile:
            pipe.unet = torch.compile(components["unet"])
        sync(device)
        if cuda:
            record["resident_mib"] = _mib(torch.cuda.memory_allocated(device))
        started = time.perf_counter()
        refine_call(pipe, size, steps, strength)  # warm-up: kernels, allocator, compilation
        sync(device)
        record["first_call_s"] = round(time.perf_counter() - started, 3)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(repeats):
            started = time.perf_counter()
            refine_call(pipe, size, steps, strength, seed=i + 1)
            sync(device)
            times.append(time.perf_counter() - started)
        record["seconds_per_image"] = summarize(times)
        if cuda:
            record["peak_vram_mib"] = _mib(torch.cuda.max_memory_allocated(device))
            record["peak_reserved_mib"] = _mib(torch.cuda.max_memory_reserved(device))
    except Exception as exc:  # OOM or an unsupported combination: record it, go on with the next variant
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        with contextlib.suppress(Exception):
            if variant.offload:
                pipe.remove_all_hooks()
        del pipe
        _on_host(master)
        _free(device)
    return record


def measure_moves(master: dict[str, Any], device: str, repeats: int) -> dict[str, Any]:
    """The service's own residency moves (``SDXLBackend.to_gpu`` / ``to_host``) on the fp16 pipeline."""
    import torch

    from refiner_service.backends.sdxl import SDXLBackend

    components = _on_host(master, torch.float16)
    pipe = make_pipeline(components)
    backend = SDXLBackend.from_pipeline(pipe, device)
    to_gpu, to_host = [], []
    resident = 0
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            backend.to_gpu()
            sync(device)
            to_gpu.append(time.perf_counter() - started)
            resident = torch.cuda.memory_allocated(device)
            started = time.perf_counter()
            backend.to_host()
            sync(device)
            to_host.append(time.perf_counter() - started)
        weights = sum(p.numel() * p.element_size() for n in ("unet", "text_encoder_2", "vae")
                      for p in components[n].parameters())
        return {"host_to_gpu_s": summarize(to_gpu), "gpu_to_host_s": summarize(to_host),
                "weights_mib": _mib(weights), "resident_mib": _mib(resident),
                "host_to_gpu_gib_per_s": round(weights / 2**30 / statistics.median(to_gpu), 2)}
    finally:
        del backend, pipe
        _on_host(master)
        _free(device)


# -- driver --------------------------------------------------------------------------------------------


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                            "cpus": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
                            "platform": platform.platform()}
    with contextlib.suppress(ImportError):
        import diffusers

        info["diffusers"] = diffusers.__version__
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, vram_mib=_mib(props.total_memory), cuda=torch.version.cuda)
    else:
        info["device_name"] = cpu_model()
    info["load_average_at_start"] = load_average()
    return info


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"Refiner at {cfg['size']}×{cfg['size']}, {cfg['steps']} steps × strength {cfg['strength']} "
        f"({cfg['unet_steps']} UNet steps), scale {cfg['scale']}, on {result['machine']['device_name']}",
        "",
        "| variant | s / image (median) | first call s | peak VRAM MiB | note |",
        "|---|---:|---:|---:|---|",
    ]
    for row in result["variants"]:
        if "skipped" in row:
            lines.append(f"| {row['variant']} | skipped | | | {row['skipped']} |")
        elif "error" in row:
            lines.append(f"| {row['variant']} | failed | | | {row['error']} |")
        else:
            lines.append(f"| {row['variant']} | {row['seconds_per_image']['median']:.3f} | {row['first_call_s']:.2f} "
                         f"| {row.get('peak_vram_mib', '—')} | {row['note']} |")
    moves = result.get("moves", {})
    if "skipped" in moves:
        lines += ["", f"Host ↔ GPU moves: skipped ({moves['skipped']})"]
    elif moves:
        lines += ["", f"Host → GPU {moves['host_to_gpu_s']['median']:.3f} s, GPU → host "
                      f"{moves['gpu_to_host_s']['median']:.3f} s for {moves['weights_mib']:.0f} MiB of fp16 weights "
                      "(SDXLBackend.to_gpu / to_host: one lease hand-off with offload residency)"]
    return "\n".join(lines)


def select_device(requested: str, threads: int | None, quick: bool) -> str:
    """The concrete torch device for ``requested`` (auto|cpu|cuda|cuda:N), with the CPU thread count set."""
    import torch

    threads = threads or (1 if quick else None)
    if threads:
        torch.set_num_threads(threads)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        requested = f"cuda:{torch.cuda.current_device()}"
    return requested


def refiner_bench_parser(prog: str, doc: str, out: Path, repeats_help: str) -> argparse.ArgumentParser:
    """The options both refiner benchmarks share (this one and ``bench.refiner_batching``); each adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: smallest size, one repeat")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--size", type=int, default=None,
                        help="image edge in px (default 1024 on CUDA, 256 / 128 on a CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=None, help=repeats_help)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 with --quick, where a busy shared "
                             "host makes multi-threaded CPU kernels spin)")
    parser.add_argument("--out", type=Path, default=out)
    return parser


def image_size(args: argparse.Namespace, device: str) -> int:
    """``--size``, else the real 1024 px on CUDA and a size a CPU gets through in minutes."""
    return int(args.size or (1024 if device.startswith("cuda") else 128 if args.quick else 256))


def publish(result: dict[str, Any], out: Path, table: str) -> None:
    """Write the JSON result and print its Markdown table (what goes into docs/refiner-performance.md)."""
    write_json(out, result)
    print(table)
    print(f"\nwrote {out} in {result['elapsed_s']} s")


def main(argv: list[str] | None = None) -> int:
    parser = refiner_bench_parser("python -m bench.refiner_gpu", __doc__ or "", RESULTS,
                                  "timed calls per variant (default 5, 1 with --quick)")
    parser.add_argument("--scale", type=float, default=None,
                        help="architecture scale (default 1.0 on CUDA, 0.125 on a CPU, 0.0625 with --quick)")
    parser.add_argument("--only", nargs="+", choices=[v.name for v in VARIANTS], default=None)
    args = parser.parse_args(argv)

    device = select_device(args.device, args.threads, args.quick)
    cuda = device.startswith("cuda")
    scale = args.scale if args.scale is not None else (1.0 if cuda else 0.0625 if args.quick else 0.125)
    size = image_size(args, device)
    repeats = args.repeats or (1 if args.quick else 5 if cuda else 3)
    if not 0 < scale <= 1:
        parser.error("--scale must be in (0, 1]")
    started = time.monotonic()
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "machine": device_info(device),
        "config": {"scale": scale, "size": size, "steps": args.steps, "strength": args.strength,
                   "unet_steps": min(int(args.steps * args.strength), args.steps), "repeats": repeats},
    }
    print(f"building the SDXL-refiner architecture at scale {scale} with random weights ...", flush=True)
    build_started = time.perf_counter()
    # On CUDA the weights are initialised on the GPU (seconds instead of minutes), then kept on the host.
    master = build_components(scale, device=device if cuda else "cpu")
    for name in ("unet", "text_encoder_2", "vae"):
        master[name].to("cpu")
    _free(device)
    counts = parameter_counts(master)
    result["parameters"] = counts
    result["parameters_match_published"] = counts == PUBLISHED_PARAMETERS if scale == 1.0 else None
    result["build_s"] = round(time.perf_counter() - build_started, 2)

    rows = []
    for variant in VARIANTS:
        if args.only and variant.name not in args.only:
            continue
        if variant.cuda_only and not cuda:
            rows.append({"variant": variant.name, "note": variant.note, "skipped": variant.cuda_only})
            continue
        print(f"  {variant.name} ...", flush=True)
        rows.append(measure_variant(master, variant, device, size, args.steps, args.strength, repeats))
    result["variants"] = rows
    result["moves"] = (measure_moves(master, device, max(3, repeats)) if cuda
                       else {"skipped": "no CUDA device: nothing to move"})
    result["machine"]["load_average_at_end"] = load_average()
    result["elapsed_s"] = round(time.monotonic() - started, 1)

    publish(result, args.out, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
