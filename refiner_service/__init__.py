"""The refiner service: SDXL-refiner img2img (or classic CPU restoration) behind gRPC, and the seed's
``ImageRefiner`` Python API. Importing the package does not import torch; loading a model does."""

from refiner_service.api import ImageRefiner

__all__ = ["ImageRefiner"]
