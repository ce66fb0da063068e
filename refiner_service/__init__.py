"""The refiner service: SDXL-refiner img2img (or classic CPU restoration) behind gRPC, and the
``ImageRefiner`` Python API of the original TRELLIS-BOX feature.

Public: :class:`ImageRefiner`. Everything else in this package is the service's implementation. Importing
the package does not import torch; loading a model does."""

from refiner_service.api import ImageRefiner

__all__ = ["ImageRefiner"]
