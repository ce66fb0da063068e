"""The interface every image-to-3D backend implements: :class:`ModelBackend` plus :meth:`generate`."""

from __future__ import annotations

import abc
from collections.abc import Set
from typing import TYPE_CHECKING

from PIL import Image

from trellis_service.domain import GeneratedAsset, GenerationState, HandedOver
from trellisbox._domain.errors import InvalidInput
from trellisbox._domain.imaging import synthetic_object
from trellisbox._domain.kinds import ArtifactKind
from trellisbox._domain.params import GenerationParams, SamplerParams
from trellisbox._runtime.model import ModelBackend
from trellisbox._runtime.worker import JobContext

if TYPE_CHECKING:
    from trellis_service.gaussian_refinement import NovelViewPlan

#: Warm-up: the whole path (preprocess, both samplers, decode, bake) at the smallest settings.
WARM_UP_PARAMS = GenerationParams(seed=0, sparse_structure=SamplerParams(steps=2, cfg_strength=7.5),
                                  slat=SamplerParams(steps=2, cfg_strength=3.0), texture_size=256)


class ImageTo3DBackend(ModelBackend):
    """One image-to-3D model. Upstream pipelines are not thread-safe: the service's one model thread drives
    an instance, so implementations need no locking of their own."""

    @abc.abstractmethod
    def generate(self, images: list[Image.Image], params: GenerationParams, formats: Set[ArtifactKind],
                 ctx: JobContext) -> GeneratedAsset:
        """Generate one asset from one image or several views of one object.

        Args:
            images: Decoded RGB or RGBA images (at least one).
            params: Validated generation parameters.
            formats: What to produce: a mesh for ``GLB``, splats for ``GAUSSIAN_PLY``.
            ctx: Progress reporting and cancellation of this job.

        Returns:
            The asset with the CPU-side mesh and splats asked for; the servicer encodes them.
        """

    def hand_over(self, images: list[Image.Image], params: GenerationParams, ctx: JobContext) -> HandedOver:
        """The first call of a novel-view Gaussian refinement: generate, recover the images' cameras and render the
        novel views; what :meth:`refine_handed_over` needs goes into the returned state. Arguments as
        :meth:`generate`."""
        raise InvalidInput(f"generation.gaussian_refinement.novel_views: the {self.name} backend cannot refine "
                           "with novel views")

    def refine_handed_over(self, state: GenerationState, plan: NovelViewPlan, images: list[Image.Image],
                           params: GenerationParams, formats: Set[ArtifactKind], seed: int,
                           ctx: JobContext) -> GeneratedAsset:
        """The second call: fit the handed-over Gaussians to the images and the refined novel views, then export.

        Args:
            state: What :meth:`hand_over` handed over.
            plan: The recovered cameras and the novel views' cameras, with the refined novel views as ``renders``.
            images: The images of the first call.
            params: The parameters of the first call.
            formats: What to produce.
            seed: The first call's seed.
            ctx: Progress reporting and cancellation of this job.
        """
        raise InvalidInput(f"generation.gaussian_refinement.novel_views: the {self.name} backend cannot refine "
                           "with novel views")

    def warm_up(self) -> None:
        """One small generation with a real alpha channel (so warm-up never needs background removal)."""
        self.generate([synthetic_object(96)], WARM_UP_PARAMS, {ArtifactKind.GLB}, JobContext("warm-up", None,
                                                                                           lambda _: None))
