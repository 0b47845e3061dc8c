"""One procedural scene of `snd data synth`, in memory: sampled (`build_scene`) and rendered (`SynthScene`).

Why its own module: a scene is a pure function of (seed, index) that tests use as ground truth on its own
(the readers' masks and depth against its analytic spheres, the fisheye reader against its cameras), apart
from the files `snd.data.synth` writes. A scene is a box-shaped room (floor, ceiling, four walls) with a
handful of boxes, cylinders and spheres standing on the floor (`snd.data.synth_geometry`), each one
annotated instance with a semantic class, seen by a camera gliding along an arc of an ellipse around the
room's centre while looking at its contents (neighbouring frames overlap strongly; frames 8-12 apart still
share most of the view, as SnD's context sampler needs). Images come from the same ray caster the readers
use for masks and depth (`snd.data.raycast`), shaded with a point light and a procedural solid texture per
surface (`snd.data.synth_texture`). Every random choice comes from ``numpy.random.default_rng`` seeded by
(seed, scene index).
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from snd.data.camera import Camera, intrinsics, look_at
from snd.data.fisheye import fisheye_camera_dirs
from snd.data.raycast import MeshRaycaster
from snd.data.synth_geometry import Part, _room_parts, box_part, cylinder_part, sphere_part
from snd.data.synth_texture import _texture_params, texture
from snd.errors import SndError

log = logging.getLogger(__name__)

__all__ = ["SynthScene", "build_scene", "scene_name", "fisheye_intrinsics", "FISHEYE_FOCAL", "FISHEYE_K"]


@dataclass
class SynthScene:
    """Everything about one procedural scene, in memory (what `generate_dataset` writes to disk)."""

    name: str
    parts: list[Part]
    object_ids: list[int]  # per part: ScanNet++ objectId (>= 1)
    cameras: list[Camera]  # OpenCV, mesh world
    frame_names: list[str]
    light: np.ndarray  # [3]

    # derived, built by `finish`
    vertices: np.ndarray = None  # type: ignore[assignment]
    normals: np.ndarray = None  # type: ignore[assignment]
    faces: np.ndarray = None  # type: ignore[assignment]
    face_part: np.ndarray = None  # type: ignore[assignment]
    vertex_segment: np.ndarray = None  # type: ignore[assignment]
    segments_of_part: list[list[int]] = None  # type: ignore[assignment]

    def finish(self) -> "SynthScene":
        V, N, F, FP, VS, segs, off, seg_off = [], [], [], [], [], [], 0, 0
        for k, part in enumerate(self.parts):
            V.append(part.vertices)
            N.append(part.normals)
            F.append(part.faces + off)
            FP.append(np.full(len(part.faces), k))
            # vertex -> segment: vertices of a part belong to the segment of any face using them
            vs = np.zeros(len(part.vertices), dtype=np.int64)
            vs[part.faces.ravel()] = np.repeat(part.face_segment, 3)
            n_seg = int(part.face_segment.max()) + 1
            VS.append(vs + seg_off)
            segs.append(list(range(seg_off, seg_off + n_seg)))
            seg_off += n_seg
            off += len(part.vertices)
        self.vertices, self.normals = np.concatenate(V), np.concatenate(N)
        self.faces, self.face_part = np.concatenate(F), np.concatenate(FP)
        self.vertex_segment, self.segments_of_part = np.concatenate(VS), segs
        return self

    def render(self, raycaster: MeshRaycaster, cam: Camera) -> np.ndarray:
        """RGB image [H, W, 3] uint8 of camera `cam` (Lambert + ambient, procedural albedo)."""
        return self.shade(raycaster.cast(cam), cam.center)

    def render_fisheye(self, raycaster: MeshRaycaster, c2w: np.ndarray, height: int, width: int) -> np.ndarray:
        """RGB image [H, W, 3] uint8 of the OPENCV_FISHEYE camera (`fisheye_intrinsics`) at pose `c2w`,
        every pixel shaded along its true distorted ray (`snd.data.fisheye.fisheye_camera_dirs`)."""
        d = _fisheye_dirs(height, width) @ np.asarray(c2w)[:3, :3].T
        o = np.broadcast_to(np.asarray(c2w)[:3, 3], d.shape).copy()
        return self.shade(raycaster.cast_rays(o, d), np.asarray(c2w)[:3, 3])

    def shade(self, hits, center: np.ndarray) -> np.ndarray:
        """Shade ray hits (`RayHits` of an [H, W] image seen from `center`) into RGB [H, W, 3] uint8."""
        H, W = hits.face.shape
        face = hits.face.reshape(-1)
        ok = face >= 0
        rgb = np.zeros((H * W, 3))
        pts = hits.points.reshape(-1, 3)
        bary = hits.bary.reshape(-1, 3)
        fidx = face[ok]
        tri_n = self.normals[self.faces[fidx]]  # [M, 3, 3]
        n = np.einsum("mk,mkd->md", bary[ok], tri_n)
        n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
        view = pts[ok] - center
        n = np.where((np.einsum("md,md->m", n, view) > 0)[:, None], -n, n)  # face the camera
        to_light = self.light - pts[ok]
        dist = np.linalg.norm(to_light, axis=1, keepdims=True)
        lam = np.clip(np.einsum("md,md->m", n, to_light / dist), 0, None)
        shade = 0.35 + 0.75 * lam / (1.0 + 0.04 * dist[:, 0] ** 2)
        albedo = np.zeros((len(fidx), 3))
        part_of = self.face_part[fidx]
        for k in np.unique(part_of):
            sel = part_of == k
            albedo[sel] = texture(pts[ok][sel], self.parts[k].texture)
        rgb[ok] = albedo * shade[:, None]
        rgb = np.clip(rgb, 0, 1) ** (1 / 1.6)
        return np.round(rgb * 255).astype(np.uint8).reshape(H, W, 3)

    def vertex_colors(self) -> np.ndarray:
        cols = np.zeros((len(self.vertices), 3))
        off = 0
        for part in self.parts:
            n = len(part.vertices)
            cols[off : off + n] = texture(part.vertices, part.texture)
            off += n
        return np.round(cols * 255).astype(np.uint8)


# The fisheye camera of `--fisheye` scenes: focal 0.5 x width (wider than the pinhole's 0.75 x width, like
# the DSLR's fisheye against its undistorted view), principal point at the image centre, and k1..k4 of the
# order of the ScanNet++ release's (barrel distortion; invertible over the whole image).
FISHEYE_FOCAL = 0.5
FISHEYE_K = np.array([-0.03, -0.005, 0.002, -0.0005])


def fisheye_intrinsics(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(K [3, 3], k1..k4 [4]) of the synthetic OPENCV_FISHEYE camera at this image size."""
    f = FISHEYE_FOCAL * width
    return intrinsics(f, f, (width - 1) / 2, (height - 1) / 2), FISHEYE_K.copy()


