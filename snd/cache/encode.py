"""Quantise pixel-aligned scaffolds into the stored fields, and rebuild float32 Gaussians from them.

Why this encoding (schema v1, docs/cache-format.md): a pixel-aligned Gaussian's mean is fixed by its
camera-frame z-depth (float16, relative error <= 2^-11) plus, for sources like MVSplat, a sub-pixel
offset of its projection (int8 over the view's offset range), so the 12 bytes of a float32 mean become
2-4 bytes. Rotations are stored in the context camera's frame (where networks predict them; constant
for the depth source), scales as log2 of the Gaussian's size in pixels at its depth, over the view's
range (uint8), opacities as uint8. Everything is computed in float64 and is deterministic on a device.

Slow references (`decode_means_reference`) exist for the tests.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from snd.cache.schema import Encoding
from snd.splat.gaussians import rotmat_to_quat

_F16_MAX = 65504.0
_MIN_OFFSET_RANGE = 1e-3  # px: offsets below this are numerical noise (e.g. the depth source) -> 0
_MIN_SCALE_RANGE = 1.0 / 16.0  # octaves: constant scales (depth source) quantise to constant codes


def quat_conj(q: Tensor) -> Tensor:
    return torch.cat([q[..., :1], -q[..., 1:]], dim=-1)  # (not q * new_tensor(...): a host copy syncs the stream)


def _pixel_grid(H: int, W: int, device: torch.device) -> tuple[Tensor, Tensor]:
    v, u = torch.meshgrid(torch.arange(H, device=device, dtype=torch.float64),
                          torch.arange(W, device=device, dtype=torch.float64), indexing="ij")
    return u, v


def _focal(K: Tensor) -> Tensor:
    """Geometric-mean focal length [...] of intrinsics [..., 3, 3] (pixels)."""
    return (K[..., 0, 0] * K[..., 1, 1]).sqrt()


def encode_scaffold(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, K: Tensor, c2w: Tensor, *,
                    enc: Encoding) -> dict[str, np.ndarray]:
    """`encode_scaffold_device`, copied to the host (numpy, leading B axis)."""
    return fields_to_numpy({k: v.cpu() for k, v in encode_scaffold_device(means, quats, scales, opacities, K, c2w,
                                                                            enc=enc).items()}, enc)


def fields_to_numpy(host: dict[str, Tensor], enc: Encoding) -> dict[str, np.ndarray]:
    """Host tensors of `encode_scaffold_device` -> the stored numpy dtypes (shares memory where it can)."""
    out = {k: v.numpy() for k, v in host.items()}
    out["scales"] = out["scales"].astype(enc.scale_dtype, copy=False)
    return out


def encode_scaffold_device(
    means: Tensor,  # [B, 2, H, W, 3]
    quats: Tensor,  # [B, 2, H, W, 4]
    scales: Tensor,  # [B, 2, H, W, 3]
    opacities: Tensor,  # [B, 2, H, W]
    K: Tensor,  # [B, 2, 3, 3]
    c2w: Tensor,  # [B, 2, 4, 4]
    *,
    enc: Encoding,
) -> dict[str, Tensor]:
    """World-frame pixel Gaussians of B pairs -> stored fields (tensors on the input's device, leading B
    axis, planar channels). Nothing here reads a value back to the host, so stage one can queue the next
    batch's network behind it and copy the fields out asynchronously.

    Args:
        means, quats (w, x, y, z, world frame), scales (std, > 0), opacities: PixelGaussians of both
            context views of B pairs, on any device.
        K: [B, 2, 3, 3] pixel intrinsics at H x W; c2w: [B, 2, 4, 4] OpenCV camera-to-world.
        enc: quantisation knobs.

    Returns:
        ``depth [B,2,H,W] f16``, ``offset [B,2,2,H,W] i8`` (if enc.offset), ``offset_range [B,2] f32``,
        ``quats [B,2,4,H,W]``, ``scales [B,2,3,H,W]``, ``scale_range [B,2,2] f32``, ``opacity [B,2,H,W] u8``
        (integer fields *not* yet delta-filtered; the writer does that).
    """
    B, V, H, W, _ = means.shape
    assert V == 2, f"means must be [B, 2, H, W, 3], got {tuple(means.shape)}"
    assert quats.shape == (B, 2, H, W, 4), f"quats must be {(B, 2, H, W, 4)}, got {tuple(quats.shape)}"
    assert scales.shape == (B, 2, H, W, 3), f"scales must be {(B, 2, H, W, 3)}, got {tuple(scales.shape)}"
    assert opacities.shape == (B, 2, H, W), f"opacities must be {(B, 2, H, W)}, got {tuple(opacities.shape)}"
    assert K.shape == (B, 2, 3, 3), f"K must be {(B, 2, 3, 3)}, got {tuple(K.shape)}"
    assert c2w.shape == (B, 2, 4, 4), f"c2w must be {(B, 2, 4, 4)}, got {tuple(c2w.shape)}"
    dev = means.device
    f64 = torch.float64
    K = K.to(dev, f64)
    c2w = c2w.to(dev, f64)
    R, t = c2w[..., :3, :3], c2w[..., :3, 3]  # [B,2,3,3], [B,2,3]
    out: dict[str, Tensor] = {}

    # -- geometry: z-depth (+ sub-pixel offset) ----------------------------------------------------
    p_cam = ((means.to(f64) - t[:, :, None, None, :]).reshape(B, 2, H * W, 3) @ R).reshape(B, 2, H, W, 3)  # R^T (m - t)
    z = p_cam[..., 2]  # [B,2,H,W]
    z16 = z.clamp(-_F16_MAX, _F16_MAX).to(torch.float16)
    z_dec = z16.to(f64)
    z_ok = z_dec > 0
    out["depth"] = z16

    if enc.offset:
        uvw = (p_cam.reshape(B, 2, H * W, 3) @ K.transpose(-1, -2)).reshape(B, 2, H, W, 3)
        uv = uvw[..., :2] / torch.where(z_ok, z, torch.ones_like(z))[..., None]
        u0, v0 = _pixel_grid(H, W, dev)
        off = uv - torch.stack([u0, v0], dim=-1)  # [B,2,H,W,2]
        off = torch.where(z_ok[..., None], off, torch.zeros_like(off))
        rng = off.abs().amax(dim=(2, 3, 4)).clamp_min(_MIN_OFFSET_RANGE).to(torch.float32)  # [B,2]
        q = torch.round(off / rng.to(f64)[:, :, None, None, None] * 127.0).clamp(-127, 127)
        out["offset"] = q.to(torch.int8).permute(0, 1, 4, 2, 3).contiguous()
        out["offset_range"] = rng
    else:
        out["offset_range"] = torch.zeros((B, 2), dtype=torch.float32, device=dev)

    # -- opacity ----------------------------------------------------------------------------------
    op_q = torch.round(opacities.to(f64).clamp(0.0, 1.0) * 255.0).to(torch.uint8)  # [B,2,H,W]
    out["opacity"] = op_q
    valid = z_ok & (op_q > 0)

    # -- rotation, in the context camera's frame, w >= 0 -------------------------------------------
    q_c2w = rotmat_to_quat(R)  # [B,2,4]
    qw = quats.to(f64)
    qw = qw / qw.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q_cam = (qw.reshape(B, 2, H * W, 4) @ quat_left_matrix(quat_conj(q_c2w)).transpose(-1, -2)).reshape(B, 2, H, W, 4)
    q_cam = torch.where(q_cam[..., :1] < 0, -q_cam, q_cam)
    qmax = 127.0 if enc.quat_bits == 8 else 32767.0
    qq = torch.round(q_cam * qmax).clamp(-qmax, qmax)
    qdt = torch.int8 if enc.quat_bits == 8 else torch.int16
    out["quats"] = qq.to(qdt).permute(0, 1, 4, 2, 3).contiguous()

    # -- scales: log2(size in pixels at the decoded depth), per-view range ---------------------------
    f = _focal(K)  # [B,2]
    zeff = torch.where(z_ok, z_dec, torch.ones_like(z_dec))
    ls = torch.log2(scales.to(f64).clamp_min(1e-30) * f[:, :, None, None, None] / zeff[..., None])  # [B,2,H,W,3]
    big = torch.finfo(f64).max
    lo = torch.where(valid[..., None], ls, torch.full_like(ls, big)).amin(dim=(2, 3, 4))  # [B,2]
    hi = torch.where(valid[..., None], ls, torch.full_like(ls, -big)).amax(dim=(2, 3, 4))
    lo = torch.where(torch.isfinite(lo) & (lo < big), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi) & (hi > -big), hi, lo)
    hi = torch.maximum(hi, lo + _MIN_SCALE_RANGE)
    srange = torch.stack([lo, hi], dim=-1).to(torch.float32)  # [B,2,2]
    lo64, hi64 = srange[..., 0].to(f64), srange[..., 1].to(f64)
    L = float(2 ** enc.scale_bits - 1)
    sq = torch.round((ls - lo64[:, :, None, None, None]) / (hi64 - lo64)[:, :, None, None, None] * L).clamp(0, L)
    sdt = torch.uint8 if enc.scale_bits == 8 else torch.int32  # 16-bit codes fit int32 (torch has no uint16 ops)
    out["scales"] = sq.to(sdt).permute(0, 1, 4, 2, 3).contiguous()
    out["scale_range"] = srange
    return out


def quat_left_matrix(q: Tensor) -> Tensor:
    """[..., 4] quaternion q -> [..., 4, 4] matrix L with L @ p == snd.splat.gaussians.quat_multiply(q, p) (batched frame changes)."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([w, -x, -y, -z], -1),
        torch.stack([x, w, -z, y], -1),
        torch.stack([y, z, w, -x], -1),
        torch.stack([z, -y, x, w], -1),
    ], dim=-2)


