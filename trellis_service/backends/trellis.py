"""The ``trellis`` backend: upstream ``TrellisImageTo3DPipeline`` (microsoft/TRELLIS), imported lazily.

TRELLIS is never vendored or installed by this project: it comes from the TRELLIS base image (built
with its CUDA extensions for the target GPU) and is imported from ``PYTHONPATH``. This adapter:

- runs a **preflight** that names the real cause of a failure (no GPU, a CUDA extension that does not
  import, a model folder without ``pipeline.json`` or a checkpoint, weights not in the cache while
  offline, DINOv2 missing), because upstream's loader retries every failed local sub-model from the
  Hub and so reports nearly everything as "Repository Not Found";
- calls ``run`` / ``run_multi_image`` exactly as upstream documents them, asking only for
  ``['gaussian', 'mesh']`` (what the GLB bake and the PLY need);
- reports progress and honours cancellation at stage boundaries and after every sampler step by
  temporarily wrapping the pipeline's own stage methods and its samplers' ``sample_once`` on the
  instance (upstream code is untouched);
- exports the GLB with ``postprocessing_utils.to_glb`` and the splats with ``Gaussian.save_ply``.

One pipeline instance is only ever driven by one :class:`~trellisbox._runtime.worker.ModelWorker` thread:
``run`` seeds the global torch RNG and ``run_multi_image`` patches shared sampler objects, so two
concurrent calls would corrupt each other.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Set
from pathlib import Path
from typing import Any

from PIL import Image

from trellis_service.backends.base import ImageTo3DBackend
from trellis_service.domain import GeneratedAsset, StageClock
from trellis_service.exporters import PlyDocument, written_ply
from trellisbox._domain.errors import ModelUnavailable
from trellisbox._domain.imaging import has_real_alpha
from trellisbox._domain.kinds import ArtifactKind, Stage
from trellisbox._domain.params import GenerationParams, MultiImageMode, random_seed
from trellisbox._runtime.devices import cuda_available, resolve_device
from trellisbox._runtime.worker import JobContext

_log = logging.getLogger(__name__)

_BASE_IMAGE_HINT = (
    "The trellis backend needs the TRELLIS base image (TRELLIS on PYTHONPATH with its CUDA extensions "
    "built for this GPU); or run this service with --backend preview."
)

#: What each module TRELLIS imports is for, and how to get it.
_MODULE_HINTS: dict[str, str] = {
    "trellis": "the TRELLIS package itself: put the TRELLIS checkout on PYTHONPATH",
    "spconv": "sparse convolution (SPARSE_BACKEND=spconv): install the spconv-cuXXX wheel matching CUDA, "
              "or set --sparse-backend torchsparse",
    "torchsparse": "sparse convolution (SPARSE_BACKEND=torchsparse): build torchsparse, or use spconv",
    "flash_attn": "attention kernels (ATTN_BACKEND / SPARSE_ATTN_BACKEND=flash_attn): install flash-attn "
                  "for this GPU, or set --attn-backend and --sparse-attn-backend to xformers",
    "xformers": "attention kernels (ATTN_BACKEND / SPARSE_ATTN_BACKEND=xformers): install xformers "
                "matching torch, or use flash_attn",
    "nvdiffrast": "the differentiable rasterizer used by the GLB texture bake (built by TRELLIS's setup "
                  "script with --nvdiffrast)",
    "diff_gaussian_rasterization": "the Gaussian rasterizer used to render views for the texture bake "
                                   "(TRELLIS's setup script, --mipgaussian)",
    "plyfile": "the PLY writer of Gaussian.save_ply; TRELLIS's setup script does not install it: "
               "pip install plyfile",
    "kaolin": "FlexiCubes mesh extraction (TRELLIS's setup script, --kaolin)",
    "utils3d": "geometry utilities (TRELLIS's setup script, --basic)",
    "xatlas": "UV unwrapping for the GLB (pip install xatlas)",
    "pyvista": "mesh simplification for the GLB (pip install pyvista)",
    "pymeshfix": "hole filling for the GLB (pip install pymeshfix)",
    "igraph": "hole filling for the GLB (pip install igraph)",
    "rembg": "background removal (pip install rembg onnxruntime)",
    "easydict": "TRELLIS's config dicts (pip install easydict)",
}

#: The module each backend setting makes TRELLIS import.
_COMPILED_MODULES: dict[str, str] = {
    "spconv": "spconv.pytorch", "torchsparse": "torchsparse", "flash_attn": "flash_attn", "xformers": "xformers.ops",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _module_hint(name: str) -> str:
    top = name.split(".")[0]
    return _MODULE_HINTS.get(top, "a dependency of TRELLIS")


class TrellisBackend(ImageTo3DBackend):
    """Upstream TRELLIS image-to-3D on one CUDA device.

    Args:
        model: Hugging Face model id (``microsoft/TRELLIS-image-large``; must be in the local cache
            when offline) or a local folder with ``pipeline.json`` and ``ckpts/``.
        device: ``auto`` (the first visible GPU), ``cuda`` or ``cuda:N``.
        environment: Variables TRELLIS reads at import time (``ATTN_BACKEND``, ``SPARSE_BACKEND``, ...),
            put into ``os.environ`` before the first import.
        offline: Never download; missing weights fail the preflight (the service's settings turn it on when
            ``HF_HUB_OFFLINE`` is set).
        cuda_check: Whether a CUDA device is visible; injectable so tests can drive the adapter
            on a CPU against a stand-in with the upstream interface.
        allow_cpu: Accept ``device="cpu"``. Only the stand-in can run like that; upstream hard-codes
            ``.cuda()`` calls.
    """

    name = "trellis"

    def __init__(self, model: str, device: str = "auto", *, environment: Mapping[str, str] | None = None,
                 offline: bool = False, cuda_check: Callable[[], bool] = cuda_available,
                 allow_cpu: bool = False) -> None:
        self._model = model
        self._device_spec = device
        self._environment = dict(environment or {})
        self._offline = offline
        self._cuda_check = cuda_check
        self._allow_cpu = allow_cpu
        self._device = ""
        self._checked = False
        self._pipeline: Any = None
        self._postprocessing: Any = None
        self._model_path = model
        self._pipeline_args: dict[str, Any] = {}
        #: Set by the preflight: False when loading would have to download weights first.
        self.weights_present = False

    # -- configuration -------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return self._device or self._device_spec

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    @property
    def offline(self) -> bool:
        return self._offline

    def describe(self) -> str:
        return f"backend=trellis device={self.device} model={self._model}"

    def _apply_environment(self) -> None:
        # TRELLIS reads these when its modules are first imported; later changes have no effect.
        for key, value in self._environment.items():
            if os.environ.get(key) != value:
                _log.info("setting %s=%s for TRELLIS", key, value)
            os.environ[key] = value

    # -- preflight -------------------------------------------------------------------------------------

    def preflight(self) -> list[str]:
        """Check GPU, imports and weights; return warnings, raise ModelUnavailable with the real cause."""
        warnings: list[str] = []
        self._device = self._check_device()
        self._apply_environment()
        self._check_imports()
        warnings += self._check_weights()
        warnings += self._check_dinov2()
        u2net = self._u2net_path()
        if not u2net.is_file():
            warnings.append(
                f"rembg's u2net.onnx is not at {u2net} (U2NET_HOME): images without an alpha channel need it "
                "for background removal" + (" and cannot download it while offline" if self.offline else
                                            "; rembg will download it on first use")
            )
        self._checked = True
        return warnings

    def _check_device(self) -> str:
        spec = self._device_spec
        if spec == "cpu":
            if self._allow_cpu:
                return "cpu"
            raise ModelUnavailable(
                "device=cpu: TRELLIS has no CPU path (its sparse convolution, attention and rasterizers "
                "are CUDA-only). Set --device auto or cuda:N on a GPU host, or use --backend preview."
            )
        if not self._cuda_check():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            detail = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
            raise ModelUnavailable(
                f"no CUDA GPU is visible (torch.cuda.is_available() is False; {detail}). TRELLIS runs only on "
                "CUDA: schedule this service on a GPU node (nvidia.com/gpu: 1) with the NVIDIA runtime, "
                "or use --backend preview."
            )
        if spec in ("auto", "cuda"):
            return "cuda:0"
        if self._cuda_check is cuda_available:  # the real check: also validate the index
            try:
                return resolve_device(spec)
            except ValueError as exc:
                raise ModelUnavailable(f"{exc}; set --device auto or a visible cuda:N") from exc
        return spec

    def _import(self, module: str) -> Any:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing = exc.name or module
            raise ModelUnavailable(
                f"TRELLIS cannot be imported: importing {module} failed because module {missing!r} is missing "
                f"({_module_hint(missing)}). {_BASE_IMAGE_HINT}"
            ) from exc
        except Exception as exc:  # an extension that exists but does not load (ABI, CUDA mismatch)
            raise ModelUnavailable(
                f"TRELLIS cannot be imported: importing {module} failed with {type(exc).__name__}: {exc} "
                f"(probably a CUDA extension built for another CUDA, torch or GPU). {_BASE_IMAGE_HINT}"
            ) from exc

    def _extension_modules(self) -> list[str]:
        """The compiled modules TRELLIS will import with the configured backends (the submodule that
        holds the compiled code, e.g. ``spconv.pytorch``: the top-level package may import without it)."""
        sparse = os.environ.get("SPARSE_BACKEND", "spconv")
        modules = [_COMPILED_MODULES.get(sparse, sparse)]
        for key in ("ATTN_BACKEND", "SPARSE_ATTN_BACKEND"):
            backend = os.environ.get(key, "flash_attn")
            if backend in ("flash_attn", "xformers") and _COMPILED_MODULES[backend] not in modules:
                modules.append(_COMPILED_MODULES[backend])
        return [*modules, "nvdiffrast.torch", "diff_gaussian_rasterization", "plyfile"]

    def _check_imports(self) -> None:
        if importlib.util.find_spec("trellis") is None:
            raise ModelUnavailable(
                "the trellis package is not importable (no module 'trellis' on PYTHONPATH="
                f"{os.environ.get('PYTHONPATH', '')!r}). {_BASE_IMAGE_HINT}"
            )
        for module in self._extension_modules():
            self._import(module)
        self._import("trellis.pipelines")
        self._import("trellis.utils.postprocessing_utils")

    def _local_folder(self) -> Path | None:
        """The model as a local folder, or None for a hub id. Raises for a path that does not exist."""
        path = Path(self._model).expanduser()
        if path.is_dir():
            return path.resolve()
        if self._model.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(self._model):
            raise ModelUnavailable(
                f"model folder {self._model!r} does not exist. Point --model at a copy of "
                "microsoft/TRELLIS-image-large (pipeline.json and ckpts/) or at a hub id such as "
                "microsoft/TRELLIS-image-large."
            )
        return None

    def _check_weights(self) -> list[str]:
        folder = self._local_folder()
        if folder is not None:
            self._model_path = str(folder)
            config_path = folder / "pipeline.json"
            if not config_path.is_file():
                raise ModelUnavailable(
                    f"model folder {folder} has no pipeline.json; it must be a full copy of "
                    "microsoft/TRELLIS-image-large (pipeline.json and ckpts/<name>.json + .safetensors)."
                )
            self._pipeline_args = self._read_pipeline_json(config_path)
            missing = [
                f"ckpts file {name}{suffix} (models.{key})"
                for key, name in self._model_entries()
                for suffix in (".json", ".safetensors")
                if not (folder / f"{name}{suffix}").is_file()
            ]
            if missing:
                raise ModelUnavailable(
                    f"model folder {folder} lacks {', '.join(missing)} named in its pipeline.json. Upstream would "
                    "try to fetch them from the Hub and fail with 'Repository Not Found'; copy the complete "
                    "ckpts/ folder."
                )
            self.weights_present = True
            return []
        return self._check_hub_cache()

    def _read_pipeline_json(self, path: Path | str) -> dict[str, Any]:
        try:
            with open(path, encoding="utf-8") as handle:
                args = json.load(handle)["args"]
            if not isinstance(args, dict) or not isinstance(args.get("models"), dict):
                raise KeyError("args.models")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelUnavailable(f"{path} is not a TRELLIS pipeline.json ({type(exc).__name__}: {exc})") from exc
        return args

    def _model_entries(self) -> list[tuple[str, str]]:
        return [(str(k), str(v)) for k, v in self._pipeline_args.get("models", {}).items()]

    def _check_hub_cache(self) -> list[str]:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return [f"huggingface_hub is not installed: cannot check whether {self._model} is cached"]
        config = try_to_load_from_cache(self._model, "pipeline.json")
        if not isinstance(config, str):
            if self.offline:
                raise ModelUnavailable(
                    f"{self._model} is not in the local Hugging Face cache (HF_HOME="
                    f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}) and downloads are off (offline). "
                    f"Pre-fetch it with `huggingface-cli download {self._model}`, mount the cache, or point "
                    "--model at a local folder."
                )
            return [f"{self._model} is not in the local Hugging Face cache: loading will download it (several GB)"]
        self._pipeline_args = self._read_pipeline_json(config)
        missing = [
            f"{name}{suffix}"
            for _, name in self._model_entries()
            for suffix in (".json", ".safetensors")
            if not isinstance(try_to_load_from_cache(self._model, f"{name}{suffix}"), str)
        ]
        if missing and self.offline:
            raise ModelUnavailable(
                f"the cached copy of {self._model} lacks {', '.join(missing)} and downloads are off (offline). "
                f"Complete it with `huggingface-cli download {self._model}`."
            )
        if missing:
            return [f"the cached copy of {self._model} lacks {', '.join(missing)}: loading will download them"]
        self.weights_present = True
        return []

    def _check_dinov2(self) -> list[str]:
        name = str(self._pipeline_args.get("image_cond_model", "dinov2_vitl14_reg"))
        try:
            import torch.hub
        except ImportError:
            return []
        hub = Path(torch.hub.get_dir())
        checkpoint = f"{name[:-4]}_reg4_pretrain.pth" if name.endswith("_reg") else f"{name}_pretrain.pth"
        missing = [str(path) for path in (hub / "facebookresearch_dinov2_main", hub / "checkpoints" / checkpoint)
                   if not path.exists()]
        if not missing:
            return []
        message = (f"DINOv2 ({name}, the image encoder TRELLIS loads through torch.hub) is missing: "
                   f"{', '.join(missing)} (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')})")
        if self.offline:
            raise ModelUnavailable(
                f"{message}. Downloads are off (offline): pre-fetch it with torch.hub.load('facebookresearch/"
                f"dinov2', '{name}') on a connected machine and ship $TORCH_HOME/hub."
            )
        return [f"{message}; torch.hub will download it at load"]

    @staticmethod
    def _u2net_path() -> Path:
        return Path(os.environ.get("U2NET_HOME", "~/.u2net")).expanduser() / "u2net.onnx"

    # -- lifecycle -----------------------------------------------------------------------------------

    def load(self) -> None:
        if self._pipeline is not None:
            return
        if not self._checked:
            for warning in self.preflight():
                _log.warning("%s", warning)
        pipelines = self._import("trellis.pipelines")
        self._postprocessing = self._import("trellis.utils.postprocessing_utils")
        import torch

        _log.info("loading TRELLIS from %s onto %s", self._model_path, self._device)
        try:
            pipeline = pipelines.TrellisImageTo3DPipeline.from_pretrained(self._model_path)
        except Exception as exc:
            hint = ""
            if "Repository Not Found" in str(exc) or "RepositoryNotFound" in type(exc).__name__:
                hint = (" Upstream retries every local sub-model that fails to load from the Hub, so this usually "
                        "hides the real error (a CUDA extension failing while the model is built); the preflight "
                        "passed, so see the traceback above.")
            _log.exception("TrellisImageTo3DPipeline.from_pretrained(%r) failed", self._model_path)
            raise ModelUnavailable(f"loading TRELLIS from {self._model} failed: {type(exc).__name__}: {exc}.{hint}") \
                from exc
        if self._device.startswith("cuda"):
            # Upstream calls a bare .cuda() in places: make the configured GPU the current one.
            torch.cuda.set_device(torch.device(self._device))
        pipeline.to(torch.device(self._device))  # moves every sub-model; returns None upstream
        self._pipeline = pipeline

    def to_gpu(self) -> None:
        if self._pipeline is not None:
            import torch

            self._pipeline.to(torch.device(self._device))

    def to_host(self) -> None:
        if self._pipeline is None:
            return
        self._pipeline.cpu()
        if self._device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def unload(self) -> None:
        if self._pipeline is None:
            return
        self._pipeline.cpu()
        self._pipeline = None
        gc.collect()
        if self._device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # -- generation ----------------------------------------------------------------------------------

    def generate(self, images: list[Image.Image], params: GenerationParams, formats: Set[ArtifactKind],
                 ctx: JobContext) -> GeneratedAsset:
        if self._pipeline is None:
            self.load()
        pipeline = self._pipeline
        seed = params.seed if params.seed is not None else random_seed()
        notes: list[str] = []
        if self.offline and not self._u2net_path().is_file() and not all(has_real_alpha(i) for i in images):
            raise ModelUnavailable(
                f"an input image has no alpha channel, so TRELLIS must remove its background with rembg, but "
                f"{self._u2net_path()} is missing and downloads are off. Send RGBA images with a cut-out, or "
                "install u2net.onnx under U2NET_HOME."
            )
        clock = StageClock()
        sparse = {"steps": params.sparse_structure.steps, "cfg_strength": params.sparse_structure.cfg_strength}
        slat = {"steps": params.slat.steps, "cfg_strength": params.slat.cfg_strength}
        ctx.raise_if_stopped()
        with self._instrumented(pipeline, ctx, clock, params, len(images), formats):
            if len(images) == 1:
                outputs = pipeline.run(
                    images[0], seed=seed, sparse_structure_sampler_params=sparse, slat_sampler_params=slat,
                    formats=["gaussian", "mesh"], preprocess_image=True,
                )
            else:
                mode = params.multi_image_mode.value
                notes.append(f"{len(images)} views combined with run_multi_image(mode={mode!r})")
                if params.multi_image_mode is MultiImageMode.STOCHASTIC and len(images) > min(
                        params.sparse_structure.steps, params.slat.steps):
                    notes.append("more views than sampler steps: in stochastic mode some views are never used; "
                                 "raise the steps or use multidiffusion")
                outputs = pipeline.run_multi_image(
                    images, seed=seed, sparse_structure_sampler_params=sparse, slat_sampler_params=slat,
                    formats=["gaussian", "mesh"], preprocess_image=True, mode=mode,
                )
        gaussian, mesh = outputs["gaussian"][0], outputs["mesh"][0]
        total = self._export_steps(formats)
        glb_mesh: Any = None
        splats: PlyDocument | None = None
        with clock.stage(Stage.EXPORT):
            if ArtifactKind.GLB in formats:
                ctx.raise_if_stopped()
                ctx.report(Stage.EXPORT, 1, total, "simplifying and baking the texture")
                glb_mesh = self._postprocessing.to_glb(
                    gaussian, mesh, simplify=params.mesh_simplify, texture_size=params.texture_size,
                )
            if ArtifactKind.GAUSSIAN_PLY in formats:
                ctx.raise_if_stopped()
                ctx.report(Stage.EXPORT, total - 1, total, "copying the Gaussians off the GPU")
                splats = written_ply(gaussian.save_ply)
            ctx.report(Stage.EXPORT, total, total, "done")
        return GeneratedAsset(seed=seed, mesh=glb_mesh, splats=splats, timings=clock.timings, notes=notes)

    @staticmethod
    def _export_steps(formats: Set[ArtifactKind]) -> int:
        # decode_slat, then the bake for GLB, then the PLY copy
        return 1 + int(ArtifactKind.GLB in formats) + int(ArtifactKind.GAUSSIAN_PLY in formats)

    @contextlib.contextmanager
    def _instrumented(self, pipeline: Any, ctx: JobContext, clock: StageClock, params: GenerationParams,
                      n_images: int, formats: Set[ArtifactKind]) -> Iterator[None]:
        """Wrap the pipeline's stage methods (instance attributes shadow the class's) for the duration of
        one call: progress and timing per stage, a cancellation check before each stage and sampler step."""
        patches: list[tuple[object, str, object]] = []  # (target, name, previous instance attribute)
        missing = object()

        def patch(target: object, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
            patches.append((target, name, vars(target).get(name, missing)))
            setattr(target, name, make(getattr(target, name)))

        preprocessed = [0]

        def staged(stage: Stage, before: Callable[[], None]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
            def make(original: Callable[..., Any]) -> Callable[..., Any]:
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    ctx.raise_if_stopped()
                    before()
                    with clock.stage(stage):
                        return original(*args, **kwargs)
                return wrapper
            return make

        def sampler_steps(stage: Stage, total: int, message: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
            done = [0]

            def make(original: Callable[..., Any]) -> Callable[..., Any]:
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    ctx.raise_if_stopped()
                    out = original(*args, **kwargs)
                    done[0] += 1
                    ctx.report(stage, min(done[0], total), total, message)
                    return out
                return wrapper
            return make

        def before_preprocess() -> None:
            ctx.report(Stage.PREPROCESS, preprocessed[0], n_images, "removing background and cropping")
            preprocessed[0] += 1

        patch(pipeline, "preprocess_image", staged(Stage.PREPROCESS, before_preprocess))
        patch(pipeline, "get_cond", staged(
            Stage.PREPROCESS, lambda: ctx.report(
                Stage.PREPROCESS, n_images, n_images, "encoding the image with DINOv2")))
        patch(pipeline, "sample_sparse_structure", staged(
            Stage.SPARSE_STRUCTURE, lambda: ctx.report(
                Stage.SPARSE_STRUCTURE, 0, params.sparse_structure.steps, "sampling sparse structure")))
        patch(pipeline, "sample_slat", staged(
            Stage.SLAT, lambda: ctx.report(
                Stage.SLAT, 0, params.slat.steps, "sampling structured latent")))
        patch(pipeline, "decode_slat", staged(
            Stage.EXPORT, lambda: ctx.report(
                Stage.EXPORT, 0, self._export_steps(formats), "decoding mesh and Gaussians")))
        samplers = [getattr(pipeline, name, None) for name in ("sparse_structure_sampler", "slat_sampler")]
        for sampler, stage, total, message in (
            (samplers[0], Stage.SPARSE_STRUCTURE, params.sparse_structure.steps, "sparse structure step"),
            (samplers[1], Stage.SLAT, params.slat.steps, "structured latent step"),
        ):
            if sampler is not None and hasattr(sampler, "sample_once"):
                patch(sampler, "sample_once", sampler_steps(stage, total, message))
        try:
            yield
        finally:
            for target, name, previous in reversed(patches):
                if previous is missing:
                    with contextlib.suppress(AttributeError):
                        delattr(target, name)
                else:
                    setattr(target, name, previous)
            for sampler in samplers:
                # run_multi_image's inject_sampler_multi_image restores the sampler only on success; after a
                # cancel inside it the sampler would stay patched and break every later run.
                if sampler is not None and "_old_inference_model" in vars(sampler):
                    sampler._inference_model = sampler._old_inference_model
                    delattr(sampler, "_old_inference_model")
