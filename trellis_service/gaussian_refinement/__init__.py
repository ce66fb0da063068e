"""Post-generation 3D Gaussian refinement: fit the generated Gaussians to the images the user gave.

- :mod:`.rasterizer`: differentiable Gaussian rasterisation (pure PyTorch; gsplat on CUDA);
- :mod:`.cameras`, :mod:`.pose`: orbit cameras and the recovery of each image's camera;
- :mod:`.views`: the images as targets (object cut out, square crop);
- :mod:`.fit`: the photometric fit and its figures;
- :mod:`.novel_views`: views from around the object for the refiner tier, and back as lower-weight targets;
- :mod:`.stage`: the stage as a backend runs it (progress, cancellation, report).

See docs/gaussian-refinement.md.
"""

from trellis_service.gaussian_refinement.novel_views import NovelViewPlan
from trellis_service.gaussian_refinement.stage import (
    RefinedSplats,
    RefinementReport,
    ViewReport,
    plan_novel_views,
    refine_splats,
)

__all__ = ["NovelViewPlan", "RefinedSplats", "RefinementReport", "ViewReport", "plan_novel_views", "refine_splats"]
