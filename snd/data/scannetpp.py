"""Reader of the raw ScanNet++ v2 release layout (also what `snd data synth` writes).

Per scene ``<root>/data/<scene>/``:

* images + intrinsics: pinhole ``dslr/resized_undistorted_images/`` (the optional download) or
  ``dslr/undistorted_images/`` (what the toolkit's ``dslr/undistort.py`` writes), each with
  ``dslr/nerfstudio/transforms_undistorted.json`` (preferred, in that order); else fisheye
  ``dslr/resized_images/`` with ``dslr/nerfstudio/transforms.json`` (``OPENCV_FISHEYE``, k1..k4),
  undistorted here to the toolkit's pinhole camera (`snd.data.fisheye.toolkit_new_K`: the same K and
  field of view as the toolkit's ``undistorted_images``, which FiT3D and SnD use).
* poses: ``dslr/colmap/images.txt`` (OpenCV world-to-camera in the mesh's world) when present, else the
  transforms' ``transform_matrix`` (OpenGL, toolkit-permuted world; see `snd.data.formats`).
* frames: ``frames`` + ``test_frames`` whose image file exists, ordered by the number in the file name
  (SnD's rule), so list-index gaps and file-number gaps can be compared by the pair sampler.
* geometry: ``scans/mesh_aligned_0.05.ply`` + ``scans/segments.json`` (``segIndices`` per vertex) +
  ``scans/segments_anno.json`` (``segGroups``: ``objectId`` >= 1, ``label``, ``segments``). Instance id
  of a pixel = ``objectId`` of the first mesh face its ray hits (face label = majority of its vertices),
  0 where unannotated or a miss. Semantic id = 1 + index of the label in the class table (0 = ignore).
* depth, instance and semantic maps are ray-cast at the requested size and cached as npz.
* resizing (``image_resize``): "bilinear" (default) undistorts at the native size, then resizes with PIL
  bilinear (`snd.data.imageio.resize_rgb`); "cv2_cubic" resizes as FiT3D prepares its frames (the official depth
  probe's input): OpenCV INTER_CUBIC (`snd.data.cv2_cubic`) and, for fisheye frames, in FiT3D's order: the fisheye
  image first (``dslr/downscale.py``), then undistortion at the output size (``dslr/undistort.py``) with its
  camera: the fisheye K scaled by the size ratio (fx * s, cx * s: no half-pixel shift, as FiT3D's
  ``compute_resize_intrinsic``) and `toolkit_new_K` of that, which is also the K the maps are ray cast with.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from snd.data.camera import Camera, intrinsics
from snd.data.cv2_cubic import resize_cubic_cv2
from snd.data.fisheye import fisheye_undistort_map, remap_bilinear, toolkit_new_K
from snd.data.formats import nerfstudio_to_mesh_c2w, read_colmap_images, read_json, read_transform_frames
from snd.data.imageio import read_rgb, resize_rgb
from snd.data.ply import read_mesh
from snd.data.raycast import MeshRaycaster, face_labels_from_vertices, lookup
from snd.data.render_cache import MapCache, file_signature
from snd.errors import SndError

log = logging.getLogger(__name__)


def _intrinsics_from(tf: dict, path: Path) -> tuple[np.ndarray, int, int]:
    try:
        K = intrinsics(float(tf["fl_x"]), float(tf.get("fl_y", tf["fl_x"])), float(tf["cx"]), float(tf["cy"]))
        h, w = int(tf["h"]), int(tf["w"])
    except (KeyError, TypeError, ValueError) as e:
        raise SndError(f"transforms file lacks a valid {e} (need fl_x, fl_y, cx, cy, w, h): {path}", path=path) from e
    return K, h, w


IMAGE_RESIZE = ("bilinear", "cv2_cubic")


def fit3d_scaled_K(K: np.ndarray, sy: float, sx: float) -> np.ndarray:
    """FiT3D's ``compute_resize_intrinsic``: fx, cx times sx and fy, cy times sy (no half-pixel shift)."""
    K = np.asarray(K, dtype=np.float64).copy()
    K[0] *= sx
    K[1] *= sy
    return K


