"""TRELLIS-BOX Serving: image to 3D as a gRPC service.

The public surface of this package, kept stable:

- the contract: ``proto/trellisbox/v1/*.proto`` and its generated stubs in :mod:`trellisbox.v1`;
- the Python client: :class:`TrellisBoxClient`, :class:`GenerationResult`, :class:`ProgressUpdate`,
  :class:`ArtifactProtocolError` (:mod:`trellisbox.client`), and the ``trellisbox`` command (:mod:`trellisbox.cli`).

The refiner's ``ImageRefiner`` API is public too, in :mod:`refiner_service`. Everything else is private and
may change: the shared domain (:mod:`trellisbox._domain`), the server runtime (:mod:`trellisbox._runtime`) and
the services' own modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ArtifactProtocolError", "GenerationResult", "ProgressUpdate", "TrellisBoxClient", "__version__"]

if TYPE_CHECKING:
    from trellisbox.client import ArtifactProtocolError, GenerationResult, ProgressUpdate, TrellisBoxClient


def __getattr__(name: str) -> Any:
    # Lazy, so that the services, which import only the private runtime, do not load the client.
    if name in ("ArtifactProtocolError", "GenerationResult", "ProgressUpdate", "TrellisBoxClient"):
        from trellisbox import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
