"""Reader and writer of the FiT3D / SnD "prepared" ScanNet++ layout (what the official SnD code reads).

Layout::

    <root>/scenes/<scene>/images/<frame>.JPG|jpg         pinhole images
    <root>/scenes/<scene>/instance_segmentation/<frame>.JPG.png   per-image instance ids (16-bit PNG,
                                                          0 = unannotated; SnD names it after the image
                                                          file, ``<stem>.png`` is accepted too)
    <root>/scenes/<scene>/transforms_train.json          nerfstudio: fl_x, fl_y, cx, cy[, w, h],
                                                          frames[file_path, transform_matrix (OpenGL c2w), is_bad]
    <root>/metadata/nvs_sem_train.txt, nvs_sem_val.txt   scene lists

No mesh: `depth` and `semantic_mask` return None. ``file_path`` is relative to ``images/`` (SnD joins
them); a leading ``images/`` is tolerated. Frames without an image file are skipped and the rest are
ordered by the number in their name, as SnD does. Poses are converted with `opengl_to_opencv` only
(no world permutation: without a mesh, the world frame is arbitrary).

`export_prepared` writes this layout from any dataset (raw ScanNet++ v2 / synth), which is how the tests
check the round trip and how a FiT3D user can get instance masks rendered from the meshes.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from snd.data.camera import Camera, intrinsics, opencv_to_opengl, opengl_to_opencv
from snd.data.formats import atomic_write_text, read_json, read_transform_frames, write_json
from snd.data.imageio import read_label_png, read_rgb, resize_labels, resize_rgb, write_label_png
from snd.errors import SndError

log = logging.getLogger(__name__)


class PreparedScene:
    """One prepared-layout scene as a `snd.data.scene.Scene` (no depth, no semantics)."""

    def __init__(self, scene_dir: str | Path, *, height: int | None = None, width: int | None = None,
                 image_resize: str = "bilinear"):
        from snd.data.scannetpp import IMAGE_RESIZE

        if image_resize not in IMAGE_RESIZE:
            raise SndError(f"unknown image_resize {image_resize!r}", hint=f"choose one of {list(IMAGE_RESIZE)}")
        self.image_resize = image_resize  # "cv2_cubic": OpenCV INTER_CUBIC (`snd.data.cv2_cubic`), when a resize is needed
        self.dir = Path(scene_dir)
        self.name = self.dir.name
        tf_path = self.dir / "transforms_train.json"
        tf = read_json(tf_path, "transforms file", hint="the prepared layout needs scenes/<scene>/transforms_train.json")
        if not isinstance(tf, dict) or not isinstance(tf.get("frames"), list):
            raise SndError(f"malformed transforms file (no 'frames' list): {tf_path}", path=tf_path)
        self.transforms_path = tf_path
        self.image_dir = self.dir / "images"
        self.mask_dir = self.dir / "instance_segmentation"
        self.frame_ids, self.is_bad, mats = read_transform_frames(
            tf["frames"], tf_path, self.image_dir, lambda rel: rel[len("images/"):] if rel.startswith("images/") else rel)
        self._c2w = [opengl_to_opencv(m) for m in mats]
        try:
            K = intrinsics(float(tf["fl_x"]), float(tf.get("fl_y", tf["fl_x"])), float(tf["cx"]), float(tf["cy"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SndError(f"transforms file lacks valid intrinsics (fl_x, fl_y, cx, cy): {tf_path}", path=tf_path) from e
        if "h" in tf and "w" in tf:
            h, w = int(tf["h"]), int(tf["w"])
        else:
            h, w = read_rgb(self.image_dir / self.frame_ids[0]).shape[:2]
        self.native_hw = (h, w)
        self._base = Camera(K=K, c2w=np.eye(4), height=h, width=w)
        self.height = int(height) if height is not None else h
        self.width = int(width) if width is not None else w
        self._K = self._base.scaled(self.height, self.width).K

    def __len__(self) -> int:
        return len(self.frame_ids)

    def camera(self, i: int) -> Camera:
        return Camera(K=self._K, c2w=self._c2w[i], height=self.height, width=self.width)

    def image(self, i: int) -> np.ndarray:
        path = self.image_dir / self.frame_ids[i]
        img = read_rgb(path)
        if img.shape[:2] != self.native_hw:
            # intrinsics are for native_hw: an image of another size must be rescaled to it first
            img = resize_rgb(img, *self.native_hw)
        if self.image_resize == "cv2_cubic" and img.shape[:2] != (self.height, self.width):
            from snd.data.cv2_cubic import resize_cubic_cv2

            return resize_cubic_cv2(img, self.height, self.width)
        return resize_rgb(img, self.height, self.width)

    def mask_path(self, i: int) -> Path:
        rel = self.frame_ids[i]
        p = self.mask_dir / f"{rel}.png"
        if p.is_file():
            return p
        alt = self.mask_dir / (str(Path(rel).with_suffix("")) + ".png")
        return alt if alt.is_file() else p

    def instance_mask(self, i: int) -> np.ndarray:
        m = read_label_png(self.mask_path(i))
        return resize_labels(m, self.height, self.width).astype(np.int32)

    def depth(self, i: int) -> None:
        return None

    def semantic_mask(self, i: int) -> None:
        return None


def export_prepared(dataset_root: str | Path, out_root: str | Path, scenes: list[str] | None = None, *, layout: str = "auto", height: int | None = None, width: int | None = None, progress: bool = False) -> list[str]:
    """Write the prepared layout (images, 16-bit instance PNGs, transforms_train.json, metadata lists).

    Args:
        dataset_root: any dataset `snd.data.open_dataset` reads (raw ScanNet++ v2 or synth output).
        out_root: output root (gets ``scenes/`` and ``metadata/``).
        scenes: scene names (default: the "distill" split = nvs_sem_train + nvs_sem_val).
        height, width: output size (default: the source's native size).
    Returns:
        The scene names written. Each scene is written to a temporary folder and renamed into place.
    """
    from snd.data import open_dataset

    ds = open_dataset(dataset_root, layout=layout, height=height, width=width)
    names = list(scenes) if scenes is not None else ds.scene_names("distill")
    out_root = Path(out_root)
    (out_root / "scenes").mkdir(parents=True, exist_ok=True)
    it = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc="export scenes", unit="scene")
    for name in it:
        sc = ds.scene(name)
        tmp = Path(tempfile.mkdtemp(dir=out_root / "scenes", prefix=f".tmp-{name}-"))
        try:
            sd = tmp / name
            (sd / "images").mkdir(parents=True)
            (sd / "instance_segmentation").mkdir()
            frames = []
            for i, fid in enumerate(sc.frame_ids):
                src = Path(getattr(sc, "image_dir", "")) / fid
                native = tuple(getattr(sc, "native_hw", ())) == (sc.height, sc.width)
                if native and not getattr(sc, "fisheye", False) and src.is_file():
                    shutil.copyfile(src, sd / "images" / fid)  # exact bytes: no second JPEG generation loss
                else:
                    Image.fromarray(sc.image(i)).save(sd / "images" / fid, format="JPEG", quality=95)
                write_label_png(sd / "instance_segmentation" / f"{fid}.png", sc.instance_mask(i))
                is_bad = bool(getattr(sc, "is_bad", [False] * len(sc))[i])
                frames.append({"file_path": fid, "transform_matrix": opencv_to_opengl(sc.camera(i).c2w).tolist(), "is_bad": is_bad})
            cam = sc.camera(0)
            write_json(
                sd / "transforms_train.json",
                {"fl_x": cam.K[0, 0], "fl_y": cam.K[1, 1], "cx": cam.K[0, 2], "cy": cam.K[1, 2], "w": cam.width, "h": cam.height, "camera_model": "PINHOLE", "frames": frames},
            )
            final = out_root / "scenes" / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(sd, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    train = [n for n in ds.scene_names("train") if n in names]
    val = [n for n in ds.scene_names("val") if n in names]
    rest = [n for n in names if n not in train and n not in val]
    atomic_write_text(out_root / "metadata" / "nvs_sem_train.txt", "".join(f"{n}\n" for n in train + rest))
    atomic_write_text(out_root / "metadata" / "nvs_sem_val.txt", "".join(f"{n}\n" for n in val))
    return names