class ScanNetppScene:
    """One raw ScanNet++ v2 scene as a `snd.data.scene.Scene`.

    Args:
        scene_dir: ``<root>/data/<scene>``.
        height, width: output size (default: the transforms' ``h`` x ``w``).
        cache: where ray-cast maps are cached (`MapCache(None)` = no caching).
        classes: semantic class table (id = index + 1); None = the sorted labels of this scene.
        image_resize: "bilinear" or "cv2_cubic" (FiT3D's frames; module docstring).
    """

    def __init__(self, scene_dir: str | Path, *, height: int | None = None, width: int | None = None, cache: MapCache | None = None, classes: list[str] | None = None,
                 image_resize: str = "bilinear"):
        if image_resize not in IMAGE_RESIZE:
            raise SndError(f"unknown image_resize {image_resize!r}", hint=f"choose one of {list(IMAGE_RESIZE)}")
        self.image_resize = image_resize
        self.dir = Path(scene_dir)
        self.name = self.dir.name
        dslr = self.dir / "dslr"
        und_tf = dslr / "nerfstudio" / "transforms_undistorted.json"
        und_dirs = [dslr / "resized_undistorted_images", dslr / "undistorted_images"]
        und_img = next((d for d in und_dirs if d.is_dir()), None)
        fish_img, fish_tf = dslr / "resized_images", dslr / "nerfstudio" / "transforms.json"
        if und_tf.is_file() and und_img is not None:
            self.image_dir, tf_path = und_img, und_tf
        elif fish_tf.is_file() and fish_img.is_dir():
            self.image_dir, tf_path = fish_img, fish_tf
        elif und_tf.is_file():
            raise SndError(f"scene {self.name} has {und_tf.name} but no image folder {und_dirs[0].name}/ or {und_dirs[1].name}/",
                           path=dslr, hint="run the ScanNet++ toolkit's dslr/undistort.py (writes dslr/undistorted_images/), "
                                           "or download resized_undistorted_images/")
        elif fish_tf.is_file():
            raise SndError(f"missing image folder {fish_img}", path=fish_img,
                           hint="download dslr/resized_images/ (fisheye; snd undistorts it with the toolkit's camera)")
        else:
            raise SndError(
                f"missing transforms for scene {self.name}: {und_tf}",
                path=und_tf,
                hint="run the ScanNet++ toolkit's dslr/undistort.py (dslr/undistorted_images/ + transforms_undistorted.json), "
                     "or download dslr/nerfstudio/transforms.json with resized_images/",
            )
        self.transforms_path = tf_path
        tf = read_json(tf_path, "transforms file")
        if not isinstance(tf, dict) or not isinstance(tf.get("frames"), list):
            raise SndError(f"malformed transforms file (no 'frames' list): {tf_path}", path=tf_path)
        K, h, w = _intrinsics_from(tf, tf_path)
        model = str(tf.get("camera_model", "PINHOLE")).upper()
        self.fisheye = model == "OPENCV_FISHEYE" and any(abs(float(tf.get(k, 0.0))) > 0 for k in ("k1", "k2", "k3", "k4"))
        if model not in ("PINHOLE", "OPENCV_FISHEYE", "SIMPLE_PINHOLE"):
            raise SndError(f"unsupported camera_model {model!r} in {tf_path} (PINHOLE or OPENCV_FISHEYE)", path=tf_path)
        self._dist = np.array([float(tf.get(k, 0.0)) for k in ("k1", "k2", "k3", "k4")])
        self._map = None
        self.native_camera_K, self.native_hw = K, (h, w)
        if self.fisheye:  # the toolkit's pinhole camera for the undistorted frames (same size)
            K = toolkit_new_K(K, self._dist, h, w)

        frames = list(tf["frames"]) + list(tf.get("test_frames", []) or [])
        self.frame_ids, self.is_bad, mats = read_transform_frames(frames, tf_path, self.image_dir, lambda p: Path(p).name)
        colmap = dslr / "colmap" / "images.txt"
        poses = read_colmap_images(colmap) if colmap.is_file() else {}
        self.pose_source = "colmap" if poses else "transforms"
        self._c2w = [poses[n] if n in poses else nerfstudio_to_mesh_c2w(m) for n, m in zip(self.frame_ids, mats)]

        self.height = int(height) if height is not None else h
        self.width = int(width) if width is not None else w
        self._base = Camera(K=K, c2w=np.eye(4), height=h, width=w)
        self._K = self._base.scaled(self.height, self.width).K
        self._fit3d_fisheye = self.fisheye and image_resize == "cv2_cubic" and (self.height, self.width) != (h, w)
        if self._fit3d_fisheye:  # FiT3D: downscale the fisheye frame, then undistort it at the output size
            self._K_fish_out = fit3d_scaled_K(self.native_camera_K, self.height / h, self.width / w)
            self._K = toolkit_new_K(self._K_fish_out, self._dist, self.height, self.width)
        self.cache = cache if cache is not None else MapCache(None)
        self._classes = classes
        self._geom = None
        self._lock = threading.Lock()  # loader threads share a scene: build the mesh/ray caster once

    # -- Scene protocol ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frame_ids)

    def camera(self, i: int) -> Camera:
        return Camera(K=self._K, c2w=self._c2w[i], height=self.height, width=self.width)

    def image(self, i: int) -> np.ndarray:
        path = self.image_dir / self.frame_ids[i]
        img = read_rgb(path)
        h, w = self.native_hw
        if img.shape[:2] != (h, w):
            raise SndError(f"image is {img.shape[1]}x{img.shape[0]} but {self.transforms_path.name} says {w}x{h}: {path}", path=path)
        if self._fit3d_fisheye:
            img = resize_cubic_cv2(img, self.height, self.width)
            with self._lock:
                if self._map is None:
                    self._map = fisheye_undistort_map(self._K_fish_out, self._dist, self._K, self.height, self.width)
            return remap_bilinear(img, *self._map)
        if self.fisheye:
            with self._lock:
                if self._map is None:
                    self._map = fisheye_undistort_map(self.native_camera_K, self._dist, self._base.K, h, w)
            img = remap_bilinear(img, *self._map)
        if self.image_resize == "cv2_cubic" and img.shape[:2] != (self.height, self.width):
            return resize_cubic_cv2(img, self.height, self.width)
        return resize_rgb(img, self.height, self.width)

    def instance_mask(self, i: int) -> np.ndarray:
        return self._maps(i)["instance"]

    def depth(self, i: int) -> np.ndarray:
        return self._maps(i)["depth"]

    def semantic_mask(self, i: int) -> np.ndarray:
        return self._maps(i)["semantic"]

    # -- geometry ------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """Semantic class names; class id = index + 1 (0 = ignore)."""
        return self._geometry()["classes"]

    def _geometry(self) -> dict:
        if self._geom is not None:
            return self._geom
        with self._lock:
            if self._geom is None:
                self._geom = self._load_geometry()
        return self._geom

    def _load_geometry(self) -> dict:
        scans = self.dir / "scans"
        mesh_p, seg_p, anno_p = scans / "mesh_aligned_0.05.ply", scans / "segments.json", scans / "segments_anno.json"
        vertices, faces, _ = read_mesh(mesh_p)
        seg = read_json(seg_p, "segments file")
        seg_idx = seg.get("segIndices") if isinstance(seg, dict) else None
        if not isinstance(seg_idx, list):
            raise SndError(f"segments file has no 'segIndices' list: {seg_p}", path=seg_p)
        seg_idx = np.asarray(seg_idx, dtype=np.int64)
        if len(seg_idx) != len(vertices):
            raise SndError(f"segments length mismatch: {len(seg_idx)} segIndices for {len(vertices)} mesh vertices in {seg_p}", path=seg_p, hint=f"segments.json must belong to {mesh_p.name}")
        anno = read_json(anno_p, "segment annotation file")
        groups = anno.get("segGroups") if isinstance(anno, dict) else None
        if not isinstance(groups, list):
            raise SndError(f"segment annotation file has no 'segGroups' list: {anno_p}", path=anno_p)
        labels = sorted({str(g.get("label", "")) for g in groups if isinstance(g, dict)})
        classes = list(self._classes) if self._classes is not None else labels
        cls_id = {c: k + 1 for k, c in enumerate(classes)}
        # segment id -> (object id, class id); segment ids are arbitrary ints, so use a dict then an array
        n_seg = int(seg_idx.max()) + 1 if len(seg_idx) else 0
        seg_obj = np.zeros(n_seg, dtype=np.int32)
        seg_cls = np.zeros(n_seg, dtype=np.int32)
        for g in groups:
            try:
                oid = int(g.get("objectId", g.get("id")))
                segs = np.asarray(g["segments"], dtype=np.int64)
            except (KeyError, TypeError, ValueError) as e:
                raise SndError(f"malformed segGroup in {anno_p}: {str(g)[:120]}", path=anno_p) from e
            segs = segs[(segs >= 0) & (segs < n_seg)]
            seg_obj[segs] = oid
            seg_cls[segs] = cls_id.get(str(g.get("label", "")), 0)
        v_obj = np.where(seg_idx >= 0, seg_obj[np.clip(seg_idx, 0, max(n_seg - 1, 0))], 0) if n_seg else np.zeros(len(vertices), np.int32)
        v_cls = np.where(seg_idx >= 0, seg_cls[np.clip(seg_idx, 0, max(n_seg - 1, 0))], 0) if n_seg else np.zeros(len(vertices), np.int32)
        return {
            "raycaster": MeshRaycaster(vertices, faces),
            "face_instance": face_labels_from_vertices(faces, v_obj).astype(np.int32),
            "face_semantic": face_labels_from_vertices(faces, v_cls).astype(np.int32),
            "classes": classes,
        }

    def _maps(self, i: int) -> dict[str, np.ndarray]:
        cam = self.camera(i)
        key = None
        if self.cache.folder is not None:
            scans = self.dir / "scans"
            sig = file_signature(scans / "mesh_aligned_0.05.ply", scans / "segments.json", scans / "segments_anno.json")
            extra = sig + "|" + (",".join(self._classes) if self._classes is not None else "<scene-labels>")
            key = self.cache.key(self.name, self.frame_ids[i], self.height, self.width, K=cam.K, c2w=cam.c2w, extra=extra)
            hit = self.cache.load(key)
            if hit is not None:
                return hit
        g = self._geometry()
        hits = g["raycaster"].cast(cam)
        out = {
            "depth": hits.depth,
            "instance": lookup(hits.face, g["face_instance"]),
            "semantic": lookup(hits.face, g["face_semantic"]),
        }
        self.cache.save(key, out)
        return out
