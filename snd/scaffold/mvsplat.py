"""The "mvsplat" scaffold source: a frozen MVSplat encoder predicts the Gaussians of each context pair.

Why a thin wrapper: the network, its checkpoint conversion and its precision handling live in
`snd.models.mvsplat` (imported lazily here, so `--source depth` never imports it); this file only
adapts snd cameras to MVSplat's and records what produced the scaffolds (checkpoint SHA-256) for the
cache manifest.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor

from snd.errors import SndError, require_file
from snd.scaffold.base import ScaffoldSource, register_source, resolve_device
from snd.splat.gaussians import PixelGaussians

log = logging.getLogger(__name__)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@register_source("mvsplat")
class MVSplatScaffold(ScaffoldSource):
    """Frozen MVSplat (`snd.models.mvsplat.source.MVSplatSource`) on pairs of context views.

    Args:
        ckpt: MVSplat Lightning checkpoint (re10k.ckpt or a ScanNet++ fine-tune); required unless
            `random_init` (benchmarks only: speed does not depend on the weights).
        config: encoder preset the checkpoint was trained with ("scannetpp" or "re10k").
        device, precision: where and in which autocast dtype the network runs ('auto' = bf16 on CUDA).
        near, far: plane-sweep depth range (SnD ScanNet++: 1 and 100).
    """

    name = "mvsplat"
    needs_depth = False
    has_offset = True

    def __init__(self, *, ckpt: str | Path | None = None, config: str = "scannetpp", device: str = "auto",
                 precision: str = "auto", near: float = 1.0, far: float = 100.0, random_init: bool = False,
                 compile: str = "auto", pad_to: int | None = None, **_ignored):
        if ckpt is None and not random_init:
            raise SndError("--source mvsplat needs an MVSplat checkpoint",
                           hint="pass --mvsplat-ckpt <re10k.ckpt or a ScanNet++ fine-tune> (with the matching "
                                "--mvsplat-config), or use --source depth for data with depth")
        self.device = resolve_device(device)
        self.config, self.precision, self.near, self.far = config, precision, float(near), float(far)
        if not 0 < self.near < self.far:
            raise SndError(f"need 0 < near < far, got near={self.near}, far={self.far}", hint="pass --near/--far")
        self.ckpt = Path(ckpt) if ckpt is not None else None
        if self.ckpt is not None:
            require_file(self.ckpt, "MVSplat checkpoint", hint="pass --mvsplat-ckpt <path to re10k.ckpt>")
        try:
            from snd.models.mvsplat.source import MVSplatSource
        except ImportError as e:  # pragma: no cover - only if the models package is broken
            raise SndError(f"MVSplat is not available in this install ({e})") from e
        self.ckpt_sha256: str | None = sha256_file(self.ckpt) if self.ckpt is not None else None
        if self.ckpt is None:
            log.info("MVSplat with random weights (benchmark only)")
        # MVSplatSource: strict checkpoint loading (clear errors), eval + frozen, channels-last on CUDA
        # torch.compile of the networks: 15 -> 35 pairs/s at batch 4 bf16 on an H100 (docs/performance.md);
        # batches are padded to `pad_to` so a scene's short last batch does not trigger a recompile
        # "graphs" (auto's choice on CUDA) also replays the compiled networks as CUDA graphs: one launch
        # per batch, so the pipeline's host threads cannot delay kernel launches (26.5 -> 29.7 pairs/s)
        if compile == "auto":
            compile = "graphs" if self.device.type == "cuda" else "off"
        self.compiled = compile != "off"
        self.pad_to = pad_to if self.compiled else None
        self.impl = MVSplatSource(self.ckpt, config, self.device, precision, seed=0,
                                  compile="reduce-overhead" if compile == "graphs" else self.compiled)
        self.net = self.impl.encoder

    @torch.no_grad()
    def predict(self, images: Tensor, K: Tensor, c2w: Tensor, *, depth: Tensor | None = None) -> list[PixelGaussians]:
        from snd.models.mvsplat.geometry import pixel_K_to_normalized

        B, V, three, H, W = images.shape
        assert V == 2 and three == 3, f"images must be [B, 2, 3, H, W], got {tuple(images.shape)}"
        dev = self.device
        # non_blocking copies and device-side padding: nothing here synchronises the stream (stage one
        # queues the next batch before it lands this one)
        images = images.to(dev, non_blocking=True)
        K, c2w = K.to(dev, torch.float32, non_blocking=True), c2w.to(dev, torch.float32, non_blocking=True)
        if self.pad_to and B < self.pad_to:  # repeat the last pair (pairs are independent) and drop it after
            idx = torch.arange(self.pad_to, device=dev).clamp_max(B - 1)
            return self.predict(images[idx], K[idx], c2w[idx])[:B]
        K_norm = pixel_K_to_normalized(K, H, W)
        near, far = self.near, self.far  # floats: checked on the host
        out = self.net(images, K_norm, c2w, near, far, precision=self.precision)
        return list(out.gaussians)

    def describe(self) -> dict:
        return {"name": self.name, "config": self.config, "ckpt": str(self.ckpt) if self.ckpt else None,
                "ckpt_sha256": self.ckpt_sha256, "near": self.near, "far": self.far, "precision": self.precision}
        # (compile is a speed switch: it is not part of the store's identity)
