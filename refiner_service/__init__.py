"""The refiner service: SDXL-refiner img2img (or classic CPU restoration) behind gRPC, and the
``ImageRefiner`` Python API of the original TRELLIS-BOX feature.

Public: :class:`ImageRefiner` and the errors it raises (:class:`InvalidInput`: a parameter out of range;
:class:`ModelUnavailable`: a model that cannot load). Everything else in this package is the service's
implementation. Importing the package does not import torch; loading a model does."""

from refiner_service.api import ImageRefiner
from trellisbox._domain.errors import InvalidInput, ModelUnavailable

__all__ = ["ImageRefiner", "InvalidInput", "ModelUnavailable"]
