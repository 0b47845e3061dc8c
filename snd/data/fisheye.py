"""Fisheye -> pinhole undistortion in numpy (OpenCV's equidistant fisheye model, bilinear remap).

Why: ScanNet++ DSLR ``resized_images`` are fisheye (``camera_model: OPENCV_FISHEYE``, k1..k4);
MVSplat and the splatting renderer assume pinhole cameras. The ScanNet++ toolkit's ``dslr/undistort.py``
writes ``resized_undistorted_images`` with OpenCV; when a download lacks them, snd undistorts on the fly
with this module (no OpenCV dependency) and ray-casts masks and depth with the resulting pinhole camera.

Model (OpenCV ``cv2.fisheye``): a camera-frame direction with normalised pinhole coordinates (x, y),
r = |(x, y)|, theta = atan(r), is imaged at distorted normalised coordinates
(x, y) * theta_d / r with theta_d = theta (1 + k1 theta^2 + k2 theta^4 + k3 theta^6 + k4 theta^8),
then mapped to pixels by the fisheye's K. The pinhole camera snd uses is the toolkit's (`toolkit_new_K`:
OpenCV's ``fisheye.estimateNewCameraMatrixForUndistortRectify`` at balance 0, then cx = w/2, cy = h/2,
same image size), so frames undistorted here show the field of view of the toolkit's
``undistorted_images`` that FiT3D and SnD train on (keeping the fisheye K shows a ~1.27x wider view).
"""
from __future__ import annotations

import numpy as np


def fisheye_distort_normalized(xy: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Undistorted normalised coordinates [..., 2] -> distorted normalised coordinates [..., 2]."""
    xy = np.asarray(xy, dtype=np.float64)
    k1, k2, k3, k4 = (float(v) for v in k)
    r = np.linalg.norm(xy, axis=-1)
    th = np.arctan(r)
    th2 = th * th
    thd = th * (1 + th2 * (k1 + th2 * (k2 + th2 * (k3 + th2 * k4))))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(r > 1e-12, thd / r, 1.0)
    return xy * scale[..., None]


def fisheye_undistort_map(K_fish: np.ndarray, k: np.ndarray, K_pin: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates in the fisheye image for every pinhole pixel.

    Args:
        K_fish: [3, 3] fisheye intrinsics (pixels).
        k: [4] k1..k4.
        K_pin: [3, 3] intrinsics of the output pinhole image.
    Returns:
        (map_x [H, W], map_y [H, W]) float64 fisheye pixel coordinates (pixel centres at integers).
    """
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    x = (u - K_pin[0, 2]) / K_pin[0, 0]
    y = (v - K_pin[1, 2]) / K_pin[1, 1]
    d = fisheye_distort_normalized(np.stack([x, y], -1), k)
    return K_fish[0, 0] * d[..., 0] + K_fish[0, 2], K_fish[1, 1] * d[..., 1] + K_fish[1, 2]


def remap_bilinear(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """Sample `image` [H, W] or [H, W, C] at (map_x, map_y) [h, w] bilinearly; edges clamp.

    The output has the input's dtype (uint8 is rounded).
    """
    img = np.asarray(image)
    H, W = img.shape[:2]
    x = np.clip(map_x, 0, W - 1)
    y = np.clip(map_y, 0, H - 1)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, W - 2 if W > 1 else 0)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, H - 2 if H > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
    fx, fy = x - x0, y - y0
    f = img.astype(np.float64)
    if f.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    out = (f[y0, x0] * (1 - fx) + f[y0, x1] * fx) * (1 - fy) + (f[y1, x0] * (1 - fx) + f[y1, x1] * fx) * fy
    if img.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out.astype(img.dtype)


def fisheye_undistort_normalized(xy_d: np.ndarray, k: np.ndarray, iters: int = 10) -> np.ndarray:
    """Distorted normalised coordinates [..., 2] -> undistorted ones (OpenCV ``fisheye::undistortPoints``:
    Newton on theta_d = theta (1 + k1 theta^2 + ...), `iters` steps from theta = theta_d)."""
    xy_d = np.asarray(xy_d, dtype=np.float64)
    k1, k2, k3, k4 = (float(v) for v in k)
    thd = np.linalg.norm(xy_d, axis=-1)
    th = thd.copy()
    for _ in range(iters):
        t2 = th * th
        f = th * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))) - thd
        df = 1 + t2 * (3 * k1 + t2 * (5 * k2 + t2 * (7 * k3 + 9 * t2 * k4)))
        th = th - f / df
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(thd > 1e-12, np.tan(th) / thd, 1.0)
    return xy_d * scale[..., None]