@functools.lru_cache(maxsize=2)
def _fisheye_dirs(height: int, width: int) -> np.ndarray:
    """Camera-frame rays of the synthetic fisheye (the same for every frame: inverted once per size)."""
    d = fisheye_camera_dirs(*fisheye_intrinsics(height, width), height, width)
    d.setflags(write=False)
    return d


def scene_name(seed: int, index: int) -> str:
    """ScanNet++-style 10-hex-digit scene id, stable for (seed, index)."""
    return hashlib.sha1(f"snd-synth-{seed}-{index}".encode()).hexdigest()[:10]


def build_scene(seed: int, index: int, *, frames: int, height: int, width: int, objects: int) -> SynthScene:
    """Sample one procedural scene (pure function of its arguments)."""
    if frames < 1 or height < 8 or width < 8 or objects < 0:
        raise SndError(f"synth: need frames >= 1, height/width >= 8, objects >= 0 (got {frames}, {height}x{width}, {objects})")
    rng = np.random.default_rng([seed, index])
    lx, ly, lz = rng.uniform(4.5, 7.0), rng.uniform(4.0, 6.0), rng.uniform(2.6, 3.0)
    hx, hy = lx / 2, ly / 2

    # camera path: an arc of the ellipse at 0.8 of the half extents, looking at the room's centre
    step = np.deg2rad(rng.uniform(3.0, 4.0)) * rng.choice([-1.0, 1.0])
    theta0 = rng.uniform(0, 2 * np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    fx = 0.75 * width
    K = intrinsics(fx, fx, (width - 1) / 2, (height - 1) / 2)
    cams = []
    for i in range(frames):
        th = theta0 + i * step
        eye = np.array([0.8 * hx * np.cos(th), 0.8 * hy * np.sin(th), 1.45 + 0.12 * np.sin(2 * th + phase)])
        target = np.array([0.15 * hx * np.sin(1.3 * th + phase), 0.15 * hy * np.cos(0.9 * th), 0.6])
        cams.append(Camera(K=K, c2w=look_at(eye, target), height=height, width=width))
    eyes = np.array([c.center[:2] for c in cams])

    # objects on the floor, not overlapping each other nor the camera path
    kinds = ["box", "cylinder", "sphere"]
    order = [kinds[i % 3] for i in range(objects)]
    rng.shuffle(order)
    placed: list[tuple[np.ndarray, float]] = []
    obj_parts: list[Part] = []
    for kind in order:
        for _ in range(200):
            if kind == "box":
                size = rng.uniform([0.3, 0.3, 0.3], [0.8, 0.8, 1.0])
                foot = 0.5 * float(np.hypot(size[0], size[1]))
            elif kind == "cylinder":
                r, h = rng.uniform(0.15, 0.35), rng.uniform(0.4, 1.1)
                foot = r
            else:
                r = rng.uniform(0.2, 0.4)
                foot = r
            xy = rng.uniform([-0.5 * hx, -0.5 * hy], [0.5 * hx, 0.5 * hy])
            if np.min(np.linalg.norm(eyes - xy, axis=1)) < foot + 0.4:
                continue
            if any(np.linalg.norm(xy - q) < foot + fq + 0.1 for q, fq in placed):
                continue
            placed.append((xy, foot))
            if kind == "box":
                obj_parts.append(box_part(xy, size, rng.uniform(0, np.pi)))
            elif kind == "cylinder":
                obj_parts.append(cylinder_part(xy, r, h))
            else:
                obj_parts.append(sphere_part([xy[0], xy[1], r], r))
            break
        else:
            log.debug("synth scene %d: could not place a %s; skipped", index, kind)

    parts = _room_parts(lx, ly, lz) + obj_parts
    for p in parts:
        p.texture = _texture_params(rng, p.label)
    names = [f"DSC{i + 1:05d}.JPG" for i in range(frames)]
    light = np.array([rng.uniform(-0.3, 0.3) * hx, rng.uniform(-0.3, 0.3) * hy, lz - 0.3])
    sc = SynthScene(scene_name(seed, index), parts, list(range(1, len(parts) + 1)), cams, names, light)
    return sc.finish()
