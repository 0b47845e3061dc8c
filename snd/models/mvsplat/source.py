"""MVSplat as a scaffold source for stage one: snd `Camera`s in, pixel-aligned Gaussians out.

Why a thin adapter: the precompute stage speaks snd cameras (pixel intrinsics, centres at integer
coordinates); MVSplat wants intrinsics normalised by the image size with pixel centres at
(x + 0.5) / W. The conversion lives here and nowhere else.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from snd.data.camera import Camera
from snd.pipeline.device import resolve_device

from .config import MVSplatConfig, resolve_config
from .encoder import MVSplatEncoder, MVSplatOutput, Precision, resolve_precision
from .geometry import pixel_K_to_normalized
from .load import load_mvsplat

log = logging.getLogger(__name__)


def cameras_to_tensors(cams: Sequence[tuple[Camera, Camera]], height: int, width: int,
                       device: "str | torch.device" = "cpu") -> tuple[Tensor, Tensor]:
    """B pairs of snd cameras -> (K_norm [B, 2, 3, 3], c2w [B, 2, 4, 4]) float32 for MVSplat.

    Cameras must be for the image size fed to MVSplat (`Camera.scaled` first otherwise).
    """
    for pair in cams:
        for c in pair:
            if (c.height, c.width) != (height, width):
                raise ValueError(f"camera is for {c.height}x{c.width} but images are {height}x{width}; "
                                 "use Camera.scaled(height, width)")
    K = torch.from_numpy(np.stack([[c.K for c in pair] for pair in cams])).float()
    c2w = torch.from_numpy(np.stack([[c.c2w for c in pair] for pair in cams])).float()
    return pixel_K_to_normalized(K, height, width).to(device), c2w.to(device)


class MVSplatSource:
    """Frozen MVSplat encoder + camera conversion.

    Args:
        ckpt_path: MVSplat Lightning checkpoint or bare encoder weights; None = random init (speed
            tests only: the Gaussians are meaningless).
        config: 'scannetpp' | 're10k' | MVSplatConfig, the architecture the weights were trained with.
        device: 'auto' | 'cpu' | 'cuda[:i]'.
        precision: network autocast ('auto' = bf16 on CUDA, fp32 on CPU); camera math stays fp32.
        channels_last: NHWC convolutions (default: on CUDA).
        compile: torch.compile the networks (first batch compiles; fixed shapes afterwards are fast); a
            string is torch.compile's mode (e.g. "reduce-overhead": CUDA graphs).
        seed: init seed when `ckpt_path` is None.
    """

    def __init__(self, ckpt_path: "str | Path | None", config: "str | MVSplatConfig" = "scannetpp",
                 device: "str | torch.device" = "auto", precision: Precision = "auto", *,
                 channels_last: Optional[bool] = None, compile: "bool | str" = False, seed: int = 0):
        self.device = resolve_device(device)
        self.cfg = resolve_config(config)
        resolve_precision(precision, self.device)  # validate early
        self.precision = precision
        if ckpt_path is None:
            log.info("MVSplat: no checkpoint, random init (seed %d)", seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                enc = MVSplatEncoder(self.cfg)
            self.encoder = enc.to(self.device).eval().requires_grad_(False)
        else:
            self.encoder = load_mvsplat(ckpt_path, self.cfg, device=self.device)
        if channels_last if channels_last is not None else self.device.type == "cuda":
            self.encoder.use_channels_last(True)
        if compile:
            self.encoder.compile_networks(dynamic=False, **({"mode": compile} if isinstance(compile, str) else {}))

    @property
    def size_multiple(self) -> int:
        return self.cfg.size_multiple

    def predict(self, images: Tensor, cams: Sequence[tuple[Camera, Camera]], near: "float | Tensor",
                far: "float | Tensor", *, with_covariances: bool = False) -> MVSplatOutput:
        """Gaussians for B context pairs.

        Args:
            images: [B, 2, 3, H, W] float in [0, 1] (uint8 [0, 255] also accepted).
            cams: B pairs of cameras for H x W images.
            near, far: scalars or [B, 2].
        """
        assert images.dim() == 5 and images.shape[1:3] == (2, 3), f"images must be [B, 2, 3, H, W], got {tuple(images.shape)}"
        B, _, _, H, W = images.shape
        assert len(cams) == B, f"{len(cams)} camera pairs for {B} image pairs"
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        images = images.to(self.device, non_blocking=True)
        K_norm, c2w = cameras_to_tensors(cams, H, W, self.device)
        near_t = torch.as_tensor(near, dtype=torch.float32, device=self.device).expand(B, 2)
        far_t = torch.as_tensor(far, dtype=torch.float32, device=self.device).expand(B, 2)
        return self.encoder(images, K_norm, c2w, near_t, far_t, precision=self.precision,
                            with_covariances=with_covariances)


__all__ = ["MVSplatSource", "cameras_to_tensors", "resolve_device"]
