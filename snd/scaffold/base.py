"""One interface for every stage-one scaffold source, plus a small registry.

Why: precompute, the bench and the demo must not care whether Gaussians come from dataset depth or from
a frozen MVSplat; each source takes a batch of context pairs and returns one `PixelGaussians` per pair.
Sources register themselves with `register_source`; `list_sources()` names them and `create_source`
builds one by name (errors name the unknown key and the known ones).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

from snd.errors import SndError
from snd.pipeline.device import resolve_device  # noqa: F401  (re-exported)
from snd.splat.gaussians import PixelGaussians

_SOURCES: dict[str, Callable[..., "ScaffoldSource"]] = {}


class ScaffoldSource(ABC):
    """Predicts pixel-aligned Gaussians for both views of context pairs.

    Class attributes a source sets:
        name: registry key (recorded in the cache manifest).
        needs_depth: `predict` needs z-depth maps of the context views (the dataset must provide them).
        has_offset: its Gaussians leave the pixel ray by a sub-pixel offset (the cache then stores one).
    """

    name: str = ""
    needs_depth: bool = False
    has_offset: bool = False
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def predict(
        self,
        images: Tensor,  # [B, 2, 3, H, W]
        K: Tensor,  # [B, 2, 3, 3]
        c2w: Tensor,  # [B, 2, 4, 4]
        *,
        depth: Tensor | None = None,  # [B, 2, H, W]
    ) -> list[PixelGaussians]:
        """Scaffolds of B context pairs.

        Args:
            images: [B, 2, 3, H, W] RGB in [0, 1] at the scaffold size.
            K:      [B, 2, 3, 3] pixel intrinsics at H x W (snd convention: integer pixel centres).
            c2w:    [B, 2, 4, 4] camera-to-world, OpenCV axes.
            depth:  [B, 2, H, W] z-depth in metres (0 = invalid), required when `needs_depth`.
        Returns:
            B PixelGaussians of shape [2, H, W] (world frame), on `self.device`.
        """

    def describe(self) -> dict:
        """What produced the scaffolds (goes into the cache manifest; must be JSON and deterministic)."""
        return {"name": self.name}


def register_source(name: str) -> Callable[[Callable[..., ScaffoldSource]], Callable[..., ScaffoldSource]]:
    """Class decorator: make a source constructible by `create_source(name, ...)`."""

    def deco(cls: Callable[..., ScaffoldSource]) -> Callable[..., ScaffoldSource]:
        if name in _SOURCES:
            raise ValueError(f"scaffold source {name!r} is already registered")
        _SOURCES[name] = cls
        return cls

    return deco


def list_sources() -> list[str]:
    """Names `create_source` accepts."""
    _load_builtin()
    return sorted(_SOURCES)


def create_source(name: str, **kwargs) -> ScaffoldSource:
    """Build the source registered as `name` with keyword options (see each source's __init__)."""
    _load_builtin()
    if name not in _SOURCES:
        raise SndError(f"unknown scaffold source {name!r}", hint=f"choose one of {sorted(_SOURCES)}")
    return _SOURCES[name](**kwargs)


def _load_builtin() -> None:
    from snd.scaffold import depth, mvsplat  # noqa: F401  (registration side effect)
