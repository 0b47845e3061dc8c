"""The "depth" scaffold: one isotropic Gaussian per pixel, placed at the pixel's unprojected depth.

Why: stage two only needs *some* pixel-aligned Gaussians per context view. When the dataset has depth
(ScanNet++ meshes, procedural scenes) this gives a scaffold without MVSplat, and because its geometry is
exact it is also the ground truth the splatting tests check against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from snd.splat.gaussians import PixelGaussians

# Scale given to invalid pixels: the contract wants scales > 0; their opacity is 0 and their mean sits
# at the camera centre (z = 0 < near), so every renderer culls them anyway.
_INVALID_SCALE = 1e-6


def pixel_footprint(depth: Tensor, K: Tensor) -> Tensor:
    """Side of one pixel seen at z-depth `depth` [V, H, W] with intrinsics K [V, 3, 3]: depth / focal.

    The focal length is the geometric mean sqrt(fx * fy), so the isotropic Gaussian covers one pixel's
    area on a fronto-parallel surface.
    """
    focal = (K[:, 0, 0] * K[:, 1, 1]).sqrt()  # [V]
    return depth / focal[:, None, None]


def unproject_depth(depth: Tensor, K: Tensor, c2w: Tensor) -> Tensor:
    """z-depth maps [V, H, W] -> world points [V, H, W, 3] at the pixel centres (integer coordinates).

    Args:
        depth: [V, H, W] z-depth along the camera axis (0 = invalid; gives the camera centre).
        K:     [V, 3, 3] pixel intrinsics (snd convention: pixel centres at integer coordinates).
        c2w:   [V, 4, 4] camera-to-world, OpenCV axes.
    """
    V, H, W = depth.shape
    assert K.shape == (V, 3, 3), f"K must be [V, 3, 3] = {(V, 3, 3)}, got {tuple(K.shape)}"
    assert c2w.shape == (V, 4, 4), f"c2w must be [V, 4, 4] = {(V, 4, 4)}, got {tuple(c2w.shape)}"
    dt = depth.dtype
    ys, xs = torch.meshgrid(torch.arange(H, device=depth.device, dtype=dt),
                            torch.arange(W, device=depth.device, dtype=dt), indexing="ij")
    uv1 = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # [H, W, 3]
    Kinv = torch.linalg.inv_ex(K.to(torch.float64))[0].to(dt)  # [V, 3, 3]; inv_ex: no host read-back (stage one queues ahead)
    dirs = torch.einsum("vij,hwj->vhwi", Kinv, uv1)  # [V, H, W, 3]
    dirs = dirs / dirs[..., 2:3]  # camera z = 1 (exact for any K with a plain last row)
    pts_c = dirs * depth[..., None]  # [V, H, W, 3]
    R, t = c2w[:, :3, :3].to(dt), c2w[:, :3, 3].to(dt)
    return torch.einsum("vij,vhwj->vhwi", R, pts_c) + t[:, None, None, :]


def gaussians_from_depth(
    depth: Tensor,  # [V, H, W]
    K: Tensor,  # [V, 3, 3]
    c2w: Tensor,  # [V, 4, 4]
    *,
    scale_mult: float = 0.5,
    opacity: float = 0.9,
) -> PixelGaussians:
    """One isotropic Gaussian per valid pixel at its unprojected depth.

    Args:
        depth: [V, H, W] z-depth in metres, 0 (or non-finite) = invalid.
        K:     [V, 3, 3] pixel intrinsics for H x W.
        c2w:   [V, 4, 4] camera-to-world (OpenCV axes).
        scale_mult: standard deviation in units of the pixel footprint (depth / focal). Splatting sorts
            whole Gaussians by depth, so on every surface that recedes across the screen the nearer
            neighbours overlap a pixel first and pull its value toward them: measured on a procedural
            plane scene (tests), the rendered point lands ~0.9 px from the true one at 0.5 (opacity 0.9),
            ~2 px at 1.0 and ~0.4 px at 0.3. Below ~0.5 a target view 1.5x closer than the context
            shows holes; 0.5 keeps full coverage there and stays sub-pixel.
        opacity: opacity of every valid Gaussian (invalid pixels get 0, so renderers skip them).

    Returns:
        PixelGaussians [V, H, W] in world coordinates, identity rotations, dtype float32.
    """
    assert depth.dim() == 3, f"depth must be [V, H, W], got {tuple(depth.shape)}"
    if not 0.0 < opacity < 1.0:
        raise ValueError(f"opacity must be in (0, 1), got {opacity}")
    if scale_mult <= 0:
        raise ValueError(f"scale_mult must be > 0, got {scale_mult}")
    depth = depth.to(torch.float32)
    K = K.to(device=depth.device, dtype=torch.float32)
    c2w = c2w.to(device=depth.device, dtype=torch.float32)
    valid = torch.isfinite(depth) & (depth > 0)  # [V, H, W]
    depth = torch.where(valid, depth, torch.zeros_like(depth))
    means = unproject_depth(depth, K, c2w)  # [V, H, W, 3]
    std = scale_mult * pixel_footprint(depth, K)  # [V, H, W]
    std = torch.where(valid, std, torch.full_like(std, _INVALID_SCALE))
    scales = std[..., None].expand(*std.shape, 3).contiguous()  # [V, H, W, 3]
    quats = torch.zeros(*depth.shape, 4, dtype=torch.float32, device=depth.device)
    quats[..., 0] = 1.0
    opac = valid.to(torch.float32) * opacity  # [V, H, W]
    return PixelGaussians(means=means, quats=quats, scales=scales, opacities=opac)
