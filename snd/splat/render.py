"""One feature-rendering interface over two backends (gsplat on CUDA, pure torch anywhere).

Both backends implement the same math (gsplat 1.5.3 "classic" EWA splatting; see `render_torch`):
the image is the alpha-composited sum of features, *not* divided by alpha, with no background, and
``alpha`` is 1 - final transmittance. Tests compare the two on GPU and the torch one against a
brute-force per-pixel reference on CPU.
"""
from __future__ import annotations

import logging
from typing import Literal

from torch import Tensor

from snd.splat.render_gsplat import gsplat_available, render_gsplat
from snd.splat.render_torch import render_torch

log = logging.getLogger(__name__)

Backend = Literal["auto", "gsplat", "torch"]
_BACKENDS = ("auto", "gsplat", "torch")


def resolve_backend(backend: Backend, device) -> Literal["gsplat", "torch"]:
    """"auto" -> "gsplat" for CUDA tensors when gsplat is installed, else "torch"."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        is_cuda = getattr(device, "type", str(device)).startswith("cuda")
        backend = "gsplat" if is_cuda and gsplat_available() else "torch"
        log.debug("render backend auto -> %s", backend)
    return backend


def render_features(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    features: Tensor,  # [N, C]
    K: Tensor,  # [3, 3]
    w2c: Tensor,  # [4, 4]
    height: int,
    width: int,
    *,
    backend: Backend = "auto",
    near: float = 0.01,
    far: float = 1e10,
    channel_chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Splat per-Gaussian features into one camera.

    Args:
        means:     [N, 3] world positions.
        quats:     [N, 4] rotations (w, x, y, z), need not be normalised.
        scales:    [N, 3] standard deviations.
        opacities: [N] in [0, 1]; Gaussians below 1/255 are skipped.
        features:  [N, C] any channel count.
        K:         [3, 3] pixel intrinsics for height x width, pixel centres at integer coordinates.
        w2c:       [4, 4] world-to-camera, OpenCV axes.
        backend:   "gsplat" (CUDA), "torch" (anywhere) or "auto" (gsplat for CUDA tensors if installed).
        near, far: camera-z range of Gaussian centres that are drawn.
        channel_chunk: channels per rasteriser pass (None: backend default; gsplat uses 32).

    Returns:
        (image [C, H, W], alpha [H, W]); image = sum_i alpha_i T_i f_i (not normalised by alpha).
    """
    N = means.shape[0]
    assert means.shape == (N, 3), f"means must be [N, 3], got {tuple(means.shape)}"
    assert features.dim() == 2 and features.shape[0] == N, f"features must be [N={N}, C], got {tuple(features.shape)}"
    which = resolve_backend(backend, means.device)
    if which == "gsplat":
        return render_gsplat(means, quats, scales, opacities, features, K, w2c, height, width,
                             near=near, far=far, channel_chunk=channel_chunk or 32)
    return render_torch(means, quats, scales, opacities, features, K.to(means.device), w2c.to(means.device),
                        height, width, near=near, far=far, channel_chunk=channel_chunk)
