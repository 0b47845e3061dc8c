"""(Shifted-)window attention of MVSplat's multi-view transformer, on `F.scaled_dot_product_attention`.

Upstream (UniMatch/GMFlow, `multiview_transformer.py`) splits the 1/4-resolution feature map into
K x K windows and attends within each; every second layer first rolls the map by half a window and
adds a -100 bias between tokens that came from different regions of the rolled map (Swin's mask).
That mask is [K*K, L, L] (1 GiB in fp32 at 576x880), so we never build it. The equivalent, exact
statement: in the *unrolled* frame, shifted-window attention is plain attention inside the cells of a
grid whose row cuts are {0, s, s + w, ..., s + (K-1) w, H} (w = window, s = w // 2; same for columns),
because the roll-back maps every masked region onto exactly one such cell. Cells of equal size are
batched into one SDPA call (at most 9 calls, 4 for even windows).

The -100 bias is "minus infinity" unless a query's scores differ by more than 100 between regions,
which never happens for LayerNorm'd features; `reference.window_attention_reference` is upstream's
formulation, and tests check the two agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _segments(n: int, window: int, shift: int, splits: int) -> list[tuple[int, int]]:
    """Cuts of one axis for shifted windows: [(start, length)] covering 0..n (no empty ones)."""
    cuts = [0, shift] + [shift + i * window for i in range(1, splits)] + [n]
    segs = [(a, b - a) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return segs


def _group_by_length(segs: list[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for start, length in segs:
        out.setdefault(length, []).append(start)
    return out


def window_attention(q: Tensor, k: Tensor, v: Tensor, *, splits: int, shift: bool) -> Tensor:
    """Single-head attention inside K x K windows of a token map (upstream's `swin` attention).

    Args:
        q, k, v: [N, H, W, C] token maps (keys/values from the same grid positions as queries).
        splits: K; H and W must be multiples of it. K = 1 is global attention (never shifted).
        shift: Swin's shifted windows (upstream: odd layers).
    Returns:
        [N, H, W, C], scale 1/sqrt(C) as upstream.
    """
    N, H, W, C = q.shape
    assert k.shape == q.shape and v.shape == q.shape, (q.shape, k.shape, v.shape)
    assert H % splits == 0 and W % splits == 0, f"H, W = {(H, W)} must be multiples of splits={splits}"
    if splits == 1:
        out = F.scaled_dot_product_attention(q.reshape(N, 1, H * W, C), k.reshape(N, 1, H * W, C),
                                             v.reshape(N, 1, H * W, C))
        return out.reshape(N, H, W, C)
    wh, ww = H // splits, W // splits
    if not shift:
        def part(x: Tensor) -> Tensor:  # [N, H, W, C] -> [N, K*K, wh*ww, C]
            x = x.reshape(N, splits, wh, splits, ww, C).permute(0, 1, 3, 2, 4, 5)
            return x.reshape(N, splits * splits, wh * ww, C)

        out = F.scaled_dot_product_attention(part(q), part(k), part(v))
        out = out.reshape(N, splits, splits, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(N, H, W, C)

    rows = _group_by_length(_segments(H, wh, wh // 2, splits))
    cols = _group_by_length(_segments(W, ww, ww // 2, splits))
    out = torch.empty_like(q)
    for rl, rstarts in rows.items():
        for cl, cstarts in cols.items():
            cells = [(r, c) for r in rstarts for c in cstarts]

            def gather(x: Tensor) -> Tensor:  # -> [N, n_cells, rl*cl, C]
                return torch.stack([x[:, r:r + rl, c:c + cl] for r, c in cells], 1).reshape(N, len(cells), rl * cl, C)

            o = F.scaled_dot_product_attention(gather(q), gather(k), gather(v)).reshape(N, len(cells), rl, cl, C)
            for i, (r, c) in enumerate(cells):
                out[:, r:r + rl, c:c + cl] = o[:, i]
    return out


__all__ = ["window_attention"]
