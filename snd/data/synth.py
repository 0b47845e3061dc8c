"""Procedural rooms written in the raw ScanNet++ v2 layout (`snd data synth`).

Why: every stage (precompute, distill, eval) must run end to end on a laptop and in CI without the
1.5 TB ScanNet++ download, against ground truth we know exactly. A scene is a box-shaped room (floor,
ceiling, four walls) with a handful of boxes, cylinders and spheres standing on the floor, each one
annotated instance with a semantic class, seen by a camera gliding along an arc of an ellipse around the
room's centre while looking at its contents (neighbouring frames overlap strongly; frames 8-12 apart
still share most of the view, as SnD's context sampler needs).

Images come from the same ray caster the readers use for masks and depth (`snd.data.raycast`), shaded
with a point light and a procedural solid texture per surface (stripes, checkers, dots, sums of
sinusoids) so that DINOv2 has texture to describe. Output per scene, exactly the ScanNet++ v2 files::

    <out>/data/<scene>/dslr/resized_undistorted_images/DSC00001.JPG ...   (pinhole)
    <out>/data/<scene>/dslr/nerfstudio/transforms_undistorted.json        (nerfstudio, OpenGL c2w)
    <out>/data/<scene>/dslr/colmap/images.txt, cameras.txt                (OpenCV w2c, mesh world)
    <out>/data/<scene>/dslr/train_test_lists.json
    <out>/data/<scene>/scans/mesh_aligned_0.05.ply                        (binary, vertex colours)
    <out>/data/<scene>/scans/segments.json, segments_anno.json
    <out>/splits/nvs_sem_train.txt, nvs_sem_val.txt
    <out>/metadata/semantic_classes.txt

With ``fisheye`` (``--fisheye``) the DSLR files are the raw release's instead: ``dslr/resized_images/`` seen
through an OPENCV_FISHEYE camera (`fisheye_intrinsics`; each pixel rendered along its true distorted ray) and
``dslr/nerfstudio/transforms.json`` with k1..k4, so readers decode and undistort every frame.

Poses in transforms_undistorted.json use the toolkit's permuted nerfstudio world (see
`snd.data.formats`), like the real release. Every random choice comes from ``numpy.random.default_rng``
seeded by (seed, scene index), and every file is written by fixed-layout writers, so the same config
gives byte-identical output. Each scene is built in a temporary folder and renamed into place.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from snd.data.camera import Camera, intrinsics, look_at
from snd.data.fisheye import fisheye_camera_dirs
from snd.data.formats import (
    SYNTH_CLASSES,
    atomic_write_text,
    mesh_c2w_to_nerfstudio,
    write_colmap_images,
    write_json,
)
from snd.data.ply import write_ply
from snd.data.synth_geometry import Part, _room_parts, box_part, cylinder_part, sphere_part  # noqa: F401 - re-exported
from snd.data.raycast import MeshRaycaster
from snd.errors import SndError

log = logging.getLogger(__name__)

CLASS_ID = {name: i + 1 for i, name in enumerate(SYNTH_CLASSES)}


# ------------------------------------------------------------------------------------------------
# Appearance
# ------------------------------------------------------------------------------------------------
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _texture_params(rng: np.random.Generator, label: str) -> dict:
    kinds = {"floor": ["planks", "checker"], "ceiling": ["waves"], "wall": ["stripes", "waves", "dots"]}
    kind = str(rng.choice(kinds.get(label, ["checker", "stripes", "dots", "waves"])))
    hue = rng.uniform()
    sat = rng.uniform(0.15, 0.35) if label in ("wall", "ceiling") else rng.uniform(0.4, 0.85)
    val = rng.uniform(0.7, 0.95) if label in ("wall", "ceiling") else rng.uniform(0.55, 0.95)
    c1 = _hsv(hue, sat, val)
    c2 = _hsv((hue + rng.uniform(0.3, 0.7)) % 1.0, rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.7))
    if label == "ceiling":
        c2 = c1 * 0.85
    return {
        "kind": kind,
        "c1": c1,
        "c2": c2,
        "freq": rng.uniform(2.0, 5.0),
        "rot": _random_rotation(rng),
        "waves": rng.normal(size=(4, 3)) * rng.uniform(1.5, 4.0),
        "phase": rng.uniform(0, 2 * np.pi, size=4),
    }


def texture(points: np.ndarray, tex: dict) -> np.ndarray:
    """Unshaded albedo [M, 3] in [0, 1] of a procedural solid texture at world points [M, 3]."""
    p = points @ tex["rot"].T
    f = tex["freq"]
    kind = tex["kind"]
    if kind == "checker":
        g = np.floor(p * f + 0.013).sum(axis=1)
        m = (g % 2).astype(np.float64)
    elif kind == "stripes":
        m = 0.5 + 0.5 * np.tanh(3.0 * np.sin(2 * np.pi * f * p[:, 0]))
    elif kind == "planks":
        m = 0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * f * p[:, 0] + 2.0 * np.sin(3.0 * p[:, 1]))
        m = 0.6 * m + 0.4 * (np.floor(p[:, 1] * f * 0.7) % 2)
    elif kind == "dots":
        q = p * f
        d = np.linalg.norm(q - np.round(q), axis=1)
        m = (d < 0.32).astype(np.float64)
    else:  # waves: a sum of four sinusoids
        m = 0.5 + 0.125 * np.sin(p @ tex["waves"].T + tex["phase"]).sum(axis=1)
    low = 0.9 + 0.1 * np.sin(points @ tex["waves"][0] * 0.3 + tex["phase"][0])
    col = tex["c1"][None] * (1 - m[:, None]) + tex["c2"][None] * m[:, None]
    return np.clip(col * low[:, None], 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# A procedural scene
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def _jpeg_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def write_scene(sc: SynthScene, scene_dir: Path, *, fisheye: bool = False) -> None:
    """Write one scene's ScanNet++ v2 files under `scene_dir` (which must not exist yet).

    `fisheye`: the raw release's DSLR layout instead of the pinhole one: ``dslr/resized_images/`` rendered
    through the OPENCV_FISHEYE camera of `fisheye_intrinsics`, with ``dslr/nerfstudio/transforms.json``
    (camera_model OPENCV_FISHEYE, k1..k4) and an OPENCV_FISHEYE ``colmap/cameras.txt``; the reader then
    decodes and undistorts every frame (to the toolkit's pinhole camera), as it does for a real download.
    """
    dslr = scene_dir / "dslr"
    img_dir = dslr / ("resized_images" if fisheye else "resized_undistorted_images")
    img_dir.mkdir(parents=True)
    (dslr / "nerfstudio").mkdir()
    (dslr / "colmap").mkdir()
    (scene_dir / "scans").mkdir()

    rc = MeshRaycaster(sc.vertices, sc.faces)
    for name, cam in zip(sc.frame_names, sc.cameras):
        rgb = sc.render_fisheye(rc, cam.c2w, cam.height, cam.width) if fisheye else sc.render(rc, cam)
        (img_dir / name).write_bytes(_jpeg_bytes(rgb))

    cam0 = sc.cameras[0]
    K, dist = fisheye_intrinsics(cam0.height, cam0.width) if fisheye else (cam0.K, np.zeros(4))
    n_test = max(0, min(2, len(sc.frame_names) // 8))
    train, test = sc.frame_names[: len(sc.frame_names) - n_test], sc.frame_names[len(sc.frame_names) - n_test :]

    def frame(name: str, cam: Camera) -> dict:
        return {"file_path": name, "transform_matrix": mesh_c2w_to_nerfstudio(cam.c2w).round(10).tolist(), "is_bad": False}

    frames = [frame(n, c) for n, c in zip(sc.frame_names, sc.cameras)]
    transforms = {
        "fl_x": float(K[0, 0]),
        "fl_y": float(K[1, 1]),
        "cx": float(K[0, 2]),
        "cy": float(K[1, 2]),
        "w": cam0.width,
        "h": cam0.height,
        "camera_model": "OPENCV_FISHEYE" if fisheye else "PINHOLE",
        **{f"k{j + 1}": float(dist[j]) for j in range(4)},
        "has_mask": False,
        "frames": frames[: len(train)],
        "test_frames": frames[len(train) :],
        "train_filenames": train,
        "test_filenames": test,
    }
    write_json(dslr / "nerfstudio" / ("transforms.json" if fisheye else "transforms_undistorted.json"), transforms)
    write_json(dslr / "train_test_lists.json", {"train": train, "test": test})
    write_colmap_images(dslr / "colmap" / "images.txt", sc.frame_names, [c.c2w for c in sc.cameras])
    params = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]] + (list(dist) if fisheye else [])
    atomic_write_text(
        dslr / "colmap" / "cameras.txt",
        "# Camera list with one line of data per camera:\n#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n"
        f"1 {'OPENCV_FISHEYE' if fisheye else 'PINHOLE'} {cam0.width} {cam0.height} {' '.join(f'{x:.10f}' for x in params)}\n",
    )

    write_ply(scene_dir / "scans" / "mesh_aligned_0.05.ply", sc.vertices, sc.faces, sc.vertex_colors())
    write_json(scene_dir / "scans" / "segments.json", {"sceneId": sc.name, "segIndices": sc.vertex_segment.tolist()})
    groups = []
    for k, (part, oid) in enumerate(zip(sc.parts, sc.object_ids)):
        v = part.vertices
        groups.append(
            {
                "id": oid,
                "objectId": oid,
                "label": part.label,
                "segments": sc.segments_of_part[k],
                "obb": {"centroid": ((v.min(0) + v.max(0)) / 2).round(6).tolist(), "axesLengths": (v.max(0) - v.min(0)).round(6).tolist(), "normalizedAxes": np.eye(3).ravel().tolist()},
            }
        )
    write_json(scene_dir / "scans" / "segments_anno.json", {"sceneId": sc.name, "segGroups": groups})


def _write_one(data: Path, seed: int, index: int, frames: int, height: int, width: int, objects: int, fisheye: bool) -> str:
    """Build scene `index` in a temporary folder under `data` and rename it into place; its name."""
    sc = build_scene(seed, index, frames=frames, height=height, width=width, objects=objects)
    tmp = Path(tempfile.mkdtemp(dir=data, prefix=f".tmp-{sc.name}-"))
    try:
        os.chmod(tmp, 0o755)
        write_scene(sc, tmp / "scene", fisheye=fisheye)
        final = data / sc.name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp / "scene", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sc.name


def generate_dataset(cfg, progress: bool = False) -> list[str]:
    """Write `cfg.scenes` procedural scenes under `cfg.out` (raw ScanNet++ v2 layout); return their names.

    Args:
        cfg: `snd.pipeline.config.SynthConfig` (out, scenes, frames, height, width, objects, seed, fisheye,
            workers). Scenes are independent pure functions of (seed, index), so `workers` processes give
            the same bytes as one.
        progress: show a progress bar over scenes.
    """
    out = Path(cfg.out)
    if cfg.scenes < 1:
        raise SndError(f"synth: --scenes must be >= 1, got {cfg.scenes}")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    args = [(data, cfg.seed, i, cfg.frames, cfg.height, cfg.width, cfg.objects, bool(getattr(cfg, "fisheye", False)))
            for i in range(cfg.scenes)]
    workers = int(getattr(cfg, "workers", 1)) or min(cfg.scenes, os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.scenes, desc="synth scenes", unit="scene")
    if workers <= 1:
        names = []
        for a in args:
            names.append(_write_one(*a))
            if bar is not None:
                bar.update()
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(workers, cfg.scenes)) as pool:
            futs = {pool.submit(_write_one, *a): a[2] for a in args}
            done = {}
            for f in as_completed(futs):
                done[futs[f]] = f.result()
                if bar is not None:
                    bar.update()
        names = [done[i] for i in range(cfg.scenes)]
    if bar is not None:
        bar.close()
    n_val = 0 if len(names) < 2 else max(1, round(0.25 * len(names)))
    train, val = names[: len(names) - n_val], names[len(names) - n_val :]
    atomic_write_text(out / "splits" / "nvs_sem_train.txt", "".join(f"{n}\n" for n in train))
    atomic_write_text(out / "splits" / "nvs_sem_val.txt", "".join(f"{n}\n" for n in val))
    atomic_write_text(out / "metadata" / "semantic_classes.txt", "".join(f"{c}\n" for c in SYNTH_CLASSES))
    return names
