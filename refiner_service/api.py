"""``ImageRefiner``: the Python API of the original TRELLIS-BOX feature (``library.image_refiner``), kept as it was.

    from refiner_service import ImageRefiner

    refiner = ImageRefiner(device="cuda", use_fp16=True)
    refined = refiner.refine(Image.open("input.png"), strength=0.3)
    refiner.unload()  # free the VRAM before TRELLIS runs

The gRPC service does not go through this class: it drives the backends directly so that a failure
becomes a status code instead of a silently unrefined image.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from types import TracebackType

from PIL import Image

from refiner_service.backends import RefinerBackend, create_backend, seeds_for
from refiner_service.config import DEFAULT_MODEL, BackendName, RefinerBackendConfig
from trellisbox._domain.errors import Cancelled, DeadlineExceeded, InvalidInput
from trellisbox._domain.imaging import normalize_mode
from trellisbox._domain.params import RefineParams, build, random_seed

_log = logging.getLogger(__name__)
_DEFAULTS = RefineParams()  # the defaults live in one place: the parameter definitions


class ImageRefiner:
    """Refines images with the Stable Diffusion XL refiner (img2img) before 3D generation.

    The model is loaded on first use and stays loaded until :meth:`unload`. Calls are serialised (the
    diffusers pipeline is not thread-safe). Usable as a context manager that unloads on exit.

    Args:
        model: Hugging Face model id, local diffusers folder, or ``"tiny"`` (a random-weight model of the
            same architecture, built offline; for tests).
        device: ``"auto"`` (first CUDA GPU, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        use_fp16: Load fp16 weights and compute in fp16 on CUDA (ignored on CPU).
        backend: ``"sdxl"`` (diffusers), ``"classic"`` (CPU restoration without weights) or ``"auto"``
            (``sdxl`` when a GPU and local weights are present, else ``classic``; logged loudly).
        enable_attention_slicing: On CUDA, compute attention in slices to lower peak memory (ignored on CPU).
        enable_cpu_offload: On CUDA, keep sub-models in host RAM and move each to the GPU only while it
            runs (ignored on CPU).
        fall_back_to_input: When refinement fails (model cannot load, out of memory, ...), log a warning
            and return the input image unchanged, as the seed did. ``False`` raises instead. Invalid
            arguments and cancellation are always raised.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        use_fp16: bool = True,
        backend: BackendName = "sdxl",
        enable_attention_slicing: bool = True,
        enable_cpu_offload: bool = True,
        fall_back_to_input: bool = True,
    ) -> None:
        self.fall_back_to_input = fall_back_to_input
        self.backend: RefinerBackend = create_backend(RefinerBackendConfig(
            backend=backend, model=model, device=device, use_fp16=use_fp16,
            attention_slicing=enable_attention_slicing, cpu_offload=enable_cpu_offload,
        ))
        self.last_seeds: list[int] = []  # seeds used by the latest call, to reproduce a result
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        """Where the model runs (``cpu`` or ``cuda:N`` once loaded)."""
        return self.backend.device

    @property
    def loaded(self) -> bool:
        return self.backend.loaded

    def refine(
        self,
        image: Image.Image,
        strength: float = _DEFAULTS.strength,
        guidance_scale: float = _DEFAULTS.guidance_scale,
        num_inference_steps: int = _DEFAULTS.num_inference_steps,
        prompt: str = _DEFAULTS.prompt,
        negative_prompt: str = _DEFAULTS.negative_prompt,
        seed: int | None = None,
        aesthetic_score: float = _DEFAULTS.aesthetic_score,
        negative_aesthetic_score: float = _DEFAULTS.negative_aesthetic_score,
    ) -> Image.Image:
        """Refine one image.

        Args:
            image: Input image (any mode; transparency is kept and the output is RGBA then, else RGB).
            strength: How far the image may move, (0, 1]; lower stays closer to the input.
            guidance_scale: Classifier-free guidance, [0, 30].
            num_inference_steps: Scheduler steps, [1, 200]; ``int(steps × strength)`` of them run.
            prompt: What the refined image should look like.
            negative_prompt: What it should not look like.
            seed: Noise seed; random when None (the seed used is in :attr:`last_seeds`).
            aesthetic_score: SDXL-refiner aesthetic conditioning of the positive branch.
            negative_aesthetic_score: Aesthetic conditioning of the negative branch.

        Returns:
            The refined image at the input's size, or the input itself when refinement failed and
            ``fall_back_to_input`` is set.

        Raises:
            InvalidInput: a parameter is out of range.
            ModelUnavailable: the model cannot be loaded (only when ``fall_back_to_input`` is False).
        """
        return self.refine_batch(
            [image], strength=strength, guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps, prompt=prompt, negative_prompt=negative_prompt,
            seed=seed, aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
        )[0]

    def refine_batch(
        self,
        images: Sequence[Image.Image],
        strength: float = _DEFAULTS.strength,
        guidance_scale: float = _DEFAULTS.guidance_scale,
        num_inference_steps: int = _DEFAULTS.num_inference_steps,
        prompt: str = _DEFAULTS.prompt,
        negative_prompt: str = _DEFAULTS.negative_prompt,
        seed: int | None = None,
        aesthetic_score: float = _DEFAULTS.aesthetic_score,
        negative_aesthetic_score: float = _DEFAULTS.negative_aesthetic_score,
    ) -> list[Image.Image]:
        """Refine several images with the same parameters; image ``i`` uses seed ``seed + i``.

        Arguments are those of :meth:`refine`. A failure falls back (or raises) per image.
        """
        params = build(RefineParams, dict(
            strength=strength, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
            prompt=prompt, negative_prompt=negative_prompt, seed=seed, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
        ))
        seeds = seeds_for(random_seed() if seed is None else seed, len(images))
        inputs = [normalize_mode(image) for image in images]
        with self._lock:
            self.last_seeds = seeds
            return [self._refine_one(image, params, s) for image, s in zip(inputs, seeds, strict=True)]

    def _refine_one(self, image: Image.Image, params: RefineParams, seed: int) -> Image.Image:
        try:
            return self.backend.refine([image], params, [seed])[0]
        except (InvalidInput, Cancelled, DeadlineExceeded):
            raise  # the caller's mistake or the caller's decision: never hidden behind a fallback
        except Exception as exc:
            if not self.fall_back_to_input:
                raise
            _log.warning("refinement failed (%s: %s); returning the input image unchanged",
                         type(exc).__name__, exc)
            return image

    def unload(self) -> None:
        """Free the model: move it off the GPU, drop it and empty the CUDA cache. The next call reloads."""
        with self._lock:
            self.backend.unload()

    def __enter__(self) -> ImageRefiner:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unload()
