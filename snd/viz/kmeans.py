"""Seeded K-means (k-means++ init) on feature vectors, in torch (no scikit-learn)."""
from __future__ import annotations

import torch
from torch import Tensor


def kmeans(X: Tensor, k: int, *, iters: int = 50, seed: int = 0, cosine: bool = True) -> tuple[Tensor, Tensor]:
    """X [N, C] -> (labels [N] long, centres [k, C]); deterministic for a seed.

    cosine: cluster L2-normalised vectors (the usual choice for ViT features).
    """
    assert X.dim() == 2 and X.shape[0] >= k >= 1, f"need X [N >= k, C], got {tuple(X.shape)} with k={k}"
    X = X.double()
    if cosine:
        X = torch.nn.functional.normalize(X, dim=1)
    g = torch.Generator().manual_seed(seed)
    centres = X[torch.randint(X.shape[0], (1,), generator=g)]
    for _ in range(1, k):  # k-means++: next centre with probability ~ squared distance
        d2 = torch.cdist(X, centres).min(1).values.square()
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centres = torch.cat([centres, X[torch.multinomial(p.float(), 1, generator=g)]])
    labels = torch.cdist(X, centres).argmin(1)
    for _ in range(iters):
        new = torch.zeros_like(centres).index_add_(0, labels, X)
        cnt = torch.bincount(labels, minlength=k).unsqueeze(1)
        centres = torch.where(cnt > 0, new / cnt.clamp_min(1), centres)  # an empty cluster keeps its centre
        nl = torch.cdist(X, centres).argmin(1)
        if torch.equal(nl, labels):
            break
        labels = nl
    return labels, centres.float()
