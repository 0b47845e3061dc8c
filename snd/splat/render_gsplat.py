"""gsplat backend: N-channel feature rasterisation on CUDA through ``gsplat.rasterization``.

Facts from gsplat v1.5.3 this relies on (``gsplat/rendering.py``, ``gsplat/cuda/_wrapper.py``,
``gsplat/cuda/csrc/RasterizeToPixels3DGSFwd.cu``, ``ProjectionEWA3DGSFused.cu``):

* ``colors [N, D]`` with ``sh_degree=None`` are rendered as plain D-channel features. ``rasterization``
  splits D into chunks of ``channel_chunk`` (default 32) and the wrapper zero-pads a chunk whose width
  is not one of the compiled sizes (1-5, 8, 9, 16, 17, 32, 33, ..., 512, 513) to the next power of two;
  more than 513 channels per chunk is an error. So any C works; 768 channels are 24 passes of 32.
* Pixel (i, j) is evaluated at (j + 0.5, i + 0.5): we pass K with cx + 0.5, cy + 0.5 so snd's
  integer-centre intrinsics mean the same thing.
* Default ``rasterize_mode="classic"``: eps2d = 0.3 px² added to the 2D covariance, no opacity
  compensation; per-Gaussian alpha clamped to 0.999 (not 3DGS's 0.99); alpha < 1/255 skipped; a pixel
  stops before the Gaussian that would bring its transmittance to <= 1e-4; no background (zeros);
  output colour is the plain alpha-composited sum (not divided by alpha).

gsplat JIT-compiles or loads its CUDA extension on import, so it is imported inside the function only.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def gsplat_available() -> bool:
    """True when the gsplat package is installed (does not import it)."""
    return importlib.util.find_spec("gsplat") is not None


def render_gsplat(
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
    near: float = 0.01,
    far: float = 1e10,
    channel_chunk: int = 32,
    packed: bool = True,
) -> tuple[Tensor, Tensor]:
    """Render features [N, C] -> (image [C, H, W], alpha [H, W]) with gsplat (CUDA tensors only).

    Args:
        means, quats (wxyz), scales (std), opacities: [N, 3], [N, 4], [N, 3], [N] world Gaussians.
        features: [N, C] per-Gaussian features (any C >= 1).
        K: [3, 3] pixel intrinsics, snd convention (pixel centres at integer coordinates).
        w2c: [4, 4] world-to-camera (OpenCV axes).
        channel_chunk: channels per rasteriser pass (gsplat's ``channel_chunk``).
        packed: gsplat's memory/speed switch (same image either way).
    """
    from gsplat import rasterization  # lazy: CUDA extension

    if not means.is_cuda:
        raise ValueError("the gsplat backend needs CUDA tensors; use backend='torch' on CPU")
    Kg = K.to(device=means.device, dtype=torch.float32).clone()
    Kg[0, 2] += 0.5
    Kg[1, 2] += 0.5
    f = lambda t: t.to(device=means.device, dtype=torch.float32).contiguous()  # noqa: E731
    colors, alphas, _ = rasterization(
        f(means), f(quats), f(scales), f(opacities), f(features),
        viewmats=f(w2c)[None], Ks=Kg[None], width=int(width), height=int(height),
        near_plane=float(near), far_plane=float(far), eps2d=0.3, sh_degree=None, packed=packed,
        rasterize_mode="classic", render_mode="RGB", channel_chunk=int(channel_chunk),
    )  # [1, H, W, C], [1, H, W, 1]
    return colors[0].permute(2, 0, 1).to(features.dtype), alphas[0, ..., 0].to(features.dtype)
