"""Procedural rooms written in the raw ScanNet++ v2 layout (`snd data synth`).

Why: every stage (precompute, distill, eval) must run end to end on a laptop and in CI without the
1.5 TB ScanNet++ download, against ground truth we know exactly. The scenes themselves (a box room with
boxes, cylinders and spheres, a camera gliding along an arc) are built in memory by `snd.data.synth_scene`;
this module writes them to disk. Output per scene, exactly the ScanNet++ v2 files::

    <out>/data/<scene>/dslr/resized_undistorted_images/DSC00001.JPG ...   (pinhole)
    <out>/data/<scene>/dslr/nerfstudio/transforms_undistorted.json        (nerfstudio, OpenGL c2w)
    <out>/data/<scene>/dslr/colmap/images.txt, cameras.txt                (OpenCV w2c, mesh world)
    <out>/data/<scene>/dslr/train_test_lists.json
    <out>/data/<scene>/scans/mesh_aligned_0.05.ply                        (binary, vertex colours)
    <out>/data/<scene>/scans/segments.json, segments_anno.json
    <out>/splits/nvs_sem_train.txt, nvs_sem_val.txt
    <out>/metadata/semantic_classes.txt

With ``fisheye`` (``--fisheye``) the DSLR files are the raw release's instead: ``dslr/resized_images/`` seen
through an OPENCV_FISHEYE camera (`synth_scene.fisheye_intrinsics`; each pixel rendered along its true
distorted ray) and ``dslr/nerfstudio/transforms.json`` with k1..k4, so readers decode and undistort every
frame.

Poses in transforms_undistorted.json use the toolkit's permuted nerfstudio world (see
`snd.data.formats`), like the real release. A scene is a pure function of (seed, scene index) and every
file is written by fixed-layout writers, so the same config gives byte-identical output. Each scene is
built in a temporary folder and renamed into place.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from snd.data.camera import Camera
from snd.data.formats import (
    SYNTH_CLASSES,
    atomic_write_text,
    mesh_c2w_to_nerfstudio,
    write_colmap_images,
    write_json,
)
from snd.data.ply import write_ply
from snd.data.raycast import MeshRaycaster
from snd.data.synth_scene import SynthScene, build_scene, fisheye_intrinsics
from snd.errors import SndError

__all__ = ["generate_dataset", "write_scene", "CLASS_ID"]

CLASS_ID = {name: i + 1 for i, name in enumerate(SYNTH_CLASSES)}


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
