"""The ``trellis`` backend: upstream ``TrellisImageTo3DPipeline`` (microsoft/TRELLIS), imported lazily.

TRELLIS is never vendored or installed by this project: it comes from the TRELLIS base image (built
with its CUDA extensions for the target GPU) and is imported from ``PYTHONPATH``. The adapter:

- runs the **preflight** (:mod:`trellis_service.preflight`, the same checks the container entrypoint runs)
  that names the real cause of a failure (no GPU, a CUDA extension that does not import, a model folder
  without ``pipeline.json`` or a checkpoint, weights not in the cache while offline, DINOv2 missing),
  because upstream's loader retries every failed local sub-model from the Hub and so reports nearly
  everything as "Repository Not Found";
- calls ``run`` / ``run_multi_image`` exactly as upstream documents them, asking only for
  ``['gaussian', 'mesh']`` (what the GLB bake and the PLY need) (:mod:`.generation`);
- reports progress and honours cancellation at stage boundaries and after every sampler step by
  temporarily wrapping the pipeline's own stage methods and its samplers' ``sample_once`` on the
  instance; upstream code is untouched (:mod:`.instrumentation`);
- exports the GLB with ``postprocessing_utils.to_glb`` and the splats with ``Gaussian.save_ply``.

One pipeline instance is only ever driven by one :class:`~trellisbox._runtime.worker.ModelWorker` thread:
``run`` seeds the global torch RNG and ``run_multi_image`` patches shared sampler objects, so two
concurrent calls would corrupt each other.
"""

from trellis_service.backends.trellis.backend import TrellisBackend

__all__ = ["TrellisBackend"]
