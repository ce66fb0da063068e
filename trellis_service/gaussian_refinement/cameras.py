"""Pinhole cameras in the OpenCV convention (x right, y down, z forward), placed on an orbit around the object.

The world is y-up with the object's front facing +z: the frame of the preview backend's splats and of the
PLY upstream TRELLIS writes (``Gaussian.save_ply`` turns its z-up frame to y-up). Yaw 0 and pitch 0 look at
the front; positive yaw moves the camera towards +x, positive pitch above the object.
Every quantity is a tensor, so a pose can be refined by gradient descent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: TRELLIS renders its Gaussians with a 40° field of view; the fit uses the same lens.
FOV_DEGREES = 40.0


@dataclass(frozen=True)
class Camera:
    """One view.

    Args:
        rotation: (3, 3) world-to-camera rotation.
        translation: (3,) world-to-camera translation.
        focal: (2,) fx, fy in pixels.
        principal: (2,) cx, cy in pixels.
        width: Image width in pixels.
        height: Image height in pixels.
    """

    rotation: Tensor
    translation: Tensor
    focal: Tensor
    principal: Tensor
    width: int
    height: int

    def view_matrix(self) -> Tensor:
        """(4, 4) world-to-camera."""
        matrix = torch.eye(4, dtype=self.rotation.dtype, device=self.rotation.device)
        matrix = matrix.index_put((torch.arange(3)[:, None], torch.arange(3)[None, :]), self.rotation)
        return matrix.index_put((torch.arange(3), torch.full((3,), 3)), self.translation)

    def intrinsics(self) -> Tensor:
        """(3, 3) K."""
        zero = torch.zeros((), dtype=self.focal.dtype, device=self.focal.device)
        one = torch.ones((), dtype=self.focal.dtype, device=self.focal.device)
        return torch.stack([torch.stack([self.focal[0], zero, self.principal[0]]),
                            torch.stack([zero, self.focal[1], self.principal[1]]),
                            torch.stack([zero, zero, one])])

    def resized(self, width: int, height: int) -> Camera:
        """The same view rendered at another resolution."""
        factor = torch.tensor([width / self.width, height / self.height], dtype=self.focal.dtype,
                              device=self.focal.device)
        return Camera(self.rotation, self.translation, self.focal * factor, self.principal * factor, width, height)


@dataclass(frozen=True)
class OrbitPose:
    """Where a camera sits around the object's centre.

    Args:
        yaw_degrees: Around the vertical axis; 0 looks at the front (+z side).
        pitch_degrees: Elevation; positive looks down from above.
        distance: From the object's centre, in world units.
        offset: (dx, dy) shift of the principal point in pixels at ``size`` (the object need not be centred
            in the photo).
        size: The square image edge ``offset`` is measured at.
    """

    yaw_degrees: float
    pitch_degrees: float
    distance: float
    offset: tuple[float, float] = (0.0, 0.0)
    size: int = 64


def focal_for(size: int, fov_degrees: float = FOV_DEGREES) -> float:
    """Focal length in pixels for a ``size``-pixel-wide image with the given horizontal field of view."""
    return 0.5 * size / math.tan(math.radians(fov_degrees) / 2)


def orbit_camera(yaw: Tensor, pitch: Tensor, distance: Tensor, offset: Tensor, centre: Tensor, size: int,
                 fov_degrees: float = FOV_DEGREES) -> Camera:
    """A square camera on the orbit around ``centre`` looking at it (angles in radians; differentiable in
    every tensor argument).

    Args:
        yaw: Scalar angle around +y.
        pitch: Scalar elevation.
        distance: Scalar distance to ``centre``.
        offset: (2,) principal-point shift in pixels at ``size``.
        centre: (3,) the point looked at.
        size: Image edge in pixels.
    """
    cos_pitch = torch.cos(pitch)
    direction = torch.stack([cos_pitch * torch.sin(yaw), torch.sin(pitch), cos_pitch * torch.cos(yaw)])
    position = centre + distance * direction
    forward = -direction
    up = torch.tensor([0.0, 1.0, 0.0], dtype=forward.dtype, device=forward.device)
    right = torch.linalg.cross(forward, up)
    right = right / torch.linalg.vector_norm(right).clamp_min(1e-8)
    down = torch.linalg.cross(forward, right)
    rotation = torch.stack([right, down, forward])
    translation = -(rotation @ position)
    focal = torch.full((2,), focal_for(size, fov_degrees), dtype=forward.dtype, device=forward.device)
    principal = torch.full((2,), size / 2, dtype=forward.dtype, device=forward.device) + offset
    return Camera(rotation, translation, focal, principal, size, size)


def camera_at(pose: OrbitPose, centre: Tensor, size: int) -> Camera:
    """The camera of ``pose`` rendered at ``size`` pixels (the offset scaled to that size)."""
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=centre.dtype, device=centre.device)

    offset = torch.tensor(pose.offset, dtype=centre.dtype, device=centre.device) * (size / pose.size)
    return orbit_camera(scalar(math.radians(pose.yaw_degrees)), scalar(math.radians(pose.pitch_degrees)),
                        scalar(pose.distance), offset, centre, size)


class PoseParameters:
    """An orbit pose as tensors an optimiser can move: yaw, pitch, log-distance and the principal-point shift,
    at a given render size.

    Args:
        pose: The starting pose.
        size: The square render edge the shift is expressed at.
        like: Gives the dtype and device.
    """

    def __init__(self, pose: OrbitPose, size: int, like: Tensor) -> None:
        def leaf(value: float | list[float]) -> Tensor:
            return torch.tensor(value, dtype=like.dtype, device=like.device).requires_grad_(True)

        self.size = size
        self.yaw = leaf(math.radians(pose.yaw_degrees))
        self.pitch = leaf(math.radians(pose.pitch_degrees))
        self.log_distance = leaf(math.log(pose.distance))
        self.offset = leaf([value * size / pose.size for value in pose.offset])

    def groups(self, scale: float = 1.0) -> list[dict[str, object]]:
        """Adam parameter groups: about a degree, 1 % of the distance and a quarter pixel per step × ``scale``."""
        return [{"params": [self.yaw, self.pitch], "lr": math.radians(1.0) * scale},
                {"params": [self.log_distance], "lr": 0.01 * scale},
                {"params": [self.offset], "lr": 0.25 * scale}]

    def camera(self, centre: Tensor) -> Camera:
        limit = math.radians(80.0)
        return orbit_camera(self.yaw, self.pitch.clamp(-limit, limit), torch.exp(self.log_distance), self.offset,
                            centre, self.size)

    def pose(self) -> OrbitPose:
        shift = self.offset.detach().tolist()
        return OrbitPose(math.degrees(self.yaw.item()) % 360.0, math.degrees(self.pitch.item()),
                         math.exp(self.log_distance.item()), (shift[0], shift[1]), self.size)
