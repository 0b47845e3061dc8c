"""Brute-force per-pixel splatting reference (tiny scenes only): the test oracle for `render_torch`.

Written independently of `render_torch` in plain float64 numpy loops, following gsplat 1.5.3's
per-pixel kernel line by line: every pixel walks *all* projected Gaussians sorted by depth (no boxes,
no tiles, no pairs), with the same culls, clamps and early stop. Because gsplat's opacity-aware boxes
contain every pixel where alpha >= 1/255, ignoring boxes gives the same image.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from snd.splat.inputs import SplatInput
from snd.splat.render_torch import ALPHA_MAX, ALPHA_MIN, EPS2D, T_STOP


def _rotmat(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def render_reference(inp: SplatInput, features: Tensor) -> tuple[Tensor, Tensor]:
    """(image [C, H, W], alpha [H, W]) in float64, by explicit loops over pixels and Gaussians (CPU)."""
    inp.check_features(features)
    c = inp.to(device="cpu", dtype=torch.float64)
    height, width, near, far = c.height, c.width, c.near, c.far
    mu, qs, sc = c.means.numpy(), c.quats.numpy(), c.scales.numpy()
    op, fe = c.opacities.numpy(), features.detach().cpu().double().numpy()
    Km, V = c.K.numpy(), c.w2c.numpy()
    fx, fy, cx, cy = Km[0, 0], Km[1, 1], Km[0, 2] + 0.5, Km[1, 2] + 0.5
    lim = ((width - cx) / fx + 0.15 * width / fx, cx / fx + 0.15 * width / fx,
           (height - cy) / fy + 0.15 * height / fy, cy / fy + 0.15 * height / fy)
    splats = []  # (depth, index, mean2d, conic, opacity)
    for i in range(len(mu)):
        p = V[:3, :3] @ mu[i] + V[:3, 3]
        if not (near <= p[2] <= far) or op[i] < ALPHA_MIN:
            continue
        Rg = _rotmat(qs[i])
        cov = V[:3, :3] @ (Rg @ np.diag(sc[i] ** 2) @ Rg.T) @ V[:3, :3].T
        x, y, z = p
        tx = z * min(lim[0], max(-lim[1], x / z))
        ty = z * min(lim[2], max(-lim[3], y / z))
        J = np.array([[fx / z, 0, -fx * tx / z**2], [0, fy / z, -fy * ty / z**2]])
        c2 = J @ cov @ J.T + EPS2D * np.eye(2)
        if np.linalg.det(c2) <= 0:
            continue
        splats.append((z, i, np.array([fx * x / z + cx, fy * y / z + cy]), np.linalg.inv(c2), op[i]))
    splats.sort(key=lambda s: (s[0], s[1]))
    C = fe.shape[1]
    img = np.zeros((C, height, width))
    alpha_img = np.zeros((height, width))
    for r in range(height):
        for c in range(width):
            pix = np.array([c + 0.5, r + 0.5])
            T = 1.0
            for _, i, m, conic, o in splats:
                d = m - pix
                q = 0.5 * (conic[0, 0] * d[0] ** 2 + conic[1, 1] * d[1] ** 2) + conic[0, 1] * d[0] * d[1]
                a = min(ALPHA_MAX, o * np.exp(-q))
                if q < 0 or a < ALPHA_MIN:
                    continue
                if T * (1 - a) <= T_STOP:
                    break
                img[:, r, c] += fe[i] * a * T
                T *= 1 - a
            alpha_img[r, c] = 1 - T
    return torch.from_numpy(img), torch.from_numpy(alpha_img)
