"""OpenCV's ``cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)`` on uint8 images, restated in torch.

Why: FiT3D's ScanNet++ frames (the official depth probe's input) are the DSLR images halved with exactly this
call (FiT3D ``scannetpp_preprocess/dslr/downscale.py``), and OpenCV is not a dependency of snd. Read from
OpenCV's ``modules/imgproc/src/resize.cpp`` (``resize_cpu``, ``interpolateCubic``, ``HResizeCubic``,
``VResizeCubic``, ``resizeGeneric_Invoker``, ``VResizeCubicVec_32s8u``):

* source coordinate of output pixel d (per axis, scale = in / out in double): ``f = float((d + 0.5) * scale - 0.5)``
  (pixel centres aligned, "align_corners=False"), taps at ``floor(f) - 1 .. floor(f) + 2``, ``t = f - floor(f)``
  in float32;
* kernel: Keys' cubic with a = -0.75, evaluated in float32 as OpenCV writes it, the 4th weight = 1 - the others;
* uint8: each weight times 2048 rounded to a short (round half to even), so the four sum to ~2048;
* border: a tap outside the image reads the nearest edge pixel (replicate), on both axes;
* horizontal pass: exact integer sums; vertical pass: in OpenCV's 128-bit SIMD body (``simd_lanes`` = 8
  int16 lanes: the x86-64 wheels' SSE baseline, ARM NEON), the four row sums are scaled by weight / 2^22 in
  float32 (product, then sum, no FMA, in OpenCV's order), rounded half to even and saturated to 0..255; the row's
  last ``(w * C) % simd_lanes`` elements take the scalar path, ``(sum + 2^21) >> 22`` (half up) then saturation.
  For an exact 2x downscale every float step is exact (the weights are multiples of 64), so the two paths differ
  only on exact .5 ties.

Not restated: builds whose vertical pass is 256-bit with FMA (AVX2 baseline), and Intel IPP's own arithmetic
where IPP takes uint8 INTER_CUBIC (x86-64 wheels; same kernel and border: ``IwiResizeParams(0, 0, 0.75, 4)``,
``ippBorderRepl``); docs/evaluation.md says what that leaves open.
"""
from __future__ import annotations

import numpy as np
import torch

A = np.float32(-0.75)  # OpenCV's cubic parameter (Keys' a)
COEF_BITS = 11  # INTER_RESIZE_COEF_BITS: weights are shorts scaled by 2^11
SIMD_LANES = 8  # int16 lanes of OpenCV's 128-bit vertical pass (SSE/NEON builds)


def cubic_coeffs(t: np.ndarray) -> np.ndarray:
    """OpenCV's ``interpolateCubic`` for fractional offsets t [n] (float32) -> weights [n, 4] (float32), in its
    float32 order of operations, so the rounding to shorts sees the same floats."""
    t = np.asarray(t, dtype=np.float32)
    one, two, three = np.float32(1), np.float32(2), np.float32(3)
    five_a, eight_a, four_a = np.float32(5) * A, np.float32(8) * A, np.float32(4) * A
    x1 = t + one
    c0 = ((A * x1 - five_a) * x1 + eight_a) * x1 - four_a
    c1 = ((A + two) * t - (A + three)) * t * t + one
    u = one - t
    c2 = ((A + two) * u - (A + three)) * u * u + one
    c3 = one - c0 - c1 - c2
    return np.stack([c0, c1, c2, c3], -1).astype(np.float32)


def cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel of one axis: source indices [out, 4] (int64, edge-replicated) and short weights [out, 4]
    (int64, OpenCV's fixed point, scale 2^11)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in={in_size}, out={out_size}")
    scale = 1.0 / (out_size / in_size)  # resize_cpu: inv_scale = dst / src (double), scale = 1 / inv_scale
    f = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f)
    t = (f - s).astype(np.float32)
    idx = np.clip(s.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    w = np.rint(cubic_coeffs(t) * np.float32(1 << COEF_BITS)).astype(np.int64)  # saturate_cast<short>: cvRound
    return idx, w


def resize_cubic_cv2(image: np.ndarray | torch.Tensor, height: int, width: int, *,
                     simd_lanes: int = SIMD_LANES) -> np.ndarray:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)`` of a uint8 image.

    Args:
        image: [H, W] or [H, W, C] uint8 (numpy or torch).
        height, width: output size.
        simd_lanes: int16 lanes of OpenCV's vectorised vertical pass (8: 128-bit SSE/NEON builds; 0: the scalar
            build, every element rounded half up).
    Returns:
        [height, width(, C)] uint8 numpy array.
    """
    x = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, copy=True))
    assert x.dtype == torch.uint8 and x.ndim in (2, 3), f"expected uint8 [H, W(, C)], got {x.dtype} {tuple(x.shape)}"
    squeeze = x.ndim == 2
    if squeeze:
        x = x[..., None]
    H, W, C = x.shape
    xi, xw = (torch.from_numpy(a) for a in cubic_taps(W, width))
    yi, yw = (torch.from_numpy(a) for a in cubic_taps(H, height))
    src = x.to(torch.int64)
    rows = (src[:, xi, :] * xw[None, :, :, None]).sum(2)  # HResizeCubic: [H, width, C], exact ints
    taps = rows[yi]  # [height, 4, width, C]: the four (edge-replicated) source rows of each output row
    exact = (taps * yw[:, :, None, None]).sum(1)  # VResizeCubic, integer path
    out = torch.clamp((exact + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS), 0, 255)  # FixedPtCast: half up
    if simd_lanes > 0:  # VResizeCubicVec_32s8u: float32, t = S3*b3; t = S2*b2 + t; ...; round half to even
        b = yw.to(torch.float32) * np.float32(1.0 / (1 << (2 * COEF_BITS)))  # exact (power-of-two scale)
        s = taps.to(torch.float32)  # exact: |row sums| < 2^24
        acc = s[:, 3] * b[:, 3, None, None]
        for k in (2, 1, 0):
            acc = s[:, k] * b[:, k, None, None] + acc
        vec = torch.clamp(torch.round(acc), 0, 255).to(torch.int64)
        flat_out, flat_vec = out.reshape(height, -1), vec.reshape(height, -1)
        n_vec = (width * C) - (width * C) % simd_lanes  # the SIMD loop covers whole blocks of the row
        flat_out[:, :n_vec] = flat_vec[:, :n_vec]
        out = flat_out.reshape(height, width, C)
    out = out.to(torch.uint8).numpy()
    return out[..., 0] if squeeze else out
