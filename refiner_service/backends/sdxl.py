"""``sdxl``: the Stable Diffusion XL refiner through diffusers' ``StableDiffusionXLImg2ImgPipeline``.

Determinism: the seed ``s`` of an image means ``torch.Generator(device="cpu").manual_seed(s)`` passed to
the pipeline (diffusers draws the initial noise on the CPU and moves it to the device), so a seed names
the same noise on every device and the output can be reproduced by calling diffusers directly.

torch and diffusers are imported on first load only: importing this module stays cheap.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from refiner_service.backends.base import BatchMember, MemberOutcome, RefinerBackend, stop_reason
from refiner_service.config import DEFAULT_MODEL
from refiner_service.tiny import TINY_MODEL, tiny_refiner_path
from trellisbox._domain.errors import InvalidInput, ModelUnavailable, ServiceError
from trellisbox._domain.imaging import reapply_alpha, split_alpha
from trellisbox._domain.kinds import Stage
from trellisbox._domain.params import RefineParams
from trellisbox._runtime.devices import resolve_device, validate_device
from trellisbox._runtime.worker import JobContext

if TYPE_CHECKING:
    import torch

_log = logging.getLogger(__name__)


class _DropEmptyFp32Warning(logging.Filter):
    """diffusers 0.42 warns "modules ... should be kept in float32: []" on every img2img call with an
    upcasting VAE, although the list is empty: noise that would drown the service log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropEmptyFp32Warning())


def _sampling_args(params: RefineParams) -> dict[str, Any]:
    """The pipeline arguments a batch must agree on (prompts, images and generators are per image)."""
    return {
        "strength": params.strength,
        "guidance_scale": params.guidance_scale,
        "num_inference_steps": params.num_inference_steps,
        "aesthetic_score": params.aesthetic_score,
        "negative_aesthetic_score": params.negative_aesthetic_score,
    }


def effective_steps(params: RefineParams) -> int:
    """UNet steps img2img runs: ``int(num_inference_steps * strength)`` (as diffusers computes it)."""
    return min(int(params.num_inference_steps * params.strength), params.num_inference_steps)


class _EveryMemberStopped(Exception):
    """Raised from the step callback to leave the denoising loop once no member of a batch wants its result."""


