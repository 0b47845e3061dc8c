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

from snd.splat.inputs import SplatInput
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


def render_features(inp: SplatInput, features: Tensor, *, backend: Backend = "auto",
                    channel_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Splat per-Gaussian features into one camera.

    Args:
        inp:      the Gaussians and the camera (`snd.splat.inputs.SplatInput`; shapes and conventions there).
        features: [N, C] any channel count.
        backend:  "gsplat" (CUDA), "torch" (anywhere) or "auto" (gsplat for CUDA tensors if installed).
        channel_chunk: channels per rasteriser pass (None: backend default; gsplat uses 32).

    Returns:
        (image [C, H, W], alpha [H, W]); image = sum_i alpha_i T_i f_i (not normalised by alpha).
    """
    inp.check_features(features)
    if resolve_backend(backend, inp.device) == "gsplat":
        return render_gsplat(inp, features, channel_chunk=channel_chunk or 32)
    return render_torch(inp, features, channel_chunk=channel_chunk)
