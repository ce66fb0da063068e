"""The input photos as fitting targets: the object cut out, centred in a square crop, at the fit's resolution.

The camera that took a photo is unknown, and so is where in the frame the object sits. Cropping a square
around the object's silhouette (with a margin, like TRELLIS's own preprocessing) leaves a view whose camera
differs from an orbit camera only by distance and a small principal-point shift, which
:mod:`~trellis_service.gaussian_refinement.pose` recovers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from trellisbox._domain.imaging import has_real_alpha

#: The crop's edge is the silhouette's longer side times this.
CROP_MARGIN = 1.25


@dataclass(frozen=True)
class TargetView:
    """One input photo, cropped square around the object.

    Args:
        rgb: (S, S, 3) colours in [0, 1].
        mask: (S, S) object coverage in [0, 1].
        source: Where the mask came from: "alpha" or "background".
    """

    rgb: Tensor
    mask: Tensor
    source: str

    @property
    def size(self) -> int:
        return int(self.rgb.shape[0])

    def resized(self, size: int) -> TargetView:
        """The view at another resolution (area-averaged when shrinking)."""
        if size == self.size:
            return self
        stacked = torch.cat([self.rgb, self.mask[..., None]], dim=-1).permute(2, 0, 1)[None]
        mode = "area" if size < self.size else "bilinear"
        scaled = torch.nn.functional.interpolate(stacked, size=(size, size), mode=mode)[0].permute(1, 2, 0)
        return TargetView(scaled[..., :3].contiguous(), scaled[..., 3].contiguous(), self.source)


def object_mask(image: Image.Image) -> tuple[np.ndarray, str]:  # type: ignore[type-arg]
    """Coverage in [0, 1] at the image's size: the alpha channel, or the preview backend's background cut-out."""
    if has_real_alpha(image):
        return np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0, "alpha"
    from trellis_service.backends.preview import extract_silhouette

    silhouette = extract_silhouette(image, work_side=max(image.size))
    mask = Image.fromarray(silhouette.mask.astype(np.uint8) * 255).resize(image.size, Image.Resampling.BILINEAR)
    return np.asarray(mask, dtype=np.float32) / 255.0, "background"


def target_view(image: Image.Image, size: int, device: torch.device | str = "cpu") -> TargetView:
    """``image`` cropped to a square around its object (margin :data:`CROP_MARGIN`) and resized to ``size``."""
    coverage, source = object_mask(image)
    rows = np.nonzero((coverage >= 0.5).any(axis=1))[0]
    cols = np.nonzero((coverage >= 0.5).any(axis=0))[0]
    if len(rows) == 0:
        rows, cols = np.array([0, coverage.shape[0] - 1]), np.array([0, coverage.shape[1] - 1])
    centre_x, centre_y = (cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2
    half = CROP_MARGIN * max(cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1) / 2
    box = (centre_x - half, centre_y - half, centre_x + half, centre_y + half)
    rgb = np.asarray(_crop(image.convert("RGB"), box, size), dtype=np.float32) / 255.0
    mask_image = Image.fromarray(np.round(coverage * 255).astype(np.uint8))
    mask = np.asarray(_crop(mask_image, box, size), dtype=np.float32) / 255.0
    return TargetView(torch.as_tensor(rgb, device=device), torch.as_tensor(mask, device=device), source)


def _crop(image: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """The (possibly out-of-bounds) ``box`` of ``image`` at ``size`` × ``size``; outside is black/transparent."""
    left, top, right, bottom = box
    pad = int(max(0.0, -left, -top, right - image.width, bottom - image.height)) + 1
    canvas = Image.new(image.mode, (image.width + 2 * pad, image.height + 2 * pad))
    canvas.paste(image, (pad, pad))
    return canvas.resize((size, size), Image.Resampling.BOX, box=(left + pad, top + pad, right + pad, bottom + pad))
