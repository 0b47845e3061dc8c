"""Pixel-aligned 3D Gaussians: the scaffold one context view contributes.

Why a container: stage one (MVSplat or dataset depth) produces these, the cache stores them compactly,
and the renderers consume them; all three agree on this one layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PixelGaussians:
    """One Gaussian per pixel per view, in world coordinates.

    Attributes (V views of H x W pixels):
        means:     [V, H, W, 3] world positions.
        quats:     [V, H, W, 4] unit quaternions (w, x, y, z), world frame rotation of the Gaussian.
        scales:    [V, H, W, 3] standard deviations along the Gaussian's rotated axes (metres, > 0).
        opacities: [V, H, W]    in (0, 1).
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor

    def __post_init__(self) -> None:
        V, H, W, three = self.means.shape
        assert three == 3, f"means must be [V, H, W, 3], got {tuple(self.means.shape)}"
        assert self.quats.shape == (V, H, W, 4), f"quats must be [V, H, W, 4], got {tuple(self.quats.shape)}"
        assert self.scales.shape == (V, H, W, 3), f"scales must be [V, H, W, 3], got {tuple(self.scales.shape)}"
        assert self.opacities.shape == (V, H, W), f"opacities must be [V, H, W], got {tuple(self.opacities.shape)}"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(V, H, W)."""
        V, H, W, _ = self.means.shape
        return V, H, W

    def to(self, *args, **kwargs) -> "PixelGaussians":
        return PixelGaussians(*(t.to(*args, **kwargs) for t in (self.means, self.quats, self.scales, self.opacities)))

    def flatten(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(means [N, 3], quats [N, 4], scales [N, 3], opacities [N]) with N = V*H*W, view-major."""
        return (self.means.reshape(-1, 3), self.quats.reshape(-1, 4), self.scales.reshape(-1, 3),
                self.opacities.reshape(-1))

    def covariances(self) -> Tensor:
        """World covariances [V, H, W, 3, 3] = R diag(s^2) R^T."""
        R = quat_to_rotmat(self.quats)
        S2 = torch.diag_embed(self.scales.square())
        return R @ S2 @ R.transpose(-1, -2)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of (w, x, y, z) quaternions [..., 4]."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], -1)


def quat_to_rotmat(q: Tensor) -> Tensor:
    """Quaternions [..., 4] (w, x, y, z; normalised here) -> rotation matrices [..., 3, 3]."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(q.shape[:-1] + (3, 3))


def rotmat_to_quat(R: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] (w, x, y, z) with w >= 0."""
    m = R
    t = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack(
        [
            torch.stack([1 + t, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
        ],
        dim=-2,
    )  # [..., 4, 4]; row k is 4*q*q_k, best conditioned where |q_k| is largest
    diag = torch.stack([1 + t, 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                        1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1)
    idx = diag.argmax(-1)
    q = torch.gather(cands, -2, idx[..., None, None].expand(*idx.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)
