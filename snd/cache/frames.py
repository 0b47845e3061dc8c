"""The frames a store carries (schema v3): every frame any stored pair uses, once per scene, as uint8 at
the backbone input size, so stage two reads images from the store and never from the dataset.

Why here: stage one already loads these frames (undistorted, at the scaffold size) to predict the
scaffold; stage two used to load, undistort and resize them again on every step, which made the loader
the bottleneck of the fast path. Stage one now applies stage two's own resize (`resize_uint8`) once and
stores the result, so stage two at lossless storage sees bit-identical images.

Codecs (`FrameCodec`): ``jpeg`` (Pillow's libjpeg-turbo at `quality`, full-resolution chroma 4:4:4) or ``lossless`` (planar rows,
row-delta filtered; Zarr's blosc-zstd compresses them). Measured sizes, decode costs and the effect on
teacher tokens: docs/cache-format.md. Decoding: `decode_frame` on the CPU (DataLoader workers), or
`decode_jpeg_batch` on the GPU (nvjpeg, the whole batch in one call).
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from snd.cache.schema import delta_decode, delta_encode

FrameCodec = Literal["jpeg", "lossless"]

__all__ = ["FrameCodec", "resize_uint8", "encode_frame", "decode_frame", "decode_jpeg_batch"]


def resize_uint8(img: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bring a uint8 image [3, h, w] to [3, *hw] (bilinear, antialiased, in uint8).

    The one resize of both stages: torch's vectorised uint8 path is 4x faster than in float (the loader
    feeds ~100 steps/s on the fast path); its fixed-point weights differ from the float resize by at
    most one grey level. Returns `img` itself when it already has the size."""
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3, f"expected uint8 [3,h,w], got {img.dtype} {tuple(img.shape)}"
    if tuple(img.shape[1:]) == tuple(hw):
        return img
    return F.interpolate(img[None], size=tuple(hw), mode="bilinear", align_corners=False, antialias=True)[0]


def encode_frame(img: torch.Tensor, codec: FrameCodec, *, quality: int = 95) -> np.ndarray:
    """One frame [3, H, W] uint8 -> its stored bytes (1-D uint8)."""
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3, f"expected uint8 [3,H,W], got {img.dtype} {tuple(img.shape)}"
    if codec == "jpeg":  # Pillow (libjpeg-turbo) at 4:4:4: torchvision's encoder always halves the chroma
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(buf, format="JPEG", quality=quality, subsampling=0)
        return np.frombuffer(buf.getvalue(), np.uint8)
    if codec == "lossless":
        return delta_encode(img.numpy()).reshape(-1)
    raise ValueError(f"unknown frame codec {codec!r} (expected 'jpeg' or 'lossless')")


def decode_frame(blob: np.ndarray, codec: FrameCodec, hw: tuple[int, int]) -> torch.Tensor:
    """Stored bytes (1-D uint8, exactly the frame's bytes) -> [3, H, W] uint8 (H, W = the stored size `hw`)."""
    if codec == "jpeg":
        from torchvision.io import ImageReadMode, decode_jpeg

        img = decode_jpeg(torch.from_numpy(np.ascontiguousarray(blob)), mode=ImageReadMode.RGB)
    elif codec == "lossless":
        img = torch.from_numpy(delta_decode(np.ascontiguousarray(blob).reshape(3, *hw)))
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