class SDXLBackend(RefinerBackend):
    """SDXL-refiner img2img.

    Args:
        model: Hugging Face model id, local diffusers folder, or ``"tiny"`` (random-weight test model
            built once into the cache folder, then loaded through the same ``from_pretrained`` path).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; resolved at load.
        use_fp16: On CUDA, load fp16 weights (``variant="fp16"`` when the model has them) and compute in
            fp16. Ignored on CPU, where fp16 is slow or unsupported.
        attention_slicing: On CUDA, compute attention in slices: lower peak memory; sums run in another order, so
            a pixel may differ by one grey level from unsliced attention. Ignored on CPU, where it saves nothing
            and would only make results differ from a plain diffusers call.
        cpu_offload: On CUDA, keep sub-models in host RAM and move each to the GPU only while it runs
            (``enable_model_cpu_offload``). Ignored on CPU, where diffusers refuses it.
        show_progress_bars: diffusers' loading and denoising bars (a service turns them off: they garble its log).
    """

    name = "sdxl"
    supports_batching = True

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", use_fp16: bool = True,
                 attention_slicing: bool = True, cpu_offload: bool = True, show_progress_bars: bool = True) -> None:
        self.model = model
        self._device_spec = validate_device(device)
        self.use_fp16 = use_fp16
        self.attention_slicing = attention_slicing
        self.cpu_offload = cpu_offload
        self.show_progress_bars = show_progress_bars
        self._pipe: Any = None  # StableDiffusionXLImg2ImgPipeline; diffusers ships no type information
        self._device: str | None = None
        self._offloaded = False
        self._sliced = False

    @classmethod
    def from_pipeline(cls, pipe: Any, device: str, *, offloaded: bool = False) -> SDXLBackend:
        """Wrap an already built ``StableDiffusionXLImg2ImgPipeline`` (benchmarks: random full-size weights).

        Args:
            pipe: The pipeline, already on ``device`` (or with model CPU offload enabled for it).
            device: Where it runs, ``cpu`` or ``cuda:N``.
            offloaded: True when ``enable_model_cpu_offload`` was called on it.
        """
        backend = cls("<in-memory pipeline>", device, attention_slicing=False, cpu_offload=offloaded,
                      show_progress_bars=False)
        pipe.set_progress_bar_config(disable=True)
        backend._pipe, backend._device, backend._offloaded = pipe, device, offloaded
        return backend

    @property
    def device(self) -> str:
        return self._device or self._device_spec

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def describe(self) -> str:
        dtype = "fp16" if self._pipe is not None and str(self._pipe.unet.dtype) == "torch.float16" else "fp32"
        offload = ", model CPU offload" if self._offloaded else ""
        sliced = ", attention slicing" if self._pipe is not None and self._sliced else ""
        return f"backend=sdxl device={self.device} model={self.model} ({dtype}{offload}{sliced})"

    def _source(self) -> str:
        if self.model == TINY_MODEL:
            return str(tiny_refiner_path())
        path = Path(self.model).expanduser()
        if path.exists() and not (path / "model_index.json").is_file():
            raise ModelUnavailable(
                f"{path} has no model_index.json: point --model at a diffusers pipeline folder "
                "(save_pretrained output) or a Hugging Face model id"
            )
        return str(path) if path.exists() else self.model

    def load(self) -> None:
        if self._pipe is not None:
            return
        try:
            device = resolve_device(self._device_spec)
        except ValueError as exc:
            raise ModelUnavailable(f"{exc}; use --device cpu or --backend classic") from None
        source = self._source()  # before importing torch: a wrong folder fails in milliseconds
        import torch

        cuda = device.startswith("cuda")
        fp16 = self.use_fp16 and cuda
        _log.info("loading SDXL refiner %s on %s (%s)", source, device, "fp16" if fp16 else "fp32")
        pipe = self._from_pretrained(source, torch.float16 if fp16 else torch.float32, fp16)
        pipe.set_progress_bar_config(disable=not self.show_progress_bars)  # the denoising bar
        self._sliced = self.attention_slicing and cuda
        if self._sliced:
            pipe.enable_attention_slicing()
        if cuda and self.cpu_offload:
            # Only on CUDA: without an accelerator diffusers raises "requires accelerator".
            pipe.enable_model_cpu_offload(device=device)
            self._offloaded = True
        else:
            pipe.to(device)
            self._offloaded = False
        self._pipe, self._device = pipe, device

    def _from_pretrained(self, source: str, dtype: torch.dtype, fp16: bool) -> Any:
        from diffusers import StableDiffusionXLImg2ImgPipeline

        pipeline_cls: Any = StableDiffusionXLImg2ImgPipeline  # diffusers' annotations are partial
        if not self.show_progress_bars:
            from diffusers.utils import logging as diffusers_logging
            from transformers.utils import logging as transformers_logging

            diffusers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
            transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        # ``dtype`` is diffusers 0.42's name for the deprecated ``torch_dtype``.
        kwargs: dict[str, Any] = {"dtype": dtype, "add_watermarker": False}
        try:
            if fp16:
                try:
                    return pipeline_cls.from_pretrained(source, variant="fp16", **kwargs)
                except ValueError as exc:
                    if "variant" not in str(exc):
                        raise
                    _log.info("%s has no fp16 variant; loading the default weights as fp16", source)
            return pipeline_cls.from_pretrained(source, **kwargs)
        except Exception as exc:  # OSError, ValueError, hub errors: all mean "cannot load this model"
            raise ModelUnavailable(
                f"cannot load the SDXL refiner from {source!r}: {exc}. Download it first "
                "(huggingface-cli download stabilityai/stable-diffusion-xl-refiner-1.0), point --model at a "
                "local folder, or use --backend classic"
            ) from exc

    def check(self, params: RefineParams) -> None:
        if effective_steps(params) < 1:
            raise InvalidInput(
                f"num_inference_steps × strength = {params.num_inference_steps} × {params.strength:g} gives "
                "no denoising step; raise num_inference_steps or strength"
            )

    def refine(self, images: Sequence[Image.Image], params: RefineParams, seeds: Sequence[int],
               ctx: JobContext | None = None) -> list[Image.Image]:
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        self.check(params)
        self.load()
        out = []
        for index, (image, seed) in enumerate(zip(images, seeds, strict=True)):
            if ctx is not None:
                ctx.raise_if_stopped()  # between images: do not start one the caller no longer wants
            out.append(self._refine_one(image, params, seed, f"image {index + 1}/{len(images)}", ctx))
        return out

    def _scale_factor(self) -> int:
        pipe = self._pipe
        return int(getattr(pipe, "vae_scale_factor", 8)) if pipe is not None else 8  # 8 for every SDXL VAE

    def batch_key(self, images: Sequence[Image.Image], params: RefineParams) -> Hashable | None:
        """Same pipeline size (each side snapped down to a multiple of the VAE scale factor, as diffusers
        resizes) and the same scalar parameters; prompts and seeds may differ."""
        factor = self._scale_factor()
        sizes = {(w - w % factor, h - h % factor) for w, h in (image.size for image in images)}
        if len(sizes) != 1:
            return None  # one pipeline call resizes every image to the first one's size: never mix sizes
        return sizes.pop(), tuple(_sampling_args(params).items())

    def refine_batch(self, members: Sequence[BatchMember]) -> list[MemberOutcome]:
        """One pipeline call for every image of every member (prompts, negative prompts and seeds per image).

        Each member gets progress on its own context; a member that stops gets its error as its outcome
        (and ``on_stop`` at once) while the others go on; the loop stops only when every member stopped.
        """
        import torch

        outcomes: dict[int, MemberOutcome] = {}
        live: list[int] = []
        for index, member in enumerate(members):
            if member.ctx is not None and member.ctx.should_stop:
                outcomes[index] = stop_reason(member.ctx)  # stopped before the call: computes nothing
            else:
                live.append(index)
        if not live:
            return [outcomes[i] for i in range(len(members))]
        params = members[live[0]].params
        keys = {self.batch_key(members[i].images, members[i].params) for i in live}
        if len(keys) != 1 or None in keys:
            raise ValueError("refine_batch: members differ in image size or parameters; batch by batch_key()")
        for i in live:
            if len(members[i].seeds) != len(members[i].images):
                raise ValueError(f"member {i}: {len(members[i].images)} images but {len(members[i].seeds)} seeds")
        self.check(params)
        self.load()

        owners: list[int] = []  # member index of each image in the call
        rgbs: list[Image.Image] = []
        alphas: list[Image.Image | None] = []
        for i in live:
            for image in members[i].images:
                rgb, alpha = split_alpha(image)
                rgbs.append(rgb)
                alphas.append(alpha)
                owners.append(i)
        prompts = [members[i].params.prompt for i in owners]
        negatives = [members[i].params.negative_prompt for i in owners]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for i in live for seed in members[i].seeds]
        running = set(live)
        label = f"batch of {len(rgbs)} images from {len(live)} requests"
        pipe = self._pipe

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            total = int(pipe.num_timesteps)
            for i in sorted(running):
                member = members[i]
                if member.ctx is None:
                    continue
                if member.ctx.should_stop:
                    running.discard(i)
                    outcomes[i] = error = stop_reason(member.ctx)
                    _log.info("request %s left the batch after step %d of %d (%s); %d request(s) go on",
                              member.ctx.request_id, step + 1, total, error, len(running))
                    if member.on_stop is not None:
                        member.on_stop(error)
                else:
                    member.ctx.report(Stage.REFINE, step + 1, total, label)
            if not running:
                pipe._interrupt = True
                _log.info("stopping the denoising loop after step %d of %d: every request of the batch stopped",
                          step + 1, total)
                raise _EveryMemberStopped
            return tensors

        try:
            result = pipe(
                prompt=prompts,
                negative_prompt=negatives,
                image=rgbs,
                **_sampling_args(params),
                generator=generators,
                callback_on_step_end=on_step_end,
            )
        except _EveryMemberStopped:
            pipe.maybe_free_model_hooks()
            return [outcomes[i] for i in range(len(members))]
        except ServiceError:
            pipe.maybe_free_model_hooks()
            raise
        refined: dict[int, list[Image.Image]] = {i: [] for i in running}
        for owner, rgb, alpha, out in zip(owners, rgbs, alphas, result.images, strict=True):
            if owner in running:
                refined[owner].append(self._finish(out, rgb, alpha))
        outcomes.update(refined)
        return [outcomes[i] for i in range(len(members))]

    @staticmethod
    def _finish(out: Image.Image, rgb: Image.Image, alpha: Image.Image | None) -> Image.Image:
        """The pipeline's output at the input's size (diffusers snaps to a multiple of 8), alpha put back."""
        refined = out.convert("RGB")
        if refined.size != rgb.size:
            refined = refined.resize(rgb.size, Image.Resampling.LANCZOS)
        return reapply_alpha(refined, alpha)

    def _refine_one(self, image: Image.Image, params: RefineParams, seed: int, label: str,
                    ctx: JobContext | None) -> Image.Image:
        import torch

        rgb, alpha = split_alpha(image)  # the refiner drops alpha: keep it and put it back
        pipe = self._pipe

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if ctx is not None:
                # num_timesteps is int(steps × strength) for Euler and always matches the callback count.
                ctx.report(Stage.REFINE, step + 1, int(pipe.num_timesteps), label)
                if ctx.should_stop:
                    pipe._interrupt = True  # diffusers' own stop flag, in case the raise below is caught
                    _log.info("stopping the denoising loop after step %d of %d (%s)",
                              step + 1, pipe.num_timesteps, label)
                    ctx.raise_if_stopped()  # never hand back a half-denoised image
            return tensors

        try:
            result = pipe(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                image=rgb,
                **_sampling_args(params),
                generator=torch.Generator(device="cpu").manual_seed(seed),
                callback_on_step_end=on_step_end,
            )
        except ServiceError:
            pipe.maybe_free_model_hooks()  # the run stopped early: put offloaded models back as after a run
            raise
        return self._finish(result.images[0], rgb, alpha)

    def to_gpu(self) -> None:
        # With model CPU offload, accelerate's hooks move each sub-model in just before it runs.
        if self._pipe is not None and self.device.startswith("cuda") and not self._offloaded:
            self._pipe.to(self.device)

    def to_host(self) -> None:
        if self._pipe is None or not self.device.startswith("cuda"):
            return
        import torch

        if self._offloaded:
            self._pipe.maybe_free_model_hooks()  # offload whatever sub-model ran last
        else:
            self._pipe.to("cpu")
        torch.cuda.empty_cache()

    def unload(self) -> None:
        """Free the pipeline and empty the CUDA cache (the original feature's ``unload``); the next refine reloads."""
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        import torch

        try:
            if self._offloaded:
                pipe.remove_all_hooks()
            pipe.to("cpu")  # no lingering reference can keep VRAM alive after this
        except Exception:
            _log.warning("moving the SDXL refiner to the CPU failed; freeing it anyway", exc_info=True)
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._device, self._offloaded, self._sliced = None, False, False
        _log.info("SDXL refiner unloaded")
