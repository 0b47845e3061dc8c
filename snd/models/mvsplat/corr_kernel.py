"""The plane-sweep correlation of MVSplat's cost volume as one Triton kernel (CUDA; on by default there).

Why: the cost volume correlates every reference pixel with the source view's features bilinearly sampled at D
candidate depths, `<f_ref(p), f_src(warp(p, d))> / sqrt(C)`. As `grid_sample` + multiply + sum it writes the
warped features ([N, C, D, h, w] fp32, 4.2 GB per pair at 576x880 with 128 candidates) to memory only to read them
back once: 39 of MVSplat's 197 ms per batch of 8 pairs on an H200 (cuDNN's sampler alone 30 ms,
`docs/bench/profile_mvsplat_h200.jsonl`). Here each program keeps a block of reference pixels' features in
registers, walks the D candidates, gathers the 4 source corners per pixel and writes only the [N, D, h, w] result.

The arithmetic is `grid_sample`'s (bilinear, zeros padding, align_corners=True: the same corner weights and the
same in-bounds rule) in fp32 on the same fp32 inputs, so the result equals the reference up to fp32 rounding (the
channel sum's order; cuDNN's sampler, the torch path on CUDA, may round the coordinates differently). Tests: the
kernel under Triton's interpreter on the CPU against the torch path, hand values and float64, and on the GPU.
``SND_CORR_KERNEL=off`` (or 0/false/no) keeps the torch path on CUDA too.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from snd.splat.kernels import switched_on

try:  # torch's Linux wheels bring Triton; elsewhere the torch path is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

__all__ = ["available", "enabled", "correlation", "launch", "status"]

# reference pixels per program (their C fp32 features stay in registers across the D candidates) and warps: the
# fastest of the profile script's 9 shapes at stage one's size (batch 8 pairs, 576x880, C = 128, D = 128), alone on
# an H100: 16 x 4 9.7 ms per batch (16 x 8 9.6), against 22.5 for 32 x 4, the first choice
# (`docs/bench/profile_corr_shapes_h100.jsonl`)
BLOCK_P, NUM_WARPS = 16, 4


def enabled() -> bool:
    """Whether MVSplat on CUDA uses the kernel: ``SND_CORR_KERNEL`` on (unless off/0/false/no), Triton here, and
    the GPU one Triton compiles for (compute capability 7.0 or newer, as torch.compile's own rule)."""
    if triton is None or not _switch():
        return False
    return not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (7, 0)


def _switch() -> bool:
    """``SND_CORR_KERNEL`` (on by default), read each time, as snd's operator kernels read theirs."""
    return switched_on(os.environ.get("SND_CORR_KERNEL", "on"))


def available() -> bool:
    return triton is not None


def status() -> str:
    """One line for `snd doctor`."""
    if triton is None:
        return "Triton not installed: MVSplat's cost volume uses grid_sample (the same values, slower on a GPU)"
    if not enabled():
        why = "SND_CORR_KERNEL=off" if not _switch() else "this GPU is older than Triton supports"
        return f"off ({why}): MVSplat's cost volume uses grid_sample"
    where = "" if torch.cuda.is_available() else "; CUDA only, the CPU uses grid_sample"
    return f"on (Triton {triton.__version__}, compiled on first use{where})"


if triton is not None:
    @triton.jit
    def _corr_kernel(ref_ptr, src_ptr, grid_ptr, out_ptr, D, h, w, wm1, hm1, scale, C: tl.constexpr,
                     BLOCK: tl.constexpr):
        """out[n, d, p] = sum_c ref[n, p, c] * bilinear(src[n, :, :, c], grid[n, d, p]) / scale."""
        pb = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        hw = h * w
        p = pb * BLOCK + tl.arange(0, BLOCK)
        pm = p < hw
        c = tl.arange(0, C)
        ref = tl.load(ref_ptr + (n * hw + p)[:, None] * C + c[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
        src = src_ptr + n * hw * C
        for d in range(D):
            row = (n * D + d) * hw + p
            gx = tl.load(grid_ptr + row * 2, mask=pm, other=0.0)
            gy = tl.load(grid_ptr + row * 2 + 1, mask=pm, other=0.0)
            # grid_sample's unnormalisation (align_corners=True); clamped so the int conversion never overflows
            # (a coordinate outside [-1, size] has no corner inside the image either way)
            ix = tl.minimum(tl.maximum(((gx + 1) / 2) * wm1, -2.0), wm1 + 2.0)
            iy = tl.minimum(tl.maximum(((gy + 1) / 2) * hm1, -2.0), hm1 + 2.0)
            x0f = tl.floor(ix)
            y0f = tl.floor(iy)
            x1f = x0f + 1
            y1f = y0f + 1
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            x1 = x0 + 1
            y1 = y0 + 1
            # corner weights and order as grid_sample's: nw, ne, sw, se
            w_nw = (x1f - ix) * (y1f - iy)
            w_ne = (ix - x0f) * (y1f - iy)
            w_sw = (x1f - ix) * (iy - y0f)
            w_se = (ix - x0f) * (iy - y0f)
            in_x0 = (x0 >= 0) & (x0 < w)
            in_x1 = (x1 >= 0) & (x1 < w)
            in_y0 = (y0 >= 0) & (y0 < h)
            in_y1 = (y1 >= 0) & (y1 < h)
            m = pm & in_x0 & in_y0
            acc = tl.load(src + (y0 * w + x0)[:, None] * C + c[None, :], mask=m[:, None], other=0.0) * w_nw[:, None]
            m = pm & in_x1 & in_y0
            acc += tl.load(src + (y0 * w + x1)[:, None] * C + c[None, :], mask=m[:, None], other=0.0) * w_ne[:, None]
            m = pm & in_x0 & in_y1
            acc += tl.load(src + (y1 * w + x0)[:, None] * C + c[None, :], mask=m[:, None], other=0.0) * w_sw[:, None]
            m = pm & in_x1 & in_y1
            acc += tl.load(src + (y1 * w + x1)[:, None] * C + c[None, :], mask=m[:, None], other=0.0) * w_se[:, None]
            tl.store(out_ptr + row, tl.sum(ref * acc, axis=1) / scale, mask=pm)


def _check(ref: Tensor, src: Tensor, grid: Tensor) -> tuple[int, int, int, int, int]:
    N, h, w, C = ref.shape
    D = grid.shape[1]
    if src.shape != ref.shape or grid.shape != (N, D, h, w, 2):
        raise ValueError(f"ref/src must be [N, h, w, C] and grid [N, D, h, w, 2], got {tuple(ref.shape)}, "
                         f"{tuple(src.shape)}, {tuple(grid.shape)}")
    if C & (C - 1):
        raise ValueError(f"the correlation kernel needs a power-of-two channel count, got {C}")
    return N, D, h, w, C


def launch(kernel, ref: Tensor, src: Tensor, grid: Tensor, out: Tensor, *, block: int = BLOCK_P,
           num_warps: int = NUM_WARPS) -> Tensor:
    """Run `kernel` (the Triton function, or torch's `wrap_triton` of it inside the custom op) into out [N, D, h, w].
    ref/src [N, h, w, C] float32 contiguous, grid [N, D, h, w, 2] float32 contiguous. `block` and `num_warps` are
    the launch shape (the profile script sweeps them; the op uses the defaults)."""
    N, D, h, w, C = _check(ref, src, grid)
    # w - 1 and h - 1 as floats from here: torch.compile's analysis of the kernel sees ints as Python ints
    kernel[(triton.cdiv(h * w, block), N)](ref, src, grid, out, D, h, w, float(w - 1), float(h - 1), math.sqrt(C),
                                           C=C, BLOCK=block, num_warps=num_warps)
    return out


if triton is not None:
    from torch.library import triton_op, wrap_triton

    @triton_op("snd::plane_sweep_correlation", mutates_args=())
    def _corr_op(ref: Tensor, src: Tensor, grid: Tensor) -> Tensor:
        N, D, h, w, _ = _check(ref, src, grid)
        out = torch.empty((N, D, h, w), dtype=torch.float32, device=ref.device)
        return launch(wrap_triton(_corr_kernel), ref, src, grid, out)


def correlation(feat_ref: Tensor, feat_src: Tensor, grid: Tensor) -> Tensor:
    """`snd.models.mvsplat.depth.correlation_volume` on CUDA through the kernel: features [N, C, h, w] (any layout;
    channels-last is free), grid [N, D, h, w, 2] -> [N, D, h, w] float32. Traceable by torch.compile (a custom op)."""
    ref = feat_ref.float().permute(0, 2, 3, 1).contiguous()
    src = feat_src.float().permute(0, 2, 3, 1).contiguous()
    return _corr_op(ref, src, grid.float().contiguous())