def toolkit_new_K(K: np.ndarray, k: np.ndarray, height: int, width: int) -> np.ndarray:
    """The pinhole K the ScanNet++ toolkit's ``dslr/undistort.py`` gives a fisheye camera: OpenCV's
    ``fisheye.estimateNewCameraMatrixForUndistortRectify(K, D, (w, h), I, balance=0)`` (restated: undistort
    the 4 edge midpoints, take their centre of mass, and the focal length that maps the farthest-reaching
    of them to the image border, f = max of the four; OpenCV's aspect-ratio handling kept as it is), then
    cx = w / 2, cy = h / 2. [3, 3] float64."""
    K = np.asarray(K, dtype=np.float64)
    w, h = float(width), float(height)
    pts = np.array([[w / 2, 0.0], [w, h / 2], [w / 2, h], [0.0, h / 2]])
    xy = np.stack([(pts[:, 0] - K[0, 2]) / K[0, 0], (pts[:, 1] - K[1, 2]) / K[1, 1]], -1)
    und = fisheye_undistort_normalized(xy, k)
    cn = und.mean(0)
    aspect = K[0, 0] / K[1, 1]
    cn[0] *= aspect  # OpenCV scales cn's x (and the points' y) by the aspect ratio
    und[:, 1] *= aspect
    minx, maxx = und[:, 0].min(), und[:, 0].max()
    miny, maxy = und[:, 1].min(), und[:, 1].max()
    f = max(w * 0.5 / (cn[0] - minx), w * 0.5 / (maxx - cn[0]),
            h * 0.5 * aspect / (cn[1] - miny), h * 0.5 * aspect / (maxy - cn[1]))  # balance 0: the largest
    return np.array([[f, 0.0, w / 2.0], [0.0, f / aspect, h / 2.0], [0.0, 0.0, 1.0]])


def fisheye_camera_dirs(K_fish: np.ndarray, k: np.ndarray, height: int, width: int) -> np.ndarray:
    """Camera-frame directions [H, W, 3] (z = 1) of the true ray through every fisheye pixel centre.

    Why: `snd data synth --fisheye` renders each fisheye pixel along its own ray, so the raw reader's
    undistortion is tested against geometry, not against an image warped by the same code. Per pixel:
    distorted normalised coordinates -> theta by Newton (`fisheye_undistort_normalized`) -> tan(theta).
    Raises ValueError when a pixel's ray is not in front of the camera (theta >= 90 degrees) or the
    model cannot be inverted there (residual of the forward model above 1e-9).
    """
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    xy_d = np.stack([(u - K_fish[0, 2]) / K_fish[0, 0], (v - K_fish[1, 2]) / K_fish[1, 1]], -1)
    xy = fisheye_undistort_normalized(xy_d, k, iters=20)
    theta = np.arctan(np.linalg.norm(xy, axis=-1))
    resid = np.abs(fisheye_distort_normalized(xy, k) - xy_d).max()
    if not np.isfinite(xy).all() or resid > 1e-9:
        raise ValueError(f"fisheye model not invertible over the image (max residual {resid:.2e}, max theta {theta.max():.3f})")
    return np.concatenate([xy, np.ones_like(xy[..., :1])], -1)
