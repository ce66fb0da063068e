"""The stages a job reports progress in, and the kinds of artifact it produces.

Domain twins of the proto enums ``trellisbox.v1.Stage`` and ``trellisbox.v1.ArtifactKind`` (same names
without the prefix, same numbers; a test holds them together), so that backends never import protobuf.
"""

from __future__ import annotations

from enum import IntEnum


class Stage(IntEnum):
    """Where a request is; reported in progress events and timings."""

    #: Waiting for the model worker (or the GPU lease).
    QUEUED = 1
    #: SDXL-refiner img2img (or the classic restoration backend).
    REFINE = 2
    #: Background removal, crop and resize before 3D generation.
    PREPROCESS = 3
    #: TRELLIS stage 1: sparse structure sampling.
    SPARSE_STRUCTURE = 4
    #: TRELLIS stage 2: structured latent (SLat) sampling.
    SLAT = 5
    #: Mesh extraction, simplification, texture bake and file export.
    EXPORT = 6
    #: Post-generation 3D Gaussian refinement: camera recovery and the photometric fit.
    GAUSSIAN_REFINEMENT = 7

    @property
    def label(self) -> str:
        """Metric and log label, e.g. ``sparse_structure``."""
        return self.name.lower()


def known_stage(number: int) -> Stage | None:
    """The :class:`Stage` numbered ``number``, or None for a stage a newer service added."""
    try:
        return Stage(number)
    except ValueError:
        return None


class ArtifactKind(IntEnum):
    """What an artifact is."""

    #: Binary glTF 2.0 mesh with baked texture.
    GLB = 1
    #: 3D Gaussian splats as PLY.
    GAUSSIAN_PLY = 2
    #: The refined input image as PNG.
    REFINED_IMAGE = 3
    #: A view from around the generated object, refined by the refiner tier (novel-view Gaussian refinement).
    NOVEL_VIEW = 4
    #: Internal: what the TRELLIS service hands over between the two calls of a novel-view refinement.
    GENERATION_STATE = 5

    @property
    def media_type(self) -> str:
        return _MEDIA_TYPES[self]


_MEDIA_TYPES = {
    ArtifactKind.GLB: "model/gltf-binary",
    ArtifactKind.GAUSSIAN_PLY: "application/x-ply",
    ArtifactKind.REFINED_IMAGE: "image/png",
    ArtifactKind.NOVEL_VIEW: "image/png",
    ArtifactKind.GENERATION_STATE: "application/zip",
}


def artifact_kind(number: int) -> ArtifactKind | int:
    """The :class:`ArtifactKind` numbered ``number``, or the number itself for a kind a newer server added."""
    try:
        return ArtifactKind(number)
    except ValueError:
        return number


def kind_label(number: int) -> str:
    """``ARTIFACT_KIND_GLB`` (its name in the contract) for a known kind, ``ARTIFACT_KIND_<number>`` otherwise."""
    kind = artifact_kind(number)
    return f"ARTIFACT_KIND_{kind.name if isinstance(kind, ArtifactKind) else number}"
