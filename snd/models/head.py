"""The DINO projection head, applied to every patch token.

Layout (DINOv2's `DINOHead`, as used by SnD): MLP in -> hidden -> hidden -> bottleneck (GELU between),
L2-normalise, then a weight-normalised linear layer (no bias) to K prototypes with the norm scale g
initialised to 1 (and trainable, as in the official code, which does not freeze it).

Why split into `bottleneck()` and `prototypes()`: the logits [N, K] (N = 2,542 patches, K = 65,536) are the
biggest tensor of a step; `snd.models.loss.dino_ce` consumes the normalised bottleneck [N, 256] and the
prototype matrix [K, 256] directly and never materialises all logits at once. The weight norm is applied
once per step (one [K, 256] tensor), not per chunk.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """3-layer MLP + L2 norm + weight-normed prototypes.

    Args:
        in_dim: backbone embed dim (384 ViT-S, 768 ViT-B).
        hidden: MLP hidden width (2048).
        bottleneck: bottleneck width (256).
        prototypes: number of prototypes K (65,536).
    """

    def __init__(self, in_dim: int, *, hidden: int = 2048, bottleneck: int = 256, prototypes: int = 65536):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight_norm(nn.Linear(bottleneck, K, bias=False)) with g = 1: v gets nn.Linear's default init
        v = torch.empty(prototypes, bottleneck)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.last_v = nn.Parameter(v)  # [K, D] direction
        self.last_g = nn.Parameter(torch.ones(prototypes, 1))  # [K, 1] norm

    @property
    def num_prototypes(self) -> int:
        return self.last_v.shape[0]

    def bottleneck(self, x: Tensor) -> Tensor:
        """Patch features [N, in_dim] -> L2-normalised bottleneck [N, D]."""
        z = self.mlp(x)
        eps = 1e-6 if z.dtype == torch.float16 else 1e-12
        return F.normalize(z, dim=-1, p=2, eps=eps)

    def prototypes(self) -> Tensor:
        """Weight-normalised prototype matrix [K, D] = g * v / ||v|| (row norms, like torch weight_norm dim 0)."""
        return self.last_g * self.last_v / self.last_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        """Patch features [N, in_dim] -> logits [N, K] (the slow, obvious path; training uses dino_ce)."""
        return self.bottleneck(x) @ self.prototypes().t()
