"""The frames a store carries (schema v3): every frame any stored pair uses, once per scene, as uint8 at
the backbone input size, so stage two reads images from the store and never from the dataset.

Why here: stage one already loads these frames (undistorted, at the scaffold size) to predict the
scaffold; stage two used to load, undistort and resize them again on every step, which made the loader
the bottleneck of the fast path. Stage one now applies stage two's own resize (`resize_uint8`) once and
stores the result, so stage two at lossless storage sees bit-identical images.

Codecs (`FrameCodec`): ``jpeg`` (Pillow's libjpeg-turbo at `quality`, full-resolution chroma 4:4:4) or ``lossless`` (planar
uint8, filtered, then compressed by Zarr's blosc-zstd). Lossless filters: ``row`` (differences along rows; stores up
to v4) and ``grad`` (differences along rows and columns, then red and blue minus green, all modulo 256; v5). The
``grad`` residual predicts each pixel from its left, upper and upper-left neighbours and its colour from green,
which makes frames 16-18 % smaller on procedural scenes and 30-34 % on photos than ``row`` (docs/cache-format.md).
Undoing it is two cumulative sums and two additions, cheap on any device: with ``--image-decode`` on CUDA the
loader's workers ship the residual planes and the GPU undoes the filter for the whole batch (`undo_grad`),
as it decodes JPEG frames with nvjpeg (`decode_jpeg_batch`). Measured sizes, decode costs and the effect on
teacher tokens: docs/cache-format.md.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from snd.cache.schema import delta_decode, delta_encode

FrameCodec = Literal["jpeg", "lossless"]
LosslessFilter = Literal["row", "grad"]

__all__ = ["FrameCodec", "LosslessFilter", "resize_uint8", "encode_frame", "decode_frame", "decode_jpeg_batch", "grad_residual",
           "undo_grad"]


def resize_uint8(img: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bring a uint8 image [3, h, w] to [3, *hw] (bilinear, antialiased, in uint8).

    The one resize of both stages: torch's vectorised uint8 path is 4x faster than in float (the loader
    feeds ~100 steps/s on the fast path); its fixed-point weights differ from the float resize by at
    most one grey level. Returns `img` itself when it already has the size."""
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3, f"expected uint8 [3,h,w], got {img.dtype} {tuple(img.shape)}"
    if tuple(img.shape[1:]) == tuple(hw):
        return img
    return F.interpolate(img[None], size=tuple(hw), mode="bilinear", align_corners=False, antialias=True)[0]


def grad_residual(a: np.ndarray) -> np.ndarray:
    """The ``grad`` filter of uint8 frames [..., 3, H, W]: differences along W, then along H, then red and blue
    minus green, each modulo 256 (exact inverse: `undo_grad`)."""
    assert a.dtype == np.uint8 and a.ndim >= 3 and a.shape[-3] == 3, f"expected uint8 [..., 3, H, W], got {a.dtype} {a.shape}"
    d = delta_encode(a)
    d = np.swapaxes(delta_encode(np.swapaxes(d, -1, -2)), -1, -2)
    d[..., 0, :, :] -= d[..., 1, :, :]
    d[..., 2, :, :] -= d[..., 1, :, :]
    return np.ascontiguousarray(d)


def undo_grad(res: torch.Tensor) -> torch.Tensor:
    """uint8 residuals [..., 3, H, W] of `grad_residual` -> the frames, on the residuals' device (uint8 sums wrap
    modulo 256 as the filter did; the two cumulative sums commute, so their order does not matter)."""
    assert res.dtype == torch.uint8 and res.ndim >= 3 and res.shape[-3] == 3, f"expected uint8 [..., 3, H, W], got {res.dtype} {tuple(res.shape)}"
    x = res.clone()
    x[..., 0, :, :] += x[..., 1, :, :]
    x[..., 2, :, :] += x[..., 1, :, :]
    return x.cumsum(-1, dtype=torch.uint8).cumsum(-2, dtype=torch.uint8)


def _check_filter(filter: str | None) -> None:
    if filter not in ("row", "grad"):
        raise ValueError(f"lossless frames need their filter, 'row' or 'grad' (`FrameSpec.filter`), got {filter!r}")


def encode_frame(img: torch.Tensor, codec: FrameCodec, *, quality: int = 95, filter: LosslessFilter | None = None) -> np.ndarray:
    """One frame [3, H, W] uint8 -> its stored bytes (1-D uint8). `filter`: lossless only, and needed there
    (`FrameSpec.filter`: what the store records)."""
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3, f"expected uint8 [3,H,W], got {img.dtype} {tuple(img.shape)}"
    if codec == "jpeg":  # Pillow (libjpeg-turbo) at 4:4:4: torchvision's encoder always halves the chroma
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(buf, format="JPEG", quality=quality, subsampling=0)
        return np.frombuffer(buf.getvalue(), np.uint8)
    if codec == "lossless":
        _check_filter(filter)
        return (grad_residual(img.numpy()) if filter == "grad" else delta_encode(img.numpy())).reshape(-1)
    raise ValueError(f"unknown frame codec {codec!r} (expected 'jpeg' or 'lossless')")


def decode_frame(blob: np.ndarray, codec: FrameCodec, hw: tuple[int, int], *, filter: LosslessFilter | None = None) -> torch.Tensor:
    """Stored bytes (1-D uint8, exactly the frame's bytes) -> [3, H, W] uint8 (H, W = the stored size `hw`).
    `filter`: lossless only, the filter the store records (`FrameSpec.filter`; "row" for stores up to v4)."""
    if codec == "jpeg":
        from torchvision.io import ImageReadMode, decode_jpeg

        img = decode_jpeg(torch.from_numpy(np.ascontiguousarray(blob)), mode=ImageReadMode.RGB)
    elif codec == "lossless":
        _check_filter(filter)
        planes = np.ascontiguousarray(blob).reshape(3, *hw)
        img = undo_grad(torch.from_numpy(planes)) if filter == "grad" else torch.from_numpy(delta_decode(planes))
    else:
        raise ValueError(f"unknown frame codec {codec!r} (expected 'jpeg' or 'lossless')")
    if tuple(img.shape) != (3, *hw):
        raise ValueError(f"decoded frame is {tuple(img.shape)}, the store says (3, {hw[0]}, {hw[1]})")
    return img


def decode_jpeg_batch(blobs: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """JPEG byte tensors (1-D uint8, any number) -> [N, 3, H, W] uint8 on `device`: one batched nvjpeg call
    on CUDA (frees the loader's CPU cores), torchvision's libjpeg elsewhere. All frames must share a size
    (a store's frames do)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        imgs = decode_jpeg(list(blobs), mode=ImageReadMode.RGB, device=device)
    else:
        imgs = [decode_jpeg(b, mode=ImageReadMode.RGB) for b in blobs]
    return torch.stack(imgs)
