"""The one `Scene` interface every reader (raw ScanNet++ v2, FiT3D/SnD prepared, procedural) serves.

Why one interface: stage one, stage two and the probes only need frames, cameras, images, instance
masks and (where known) depth/semantics; they must not care which folder layout produced them.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from snd.data.camera import Camera


@runtime_checkable
class Scene(Protocol):
    """A scene: an ordered list of frames with cameras and per-pixel annotations.

    Frame index ``i`` is the position in `frame_ids` (capture order, which is what the pair sampler's
    frame gaps count). All per-pixel arrays are at the camera's ``height`` x ``width``.
    """

    name: str
    frame_ids: list[str]

    def __len__(self) -> int: ...

    def camera(self, i: int) -> Camera:
        """Pinhole camera of frame i (snd convention: pixel K, OpenCV c2w)."""
        ...

    def image(self, i: int) -> np.ndarray:
        """RGB image [H, W, 3] uint8."""
        ...

    def instance_mask(self, i: int) -> np.ndarray:
        """Instance ids [H, W] int32; 0 = unannotated / background."""
        ...

    def depth(self, i: int) -> np.ndarray | None:
        """z-depth [H, W] float32 in metres, 0 = invalid; None if the layout has no geometry."""
        ...

    def semantic_mask(self, i: int) -> np.ndarray | None:
        """Semantic class ids [H, W] int32 (0 = ignore); None if the layout has no semantics."""
        ...
