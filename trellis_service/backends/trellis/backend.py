"""The trellis backend's lifecycle: construction, the preflight, load and unload, and the GPU moves."""

from __future__ import annotations

import gc
import importlib
import logging
from collections.abc import Callable, Mapping, Set
from typing import TYPE_CHECKING, Any

from PIL import Image

from trellis_service.backends.base import ImageTo3DBackend
from trellis_service.backends.trellis.generation import generate_asset, hand_over_asset, refine_handed_over_asset
from trellis_service.config import TrellisBackendConfig
from trellis_service.domain import GeneratedAsset, GenerationState, HandedOver
from trellis_service.preflight import PreflightConfig, PreflightResult, run_preflight
from trellisbox._domain.errors import ModelUnavailable
from trellisbox._domain.kinds import ArtifactKind
from trellisbox._domain.params import GenerationParams
from trellisbox._runtime.worker import JobContext

if TYPE_CHECKING:
    from trellis_service.gaussian_refinement import NovelViewPlan

_log = logging.getLogger(__name__)


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
        cuda_check: Whether a CUDA device is visible; injectable so tests can drive the adapter on a CPU
            against a stand-in with the upstream interface. None (the service): the preflight asks torch,
            which also validates the ``cuda:N`` index, the GPU's memory and its compute capability.
        allow_cpu: Accept ``device="cpu"``. Only the stand-in can run like that; upstream hard-codes
            ``.cuda()`` calls.
    """

    name = "trellis"

    def __init__(self, model: str, device: str = "auto", *, environment: Mapping[str, str] | None = None,
                 offline: bool = False, cuda_check: Callable[[], bool] | None = None,
                 allow_cpu: bool = False) -> None:
        self.preflight_config = PreflightConfig(model=model, device=device, offline=offline,
                                                environment=dict(environment or {}), allow_cpu=allow_cpu)
        self._cuda_check = cuda_check
        #: The last passed preflight: the device, model path and pipeline.json args that loading uses.
        self.preflight_result: PreflightResult | None = None
        #: Set by the preflight: False when loading would have to download weights first.
        self.weights_present = False
        self._pipeline: Any = None
        self._postprocessing: Any = None

    @classmethod
    def from_settings(cls, settings: TrellisBackendConfig, cuda_check: Callable[[], bool] | None = None
                      ) -> TrellisBackend:
        """The backend the service's settings describe."""
        return cls(settings.model, settings.device, environment=settings.trellis_environment(),
                   offline=settings.offline, cuda_check=cuda_check)

    @property
    def device(self) -> str:
        return self.preflight_result.device if self.preflight_result else self.preflight_config.device

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    @property
    def offline(self) -> bool:
        return self.preflight_config.offline

    def describe(self) -> str:
        return f"backend=trellis device={self.device} model={self.preflight_config.model}"

    def preflight(self) -> list[str]:
        """Check GPU, imports and weights; return the warnings, raise ModelUnavailable naming every failure.

        Records what loading needs (:attr:`preflight_result`) and ``weights_present``.
        """
        return [warning.detail for warning in self._run_preflight().warnings]

    def _run_preflight(self) -> PreflightResult:
        result = run_preflight(self.preflight_config, cuda_check=self._cuda_check)
        self.weights_present = result.weights_present
        if not result.ok:
            raise ModelUnavailable(result.explain())
        self.preflight_result = result
        return result

    def load(self) -> None:
        if self._pipeline is not None:
            return
        checked = self.preflight_result
        if checked is None:
            checked = self._run_preflight()
            for warning in checked.warnings:
                _log.warning("%s", warning.detail)
        # The preflight imported both, so these cannot fail now.
        pipelines = importlib.import_module("trellis.pipelines")
        self._postprocessing = importlib.import_module("trellis.utils.postprocessing_utils")
        import torch

        model_path, device = checked.model_path, checked.device
        _log.info("loading TRELLIS from %s onto %s", model_path, device)
        try:
            pipeline = pipelines.TrellisImageTo3DPipeline.from_pretrained(model_path)
        except Exception as exc:
            hint = ""
            if "Repository Not Found" in str(exc) or "RepositoryNotFound" in type(exc).__name__:
                hint = (" Upstream retries every local sub-model that fails to load from the Hub, so this usually "
                        "hides the real error (a CUDA extension failing while the model is built); the preflight "
                        "passed, so see the traceback above.")
            _log.exception("TrellisImageTo3DPipeline.from_pretrained(%r) failed", model_path)
            raise ModelUnavailable(f"loading TRELLIS from {self.preflight_config.model} failed: "
                                   f"{type(exc).__name__}: {exc}.{hint}") from exc
        if device.startswith("cuda"):
            # Upstream calls a bare .cuda() in places: make the configured GPU the current one.
            torch.cuda.set_device(torch.device(device))
        pipeline.to(torch.device(device))  # moves every sub-model; returns None upstream
        self._pipeline = pipeline

    def to_gpu(self) -> None:
        if self._pipeline is not None:
            import torch

            self._pipeline.to(torch.device(self.device))

    def to_host(self) -> None:
        if self._pipeline is None:
            return
        self._pipeline.cpu()
        self._empty_cuda_cache()

    def unload(self) -> None:
        if self._pipeline is None:
            return
        self._pipeline.cpu()
        self._pipeline = None
        gc.collect()
        self._empty_cuda_cache()

    def _empty_cuda_cache(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def generate(self, images: list[Image.Image], params: GenerationParams, formats: Set[ArtifactKind],
                 ctx: JobContext) -> GeneratedAsset:
        if self._pipeline is None:
            self.load()
        return generate_asset(self._pipeline, self._postprocessing, images, params, formats, ctx,
                              offline=self.offline, device=self.device)

    def hand_over(self, images: list[Image.Image], params: GenerationParams, ctx: JobContext) -> HandedOver:
        if self._pipeline is None:
            self.load()
        return hand_over_asset(self._pipeline, images, params, ctx, offline=self.offline, device=self.device)

    def refine_handed_over(self, state: GenerationState, plan: NovelViewPlan, images: list[Image.Image],
                           params: GenerationParams, formats: Set[ArtifactKind], seed: int,
                           ctx: JobContext) -> GeneratedAsset:
        if self._pipeline is None:
            self.load()
        return refine_handed_over_asset(self._postprocessing, state, plan, images, params, formats, seed, ctx,
                                        device=self.device)
