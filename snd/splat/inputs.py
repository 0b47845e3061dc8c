"""The one input type of every renderer: world-frame 3D Gaussians and the pinhole camera they are drawn into.

Why: the four renderers (`render` dispatch, `render_torch`, `render_gsplat`, `render_reference`) and the
operator builder all take the same ten things (means, rotations, scales, opacities, intrinsics, pose,
image size, depth range); one frozen dataclass checks their shapes once, carries the conventions in one
docstring, and lets a caller build the scene once and render it with any backend.

Conventions: ``quats`` are (w, x, y, z) and need not be normalised; ``scales`` are standard deviations;
``K`` is snd's pixel intrinsics with pixel centres at integer coordinates (gsplat's +0.5 shift is each
backend's business); ``w2c`` is world-to-camera with OpenCV axes; Gaussians whose camera z lies outside
[near, far] are not drawn.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["ALPHA_MIN", "SplatInput", "drawable", "drawable_mask"]

ALPHA_MIN = 1.0 / 255.0  # every backend skips Gaussians below this opacity (gsplat; `render_torch`)


@dataclass(frozen=True)
class SplatInput:
    """N world Gaussians + one camera of `height` x `width` pixels.

    Args:
        means:     [N, 3] world positions.
        quats:     [N, 4] rotations (w, x, y, z).
        scales:    [N, 3] standard deviations.
        opacities: [N] in [0, 1]; Gaussians below 1/255 are skipped by every backend.
        K:         [3, 3] pixel intrinsics for height x width, pixel centres at integer coordinates.
        w2c:       [4, 4] world-to-camera, OpenCV axes.
        height, width: image size in pixels.
        near, far: camera-z range of Gaussian centres that are drawn.
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    K: Tensor
    w2c: Tensor
    height: int
    width: int
    near: float = 0.01
    far: float = 1e10

    def __post_init__(self) -> None:
        N = self.means.shape[0]
        assert self.means.shape == (N, 3), f"means must be [N, 3], got {tuple(self.means.shape)}"
        assert self.quats.shape == (N, 4), f"quats must be [N={N}, 4], got {tuple(self.quats.shape)}"
        assert self.scales.shape == (N, 3), f"scales must be [N={N}, 3], got {tuple(self.scales.shape)}"
        assert self.opacities.shape == (N,), f"opacities must be [N={N}], got {tuple(self.opacities.shape)}"
        assert self.K.shape == (3, 3), f"K must be [3, 3], got {tuple(self.K.shape)}"
        assert self.w2c.shape == (4, 4), f"w2c must be [4, 4], got {tuple(self.w2c.shape)}"
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "near", float(self.near))
        object.__setattr__(self, "far", float(self.far))

    @property
    def n(self) -> int:
        """Number of Gaussians."""
        return int(self.means.shape[0])

    @property
    def device(self) -> torch.device:
        return self.means.device

    def check_features(self, features: Tensor) -> None:
        """Assert `features` is [N, C] for this scene's N Gaussians."""
        assert features.dim() == 2 and features.shape[0] == self.n, (
            f"features must be [N={self.n}, C], got {tuple(features.shape)}")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SplatInput":
        """Every tensor on `device`; `dtype` (if given) for the Gaussians and the camera alike."""
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None else t.dtype)

        return replace(self, means=mv(self.means), quats=mv(self.quats), scales=mv(self.scales),
                       opacities=mv(self.opacities), K=mv(self.K), w2c=mv(self.w2c))

    def subset(self, idx: Tensor) -> "SplatInput":
        """The same camera with only the Gaussians `idx` (index or bool mask over N)."""
        return replace(self, means=self.means[idx], quats=self.quats[idx], scales=self.scales[idx],
                       opacities=self.opacities[idx])


def drawable_mask(means: Tensor, scales: Tensor, opacities: Tensor) -> Tensor:
    """[...] bool: the Gaussians ([..., 3], [..., 3], [...]) a renderer draws: opacity >= 1/255, finite means
    and scales (gsplat culls the first; the others would poison its sort)."""
    return (opacities >= ALPHA_MIN) & torch.isfinite(means).all(-1) & torch.isfinite(scales).all(-1)


def drawable(gaussians, K: Tensor, w2c: Tensor, height: int, width: int, *, near: float = 0.01, far: float = 1e10,
             device: torch.device | None = None) -> tuple[SplatInput, Tensor]:
    """A scaffold's Gaussians (`snd.splat.gaussians.PixelGaussians`, [V, H, W]) as a float32 `SplatInput`
    for one camera, keeping only those a renderer can draw (opacity >= 1/255, finite means and scales).

    Returns (input over the kept Gaussians, kept [N_alive] long: their index into the flattened V*H*W), so
    a caller lifts per-pixel features with ``feats.reshape(V*H*W, C)[kept]``."""
    dev = device if device is not None else gaussians.means.device
    means, quats, scales, opac = gaussians.to(device=dev, dtype=torch.float32).flatten()
    kept = drawable_mask(means, scales, opac).nonzero().squeeze(1)
    inp = SplatInput(means[kept], quats[kept], scales[kept], opac[kept], K.to(device=dev, dtype=torch.float32),
                     w2c.to(device=dev, dtype=torch.float32), height, width, near=near, far=far)
    return inp, kept
