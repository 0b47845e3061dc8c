"""Camera math of MVSplat's encoder, always in fp32 (bf16 has no `linalg.inv` and too few bits for
pixel coordinates): normalised intrinsics, plane-sweep sampling grids, pixel rays and the Gaussian
adapter (means, scales, world rotations, covariances).

Conventions (upstream's): `K_norm` maps camera rays to image coordinates in [0, 1] where 0 is the
left/top *edge* of the image, so the centre of pixel x sits at (x + 0.5) / W. In snd pixel units
(pixel centres at integers) that is `K_norm = [[fx/W, s/W, (cx+0.5)/W], [0, fy/H, (cy+0.5)/H], [0, 0, 1]]`
(`pixel_K_to_normalized`). `c2w` is OpenCV camera-to-world.
"""
from __future__ import annotations

import torch
from torch import Tensor

from snd.splat.gaussians import quat_multiply, quat_to_rotmat, rotmat_to_quat


def inverse(x: Tensor) -> Tensor:
    """Batched matrix inverse without the host read-back of `torch.linalg.inv`'s singularity check, so the
    encoder never stalls a caller that queues work ahead (camera matrices here are never singular)."""
    return torch.linalg.inv_ex(x)[0]


def pixel_K_to_normalized(K: Tensor, height: int, width: int) -> Tensor:
    """snd pixel intrinsics [..., 3, 3] (centres at integers) -> MVSplat normalised intrinsics."""
    Kn = K.to(torch.float32).clone()
    Kn[..., 0, 2] += 0.5
    Kn[..., 1, 2] += 0.5
    Kn[..., 0, :] /= width
    Kn[..., 1, :] /= height
    return Kn


