"""PCA colour maps of dense features, fitted jointly over several images.

Why jointly: colours are only comparable across views when every image is projected on the same three
components and scaled with the same range. The sign of each component is fixed (its largest-magnitude
loading is positive), so the picture is deterministic.
"""
from __future__ import annotations

import torch
from torch import Tensor


def pca_colors(feats: list[Tensor], *, q: float = 0.01) -> list[Tensor]:
    """[C, h, w] feature maps -> [h, w, 3] colours in [0, 1] (first 3 principal components, joint fit).

    Args:
        feats: feature maps of any grid sizes (same C).
        q: quantile clipped at both ends of each component before scaling (robust to outliers).
    """
    assert feats and all(f.dim() == 3 for f in feats), "feats must be a non-empty list of [C, h, w]"
    X = torch.cat([f.flatten(1).T for f in feats]).double()  # [N, C]
    mu = X.mean(0, keepdim=True)
    Xc = X - mu
    cov = Xc.T @ Xc / max(1, X.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    comps = evecs[:, torch.argsort(evals, descending=True)[:3]]  # [C, 3]
    if comps.shape[1] < 3:
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], 3 - comps.shape[1])], 1)
    idx = comps.abs().argmax(0)
    sign = torch.sign(comps[idx, torch.arange(3)])
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    Y = Xc @ comps  # [N, 3]
    lo = torch.quantile(Y, q, dim=0)
    hi = torch.quantile(Y, 1 - q, dim=0)
    Y = ((Y - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    out, i = [], 0
    for f in feats:
        n = f.shape[1] * f.shape[2]
        out.append(Y[i:i + n].reshape(f.shape[1], f.shape[2], 3).float())
        i += n
    return out
