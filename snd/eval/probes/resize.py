"""Bilinear resizing as two small matrix products, for the probes' training step.

Why: `F.interpolate(..., mode="bilinear")` backpropagates with atomic adds, and at the segmentation
probe's size (150 classes x 476 x 630, batch 2) its backward and the channel-strided cross-entropy made a
step of a *linear* head take ~18 ms. Bilinear resizing with `align_corners=False` is separable: along each
axis it is a fixed [out, in] matrix whose rows hold the two interpolation weights. `resize_matrix` builds
that matrix by resizing the identity with PyTorch itself, so it matches `F.interpolate` by construction;
`resize_bilinear` then applies both axes with matmuls (tensor cores, no atomics) and can return
channels-last, the layout in which a per-pixel softmax over classes reads contiguous memory.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["resize_matrix", "resize_bilinear"]


@lru_cache(maxsize=64)
def _matrix(n_in: int, n_out: int, device: str, dtype: torch.dtype) -> Tensor:
    eye = torch.eye(n_in, dtype=torch.float64)[None]  # [1, n_in (signals), n_in]
    m = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0]  # [n_in, n_out]
    return m.T.contiguous().to(device=device, dtype=dtype)  # [n_out, n_in]


def resize_matrix(n_in: int, n_out: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """[n_out, n_in]: 1-D linear interpolation with align_corners=False (PyTorch's source-index rule)."""
    return _matrix(int(n_in), int(n_out), str(torch.device(device)), dtype)


def resize_bilinear(x: Tensor, size: tuple[int, int], *, channels_last: bool = False) -> Tensor:
    """x [B, C, h, w] -> [B, C, H, W] (or [B, H, W, C] with `channels_last`), equal to
    ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` up to float rounding."""
    B, C, h, w = x.shape
    H, W = int(size[0]), int(size[1])
    Ah = resize_matrix(h, H, device=x.device, dtype=x.dtype)  # [H, h]
    Aw = resize_matrix(w, W, device=x.device, dtype=x.dtype)  # [W, w]
    t = torch.matmul(Ah, x.permute(0, 2, 3, 1).reshape(B, h, w * C))  # rows:    [B, H, w*C]
    out = torch.matmul(Aw, t.reshape(B * H, w, C)).reshape(B, H, W, C)  # columns: [B, H, W, C]
    return out if channels_last else out.permute(0, 3, 1, 2)