def normalized_K_to_pixel(K_norm: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pixel_K_to_normalized`."""
    K = K_norm.to(torch.float32).clone()
    K[..., 0, :] *= width
    K[..., 1, :] *= height
    K[..., 0, 2] -= 0.5
    K[..., 1, 2] -= 0.5
    return K


def rigid_inverse(T: Tensor) -> Tensor:
    """Inverse of rigid transforms [..., 4, 4] (general inverse: tolerant to tiny non-orthonormality)."""
    return inverse(T.to(torch.float32))


def inverse_depth_candidates(near: Tensor, far: Tensor, num: int) -> Tensor:
    """[..., ] near/far -> [..., num] disparities uniform in [1/far, 1/near] (upstream's plane sweep)."""
    t = torch.linspace(0.0, 1.0, num, device=near.device, dtype=torch.float32)
    lo, hi = 1.0 / far.float(), 1.0 / near.float()
    return lo[..., None] + t * (hi - lo)[..., None]


def plane_sweep_grid(K_feat_ref: Tensor, K_feat_src: Tensor, ref_to_src: Tensor, disparities: Tensor,
                     h: int, w: int, *, clamp_min_depth: float = 1e-3) -> Tensor:
    """Sampling grid of the source view for every reference pixel and depth candidate.

    Args:
        K_feat_ref, K_feat_src: [N, 3, 3] intrinsics *at feature resolution* in upstream's feature
            pixel convention (normalised K times (w, h); feature pixel centres at integers here).
        ref_to_src: [N, 4, 4] transform of reference-camera points into the source camera.
        disparities: [N, D] candidate inverse depths.
    Returns:
        [N, D, h, w, 2] `grid_sample` coordinates (align_corners=True).
    """
    N, D = disparities.shape
    dev = disparities.device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], 0).reshape(3, h * w)  # [3, hw]
    R, t = ref_to_src[:, :3, :3].float(), ref_to_src[:, :3, 3].float()
    M = K_feat_src.float() @ R @ inverse(K_feat_ref.float())  # [N, 3, 3]
    a = M @ pix  # [N, 3, hw]: source-image homogeneous point per unit depth
    b = (K_feat_src.float() @ t[..., None])[:, :, 0]  # [N, 3]
    depth = 1.0 / disparities.float()  # [N, D]
    p = a[:, :, None, :] * depth[:, None, :, None] + b[:, :, None, None]  # [N, 3, D, hw]
    z = p[:, 2].clamp(min=clamp_min_depth)
    gx = 2 * (p[:, 0] / z) / (w - 1) - 1
    gy = 2 * (p[:, 1] / z) / (h - 1) - 1
    return torch.stack([gx, gy], -1).reshape(N, D, h, w, 2)


def unit_rays(offset_xy: Tensor, K_norm: Tensor, c2w: Tensor) -> Tensor:
    """World unit ray directions through (pixel centre + offset) of every pixel.

    Args:
        offset_xy: [..., H, W, 2] sub-pixel offsets in pixels, (x, y), in (-0.5, 0.5).
        K_norm: [..., 3, 3] normalised intrinsics.  c2w: [..., 4, 4].
    Returns:
        [..., H, W, 3] unit vectors (upstream `get_world_rays`).
    """
    H, W = offset_xy.shape[-3:-1]
    dev = offset_xy.device
    ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float32),
                            torch.arange(W, device=dev, dtype=torch.float32), indexing="ij")
    u = (xs + 0.5 + offset_xy[..., 0].float()) / W
    v = (ys + 0.5 + offset_xy[..., 1].float()) / H
    Kinv = inverse(K_norm.float())[..., None, None, :, :]  # [..., 1, 1, 3, 3]
    d = Kinv[..., 0] * u[..., None] + Kinv[..., 1] * v[..., None] + Kinv[..., 2]  # [..., H, W, 3]
    d = d / d.norm(dim=-1, keepdim=True)
    R = c2w[..., :3, :3].float()[..., None, None, :, :]  # [..., 1, 1, 3, 3]
    return (R * d[..., None, :]).sum(-1)  # elementwise, not a million tiny batched matmuls


def gaussian_means(depth: Tensor, offset_xy: Tensor, K_norm: Tensor, c2w: Tensor) -> Tensor:
    """Means of MVSplat's pixel-aligned Gaussians: camera centre + depth * unit ray.

    Note upstream's adapter treats `depth` as the distance along the *unit* ray (its cost volume is a
    z-plane sweep, the adapter then uses the normalised ray); we keep that so the trained weights
    place Gaussians where they were trained to. The cache can store (depth, offset_xy) and rebuild
    the means exactly with this function.

    Args:
        depth: [B, V, H, W].  offset_xy: [B, V, H, W, 2] in pixels.  K_norm: [B, V, 3, 3].  c2w: [B, V, 4, 4].
    Returns:
        [B, V, H, W, 3] world points.
    """
    assert depth.dim() == 4 and offset_xy.shape == (*depth.shape, 2), (depth.shape, offset_xy.shape)
    assert K_norm.shape == (*depth.shape[:2], 3, 3) and c2w.shape == (*depth.shape[:2], 4, 4), (K_norm.shape, c2w.shape)
    dirs = unit_rays(offset_xy, K_norm, c2w)
    origin = c2w[..., :3, 3].float()[:, :, None, None, :]
    return origin + dirs * depth.float()[..., None]


def scale_multiplier(K_norm: Tensor, height: int, width: int, multiplier: float = 0.1) -> Tensor:
    """Upstream's pixel-footprint factor: 0.1 * sum(inv(K_norm[:2, :2]) @ (1/W, 1/H)) -> [...]."""
    inv = inverse(K_norm[..., :2, :2].float())  # inv @ (1/W, 1/H), written so no host tensor is copied in
    return multiplier * (inv[..., :, 0] / width + inv[..., :, 1] / height).sum(-1)


def world_quats(rot_xyzw: Tensor, c2w: Tensor, eps: float = 1e-8) -> Tensor:
    """Raw camera-frame rotations [B, V, H, W, 4] (upstream order x, y, z, w) -> unit world
    quaternions (w, x, y, z) with w >= 0, i.e. the rotation c2w_R @ R(q_cam) that upstream bakes
    into its world covariances."""
    q = rot_xyzw.float()
    q = q / (q.norm(dim=-1, keepdim=True) + eps)
    q_cam = torch.cat([q[..., 3:], q[..., :3]], -1)
    q_c2w = rotmat_to_quat(c2w[..., :3, :3].float())[:, :, None, None, :]  # [B, V, 1, 1, 4]
    qw = quat_multiply(q_c2w, q_cam)
    qw = qw / qw.norm(dim=-1, keepdim=True)
    return torch.where(qw[..., :1] < 0, -qw, qw)


def activate_scales(raw_scales: Tensor, depth: Tensor, K_norm: Tensor, *, scale_min: float, scale_max: float) -> Tensor:
    """[B, V, H, W, 3] raw -> world-unit standard deviations: (min + (max-min) sigmoid) * depth * footprint."""
    H, W = depth.shape[-2:]
    s = scale_min + (scale_max - scale_min) * torch.sigmoid(raw_scales.float())
    mult = scale_multiplier(K_norm, H, W)[:, :, None, None, None]
    return s * depth.float()[..., None] * mult


def covariances_from(quats_wxyz: Tensor, scales: Tensor) -> Tensor:
    """World covariances [..., 3, 3] = R diag(s^2) R^T from world quaternions and scales."""
    R = quat_to_rotmat(quats_wxyz.float())
    return (R * scales.float().square()[..., None, :]) @ R.transpose(-1, -2)


__all__ = [
    "pixel_K_to_normalized", "normalized_K_to_pixel", "inverse_depth_candidates", "plane_sweep_grid",
    "unit_rays", "gaussian_means", "scale_multiplier", "world_quats", "activate_scales", "covariances_from",
    "quat_multiply", "rigid_inverse",
]
