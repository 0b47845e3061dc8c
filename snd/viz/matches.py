"""Mutual nearest-neighbour matches of two dense feature maps, drawn as lines on the image pair."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def mutual_nn(f0: Tensor, f1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[C, h0, w0], [C, h1, w1] -> (idx0 [M], idx1 [M], cosine [M]) of mutual nearest neighbours, best first."""
    a = torch.nn.functional.normalize(f0.flatten(1).T.float(), dim=1)
    b = torch.nn.functional.normalize(f1.flatten(1).T.float(), dim=1)
    sim = a @ b.T
    nn01 = sim.argmax(1)
    nn10 = sim.argmax(0)
    i0 = torch.arange(a.shape[0])
    keep = nn10[nn01] == i0
    i0, i1 = i0[keep], nn01[keep]
    s = sim[i0, i1]
    order = torch.argsort(s, descending=True, stable=True)
    return i0[order], i1[order], s[order]


def draw_matches(img0: np.ndarray, img1: np.ndarray, grid0: tuple[int, int], grid1: tuple[int, int],
                 idx0: Tensor, idx1: Tensor, *, max_lines: int = 200):
    """Side-by-side PIL image of img0 | img1 (uint8 HWC) with a line per match (patch centres)."""
    from PIL import Image, ImageDraw

    H0, W0 = img0.shape[:2]
    H1, W1 = img1.shape[:2]
    canvas = Image.new("RGB", (W0 + W1, max(H0, H1)))
    canvas.paste(Image.fromarray(img0), (0, 0))
    canvas.paste(Image.fromarray(img1), (W0, 0))
    draw = ImageDraw.Draw(canvas)
    h0, w0 = grid0
    h1, w1 = grid1
    n = min(max_lines, len(idx0))
    for k in range(n):
        y0, x0 = divmod(int(idx0[k]), w0)
        y1, x1 = divmod(int(idx1[k]), w1)
        hue = k / max(1, n)
        colour = tuple(int(255 * c) for c in (abs(np.sin(6.28 * hue)), abs(np.sin(6.28 * hue + 2.1)), abs(np.sin(6.28 * hue + 4.2))))
        draw.line([((x0 + 0.5) * W0 / w0, (y0 + 0.5) * H0 / h0), (W0 + (x1 + 0.5) * W1 / w1, (y1 + 0.5) * H1 / h1)],
                  fill=colour, width=1)
    return canvas
