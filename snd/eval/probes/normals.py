"""Linear surface-normal probe with the uncertainty-aware angular loss (Bae et al. 2021), as in probe3d.

Follows `evaluation2` of the official code (probe3d's `SurfaceNormalHead(head_type="linear",
kernel_size=1, uncertainty_aware=True)` and `train_snorm.py`):
* input: last-block patch tokens, no final norm, no CLS (probe3d `output="dense"`);
* bilinear x4 upsample (align_corners=False), 1x1 conv -> 4 channels (normal xyz + kappa logit);
* bicubic upsample (align_corners=True) to the label size;
* loss (AngMF NLL of Bae et al.): kappa = ELU(k) + 1.01, theta = acos(clamp(cos(n, n*), -1+1e-4, 1-1e-4)),
  NLL = log(1 + exp(-kappa·pi)) - log(1 + kappa^2) + kappa·theta, averaged over valid pixels
  (probe3d masks with depth > 0; here a pixel is valid when its GT normal is non-zero and finite, so the
  dataset zeroes normals where they are unknown);
* AdamW lr 5e-4 (torch default wd 0.01), batch 8, 10 epochs, linear warm-up 1.5 epochs then probe3d's
  quarter-cosine decay to 1% (see `schedules.py`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snd.eval.probes.base import Probe, ProbeSpec, patches_nchw
from snd.eval.probes.resize import resize_bilinear

__all__ = ["NormalProbe", "NORMALS_SPEC", "NORMALS_EPOCHS", "angular_nll", "valid_normals"]

NORMALS_EPOCHS = 10.0
NORMALS_WARMUP_EPOCHS = 1.5
# iters / warmup are per-dataset (epochs x steps per epoch): `normals_spec(n_train)` fills them in.
NORMALS_SPEC = ProbeSpec(iters=0, batch=8, lr=5e-4, weight_decay=0.01, schedule="probe3d_cosine", warmup=0)


def normals_spec(n_train: int, batch: int = 8) -> ProbeSpec:
    """The paper's 10-epoch schedule for a training split of `n_train` images."""
    steps = max(math.ceil(n_train / batch), 1)
    return ProbeSpec(iters=int(NORMALS_EPOCHS * steps), batch=batch, lr=5e-4, weight_decay=0.01,
                     schedule="probe3d_cosine", warmup=int(NORMALS_WARMUP_EPOCHS * steps))


def valid_normals(gt: Tensor) -> Tensor:
    """[B,3,H,W] -> [B,H,W] bool: finite, non-zero GT normals."""
    return torch.isfinite(gt).all(1) & (gt.norm(dim=1) > 1e-6)


def angular_nll(pred: Tensor, gt: Tensor, mask: Tensor, *, eps: float = 1e-4) -> Tensor:
    """Uncertainty-aware angular loss.

    Args:
        pred: [B, 4, H, W] (normal xyz, any length; kappa logit).
        gt: [B, 3, H, W] unit normals.
        mask: [B, H, W] bool, pixels to average over.
    """
    assert pred.ndim == 4 and pred.shape[1] == 4, f"pred must be [B,4,H,W], got {tuple(pred.shape)}"
    assert gt.shape[1] == 3 and gt.shape[-2:] == pred.shape[-2:], f"gt {tuple(gt.shape)} vs pred {tuple(pred.shape)}"
    # masked sums (static shapes, no host read: CUDA-graph safe); unknown GT (NaN) is zeroed first so
    # that no NaN reaches the gradient through the masked-out pixels
    gt = torch.where(mask[:, None], gt, 0.0)
    cos = F.cosine_similarity(pred[:, :3], gt, dim=1).clamp(-1 + eps, 1 - eps)
    theta = torch.acos(cos)
    kappa = F.elu(pred[:, 3]) + 1.01
    nll = torch.log1p(torch.exp(-kappa * math.pi)) - torch.log1p(kappa ** 2) + kappa * theta
    return torch.where(mask, nll, 0.0).sum() / mask.sum().clamp_min(1)


class NormalProbe(Probe):
    """Linear 1x1 head on x4-upsampled patch tokens -> normal + concentration."""

    task = "normals"

    def __init__(self, dim: int, *, upsample: int = 4, mask: str = "normal"):
        super().__init__()
        if mask not in ("normal", "finite"):
            raise ValueError(f"mask must be 'normal' or 'finite', got {mask!r}")
        # "normal": train where the GT normal is non-zero; "finite": where it is not NaN (Probe3D's depth > 0
        # with the GeoNet set, whose NaN marks zero depth: a zero normal there is trained on, as 90 degrees)
        self.dim, self.upsample, self.mask = dim, upsample, mask
        self.conv = nn.Conv2d(dim, 4, kernel_size=1)

    def config(self) -> dict:
        cfg = {"dim": self.dim, "upsample": self.upsample}
        if self.mask != "normal":  # only when set, so checkpoints made before the option still load
            cfg["mask"] = self.mask
        return cfg

    def prepare(self, tokens: Tensor, grid: tuple[int, int], norm: dict[str, Tensor]) -> Tensor:
        return patches_nchw(tokens, grid)  # raw block output, as probe3d's block loop

    def forward(self, feats: Tensor) -> Tensor:
        """feats [B, C, h, w] -> [B, 4, 4h, 4w]."""
        assert feats.ndim == 4 and feats.shape[1] == self.dim, f"expected [B,{self.dim},h,w], got {tuple(feats.shape)}"
        h, w = feats.shape[-2:]
        # conv then x4 bilinear = probe3d's x4 bilinear then conv (both linear, weights sum to 1): 4 channels
        # are upsampled instead of C
        return resize_bilinear(self.conv(feats), (h * self.upsample, w * self.upsample))

    def _at(self, feats: Tensor, out_hw: tuple[int, int]) -> Tensor:
        return F.interpolate(self(feats), size=out_hw, mode="bicubic", align_corners=True)

    def loss(self, feats: Tensor, batch: dict[str, Tensor], *, step: int) -> Tensor:
        gt = batch["normals"]
        mask = valid_normals(gt) if self.mask == "normal" else torch.isfinite(gt).all(1)
        return angular_nll(self._at(feats, tuple(gt.shape[-2:])), gt, mask)

    @torch.no_grad()
    def predict(self, feats: Tensor, out_hw: tuple[int, int]) -> Tensor:
        return F.normalize(self._at(feats, out_hw)[:, :3], dim=1)
