"""Image-to-3D backends: ``trellis`` (upstream TRELLIS on CUDA) and ``preview`` (CPU, no weights)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from trellis_service.backends.base import ImageTo3DBackend
from trellis_service.config import TrellisBackendConfig
from trellisbox._domain.errors import ModelUnavailable

__all__ = ["ImageTo3DBackend", "choose_backend"]

_log = logging.getLogger(__name__)


def choose_backend(settings: TrellisBackendConfig, cuda_check: Callable[[], bool] | None = None
                   ) -> ImageTo3DBackend:
    """The backend to run, its preflight's warnings logged. Says loudly (WARNING) which one and why.

    ``trellis`` raises :class:`ModelUnavailable` when it cannot run (readiness stays NOT_SERVING);
    ``auto`` falls back to ``preview`` instead, naming the reason. ``cuda_check`` replaces the preflight's
    GPU probe (tests on a CPU); None asks torch.
    """
    from trellis_service.backends.preview import PreviewBackend
    from trellis_service.backends.trellis import TrellisBackend

    if settings.backend == "preview":
        _log.warning("backend preview (configured): CPU silhouette inflation, NOT TRELLIS")
        return PreviewBackend()
    trellis = TrellisBackend.from_settings(settings, cuda_check)
    if settings.backend == "trellis":
        _log_warnings(trellis.preflight())
        _log.warning("backend trellis (configured): TRELLIS %s on %s", settings.model, trellis.device)
        return trellis
    try:
        warnings = trellis.preflight()
    except ModelUnavailable as exc:
        _log.warning("backend auto: running PREVIEW (CPU silhouette inflation, NOT TRELLIS) because TRELLIS "
                     "cannot run here: %s", exc)
        return PreviewBackend()
    if not trellis.weights_present:
        _log.warning("backend auto: running PREVIEW (CPU silhouette inflation, NOT TRELLIS) because the weights of "
                     "%s are not on this machine; set --backend trellis to download them at load", settings.model)
        return PreviewBackend()
    _log_warnings(warnings)
    _log.warning("backend auto: running TRELLIS %s on %s (GPU, trellis package and weights found)",
                 settings.model, trellis.device)
    return trellis


def _log_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        _log.warning("preflight: %s", warning)