def decode_scaffold(
    fields: dict[str, np.ndarray | Tensor],
    K: Tensor,  # [B, 2, 3, 3]
    c2w: Tensor,  # [B, 2, 4, 4]
    *,
    enc: Encoding,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stored fields of B pairs (as returned by `encode_scaffold`, deltas undone) -> float32 Gaussians.

    Float32 throughout (the stored depth already carries ~2^-11 relative precision), batched as matrix
    products so a worker decodes a 576x880 pair in tens of milliseconds.

    Returns:
        means [B,2,H,W,3], quats [B,2,H,W,4] (unit, world frame), scales [B,2,H,W,3], opacities [B,2,H,W].
        Gaussians with z-depth <= 0 or opacity code 0 decode to their camera centre / opacity 0.
    """
    f32 = torch.float32
    dev = torch.device(device)

    def T(x: np.ndarray | Tensor) -> Tensor:
        return torch.as_tensor(x if isinstance(x, Tensor) else np.asarray(x), device=dev)

    z = T(fields["depth"]).to(f32)  # [B,2,H,W]
    B, V, H, W = z.shape
    assert V == 2, f"depth must be [B, 2, H, W], got {tuple(z.shape)}"
    assert K.shape == (B, 2, 3, 3), f"K must be {(B, 2, 3, 3)}, got {tuple(K.shape)}"
    assert c2w.shape == (B, 2, 4, 4), f"c2w must be {(B, 2, 4, 4)}, got {tuple(c2w.shape)}"
    K64, c2w64 = K.to(dev, torch.float64), c2w.to(dev, torch.float64)
    Kinv = torch.linalg.inv(K64).to(f32)
    R, t = c2w64[..., :3, :3].to(f32), c2w64[..., :3, 3].to(f32)
    z_ok = z > 0
    z = z.clamp_min(0.0)

    v, u = torch.meshgrid(torch.arange(H, device=dev, dtype=f32), torch.arange(W, device=dev, dtype=f32), indexing="ij")
    uv1 = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(1, 1, H * W, 3).expand(B, 2, H * W, 3)
    if enc.offset:
        rng = T(fields["offset_range"]).to(f32)  # [B,2]
        off = T(fields["offset"]).to(f32).reshape(B, 2, 2, H * W).transpose(-1, -2) * (rng / 127.0)[..., None, None]
        uv1 = uv1 + F.pad(off, (0, 1))
    dirs = uv1 @ Kinv.transpose(-1, -2)  # [B,2,HW,3]
    dirs = dirs / dirs[..., 2:3]
    means = (dirs * z.reshape(B, 2, H * W, 1)) @ R.transpose(-1, -2) + t[:, :, None, :]

    qmax = 127.0 if enc.quat_bits == 8 else 32767.0
    q_cam = T(fields["quats"]).to(f32).reshape(B, 2, 4, H * W).transpose(-1, -2) / qmax  # [B,2,HW,4]
    q_cam = q_cam / q_cam.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q_c2w = rotmat_to_quat(c2w64[..., :3, :3])  # [B,2,4]
    q_world = q_cam @ quat_left_matrix(q_c2w).to(f32).transpose(-1, -2)  # q_c2w ⊗ q_cam

    srange = T(fields["scale_range"]).to(f32)  # [B,2,2]
    lo, hi = srange[..., 0], srange[..., 1]
    L = float(2 ** enc.scale_bits - 1)
    codes = T(fields["scales"]).to(f32).reshape(B, 2, 3, H * W).transpose(-1, -2)  # [B,2,HW,3]
    zeff = torch.where(z_ok, z, torch.ones_like(z)).reshape(B, 2, H * W, 1)
    f = (K64[..., 0, 0] * K64[..., 1, 1]).sqrt().to(f32)  # [B,2]
    scales = torch.exp2(lo[..., None, None] + codes * ((hi - lo) / L)[..., None, None]) * zeff / f[..., None, None]

    opac = T(fields["opacity"]).to(f32) / 255.0
    opac = torch.where(z_ok, opac, torch.zeros_like(opac))
    return (means.reshape(B, 2, H, W, 3), q_world.reshape(B, 2, H, W, 4), scales.reshape(B, 2, H, W, 3), opac)


def decode_means_reference(depth: np.ndarray, offset_px: np.ndarray | None, K: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Slow, obviously-correct mean rebuild of ONE view via `Camera.unproject` (tests only).

    depth [H,W] z-depth, offset_px [H,W,2] pixel offsets or None, K [3,3], c2w [4,4] -> means [H,W,3].
    """
    from snd.data.camera import Camera

    H, W = depth.shape
    cam = Camera(K=K, c2w=c2w, height=H, width=W)
    uv = cam.pixel_grid()
    if offset_px is not None:
        uv = uv + offset_px
    return cam.unproject(uv, depth.astype(np.float64))
