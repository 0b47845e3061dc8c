"""Pinhole cameras in snd's one convention.

Inside snd every camera is:
  * ``K``   [3, 3] intrinsics in pixels for an image of ``height`` x ``width``; pixel *centres* sit at
    integer coordinates (OpenCV): the top-left pixel's centre is (0, 0), its outer corner (-0.5, -0.5).
  * ``c2w`` [4, 4] camera-to-world, OpenCV axes: x right, y down, z forward (into the scene).

Readers convert at the boundary (nerfstudio / ScanNet++ transforms are OpenGL: y up, z backward; see
`opengl_to_opencv`). Renderers whose pixel centres sit at +0.5 (gsplat) shift cx, cy by +0.5 themselves.
MVSplat wants intrinsics normalised by the image size; `normalized_K` gives those.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Flips y and z: OpenGL/nerfstudio camera axes (x right, y up, z back) <-> OpenCV (x right, y down, z fwd).
_GL_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def opengl_to_opencv(c2w_gl: np.ndarray) -> np.ndarray:
    """Camera-to-world in OpenGL axes [4, 4] -> the same camera in OpenCV axes [4, 4]."""
    c2w_gl = np.asarray(c2w_gl, dtype=np.float64)
    assert c2w_gl.shape == (4, 4), c2w_gl.shape
    return c2w_gl @ _GL_CV


def opencv_to_opengl(c2w_cv: np.ndarray) -> np.ndarray:
    """Inverse of `opengl_to_opencv` (the flip is its own inverse)."""
    c2w_cv = np.asarray(c2w_cv, dtype=np.float64)
    assert c2w_cv.shape == (4, 4), c2w_cv.shape
    return c2w_cv @ _GL_CV


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: intrinsics for one image size plus an OpenCV camera-to-world pose."""

    K: np.ndarray  # [3, 3] float64, pixels
    c2w: np.ndarray  # [4, 4] float64, OpenCV axes
    height: int
    width: int

    def __post_init__(self) -> None:
        K = np.asarray(self.K, dtype=np.float64)
        c2w = np.asarray(self.c2w, dtype=np.float64)
        if K.shape != (3, 3):
            raise ValueError(f"K must be [3, 3], got {K.shape}")
        if c2w.shape != (4, 4):
            raise ValueError(f"c2w must be [4, 4], got {c2w.shape}")
        if not np.all(np.isfinite(K)) or not np.all(np.isfinite(c2w)):
            raise ValueError("camera has non-finite values")
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "c2w", c2w)
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "width", int(self.width))

    # -- derived -------------------------------------------------------------------------------
    @property
    def w2c(self) -> np.ndarray:
        """World-to-camera [4, 4] (rigid inverse, exact for orthonormal rotations)."""
        R, t = self.c2w[:3, :3], self.c2w[:3, 3]
        out = np.eye(4)
        out[:3, :3] = R.T
        out[:3, 3] = -R.T @ t
        return out

    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates [3]."""
        return self.c2w[:3, 3].copy()

    def normalized_K(self) -> np.ndarray:
        """Intrinsics for coordinates normalised by image size (MVSplat's convention).

        MVSplat puts pixel x's centre at (x + 0.5) / W, so cx_n = (cx + 0.5) / W (not cx / W).
        """
        Kn = self.K.copy()
        Kn[0, 2] += 0.5
        Kn[1, 2] += 0.5
        Kn[0] /= self.width
        Kn[1] /= self.height
        return Kn

    def scaled(self, height: int, width: int) -> "Camera":
        """The same camera for a resized image (pixel-centre convention kept exact)."""
        sx, sy = width / self.width, height / self.height
        K = self.K.copy()
        K[0, 0] *= sx
        K[1, 1] *= sy
        K[0, 1] *= sx
        K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
        K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
        return Camera(K=K, c2w=self.c2w, height=height, width=width)

    def cropped(self, top: int, left: int, height: int, width: int) -> "Camera":
        """The same camera for a crop of the image starting at (top, left)."""
        K = self.K.copy()
        K[0, 2] -= left
        K[1, 2] -= top
        return Camera(K=K, c2w=self.c2w, height=height, width=width)

    # -- geometry ------------------------------------------------------------------------------
    def pixel_grid(self) -> np.ndarray:
        """Pixel-centre coordinates [H, W, 2] as (u, v) = (column, row)."""
        v, u = np.meshgrid(np.arange(self.height), np.arange(self.width), indexing="ij")
        return np.stack([u, v], axis=-1).astype(np.float64)

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel ray origins [H, W, 3] and world directions [H, W, 3] with unit *z-depth* scale.

        A point at z-depth d along pixel (u, v) is ``origin + d * direction`` (direction has camera-frame
        z = 1, so it is not unit length); use `unit=True`-style normalisation yourself for ray casting.
        """
        uv = self.pixel_grid()
        d_cam = self.pixel_to_camera_dirs(uv)
        d_world = d_cam @ self.c2w[:3, :3].T
        origins = np.broadcast_to(self.c2w[:3, 3], d_world.shape).copy()
        return origins, d_world

    def pixel_to_camera_dirs(self, uv: np.ndarray) -> np.ndarray:
        """Pixels [..., 2] -> camera-frame directions [..., 3] with z = 1."""
        uv = np.asarray(uv, dtype=np.float64)
        Kinv = np.linalg.inv(self.K)
        homo = np.concatenate([uv, np.ones_like(uv[..., :1])], axis=-1)
        d = homo @ Kinv.T
        return d / d[..., 2:3]

    def unproject(self, uv: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Pixels [..., 2] with z-depth [...] -> world points [..., 3]."""
        d = self.pixel_to_camera_dirs(uv) * np.asarray(depth, dtype=np.float64)[..., None]
        return d @ self.c2w[:3, :3].T + self.c2w[:3, 3]

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points [..., 3] -> (pixels [..., 2], z-depth [...]); z <= 0 means behind the camera."""
        p = np.asarray(points, dtype=np.float64)
        w2c = self.w2c
        pc = p @ w2c[:3, :3].T + w2c[:3, 3]
        z = pc[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uvw = pc @ self.K.T
            uv = uvw[..., :2] / uvw[..., 2:3]
        return uv, z

    def depth_to_points(self, depth: np.ndarray) -> np.ndarray:
        """A z-depth map [H, W] -> world points [H, W, 3] (one per pixel centre)."""
        assert depth.shape == (self.height, self.width), (depth.shape, (self.height, self.width))
        return self.unproject(self.pixel_grid(), depth)

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"K": self.K.tolist(), "c2w": self.c2w.tolist(), "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, d: dict) -> "Camera":
        return cls(K=np.array(d["K"]), c2w=np.array(d["c2w"]), height=d["height"], width=d["width"])


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """A [3, 3] pixel intrinsics matrix."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """OpenCV camera-to-world [4, 4] at `eye` looking at `target` (z forward, y down, `up` is world up)."""
    eye = np.asarray(eye, dtype=np.float64)
    z = np.asarray(target, dtype=np.float64) - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:
        raise ValueError("look_at: view direction is parallel to up")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w
