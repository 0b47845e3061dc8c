"""Linear semantic-segmentation probe (paper App. A.4; official `evaluation1` segmentation configs).

* input: last-layer patch tokens **with** the final norm (`get_intermediate_layers(norm=True)`), no CLS
  (`output_cls_token=False`, "to match FiT3D");
* 1x1 conv (init normal std 0.01, bias 0; dropout 0) -> class logits at the patch grid;
* bilinear upsample (align_corners=False) to the label size; cross-entropy, ignore label 255;
* AdamW lr 1e-3, wd 1e-4, betas (0.9, 0.999), batch 2, 320,000 iters, poly (power 1, min lr 0) with 1,500
  linear warm-up iters (ratio 1e-6).
The official configs list `norm_cfg=SyncBN` but their `BNHead` never applies it, so there is no BN here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snd.eval.features import apply_final_norm
from snd.eval.probes.base import Probe, ProbeSpec, patches_nchw
from snd.eval.probes.resize import resize_bilinear

__all__ = ["SegProbe", "SEG_SPEC", "masked_ce_sum"]

SEG_SPEC = ProbeSpec(iters=320_000, batch=2, lr=1e-3, weight_decay=1e-4, schedule="mmcv_poly", warmup=1_500,
                     warmup_ratio=1e-6, min_ratio=0.0)


class _MaskedCESum(torch.autograd.Function):
    """Σ over labelled rows of −log softmax(logits)[label], with a hand-written backward.

    Why not `F.cross_entropy(reduction="sum")`: at the probe's size (2 × 476 × 630 pixels × K classes) its
    reducing NLL kernels run at a small fraction of memory bandwidth (0.5–0.6 ms each way on an H200, for any
    K) and its backward fills a zero tensor of the logits' size before scattering into it. Here the forward is
    one log-softmax pass plus a gather, and the backward writes softmax·g once and subtracts g at the labels:
    the same function and gradient (tests compare both with `F.cross_entropy`).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)[:, None]
        logp = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(logp, safe, valid)
        return -torch.where(valid, logp.gather(1, safe)[:, 0], 0.0).sum()

    @staticmethod
    def backward(ctx, g: Tensor):
        logp, safe, valid = ctx.saved_tensors
        w = torch.where(valid, g, 0.0).to(logp.dtype)[:, None]  # [N, 1]: 0 on ignored rows
        grad = torch.exp(logp).mul_(w)
        grad.scatter_add_(1, safe, -w)
        return grad, None, None


def masked_ce_sum(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Summed cross-entropy of `logits [N, K]` against `target [N]` (int64), rows labelled `ignore_index`
    left out: equal to ``F.cross_entropy(logits, target, ignore_index=..., reduction="sum")``."""
    assert logits.ndim == 2 and target.shape == logits.shape[:1], \
        f"logits must be [N, K] and target [N], got {tuple(logits.shape)} and {tuple(target.shape)}"
    return _MaskedCESum.apply(logits, target, int(ignore_index))


class SegProbe(Probe):
    """Linear classifier on normed patch tokens."""

    task = "seg"

    def __init__(self, dim: int, *, num_classes: int, ignore_index: int = 255):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        self.dim, self.num_classes, self.ignore_index = dim, int(num_classes), int(ignore_index)
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def config(self) -> dict:
        return {"dim": self.dim, "num_classes": self.num_classes, "ignore_index": self.ignore_index}

    def prepare(self, tokens: Tensor, grid: tuple[int, int], norm: dict[str, Tensor]) -> Tensor:
        return patches_nchw(apply_final_norm(tokens, norm), grid)

    def forward(self, feats: Tensor) -> Tensor:
        """feats [B, C, h, w] -> logits [B, K, h, w]."""
        assert feats.ndim == 4 and feats.shape[1] == self.dim, f"expected [B,{self.dim},h,w], got {tuple(feats.shape)}"
        return self.conv(feats)

    def _at(self, feats: Tensor, out_hw: tuple[int, int]) -> Tensor:
        return F.interpolate(self(feats), size=out_hw, mode="bilinear", align_corners=False)

    def loss(self, feats: Tensor, batch: dict[str, Tensor], *, step: int) -> Tensor:
        gt = batch["seg"].long()  # [B,H,W]
        # sum / count of labelled pixels = the mean CE; with static shapes and no host read (CUDA graphs),
        # and 0 (zero gradient) for a batch of only ignore labels, where the mean would be 0/0
        # logits upsampled with matmuls straight into [B, H, W, K] (`resize_bilinear`): the same values as
        # F.interpolate, but a contiguous softmax per pixel and no atomic adds in the backward pass
        n = (gt != self.ignore_index).sum().clamp_min(1)
        logits = resize_bilinear(self(feats), tuple(gt.shape[-2:]), channels_last=True)
        ce = masked_ce_sum(logits.reshape(-1, self.num_classes), gt.reshape(-1), self.ignore_index)
        return ce / n

    @torch.no_grad()
    def predict(self, feats: Tensor, out_hw: tuple[int, int]) -> Tensor:
        return self._at(feats, out_hw).argmax(1)
