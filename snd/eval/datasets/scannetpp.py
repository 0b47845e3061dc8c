"""ScanNet++ probe data: DSLR frames with depth and semantics ray cast from the annotated mesh.

Read through `snd.data.open_dataset(<data_root>/scannetpp)` (raw ScanNet++ v2 layout:
`data/<scene>/dslr/...`, `data/<scene>/scans/mesh_aligned_0.05.ply`, `segments.json`,
`segments_anno.json`, `splits/nvs_sem_{train,val}.txt`). split "train" = nvs_sem_train (230 scenes, the
probe's training set), "val" = nvs_sem_val (50 scenes, reported), as in FiT3D / SnD.
Segmentation: the Scene's class ids 1..100 -> 0..99, others -> 255. The ids must come from one
dataset-wide table: `snd.data` reads `<root>/metadata/semantic_classes.txt` (copy the release's
`metadata/semantic_benchmark/top100.txt` there); without it class ids are per scene, so the seg task
refuses to run.
Depth outside the official (0.001, 20 m) range is invalid for the probe and the metrics.

`whole_frame=True` (depth, the paper protocol, both splits): the official depth config feeds FiT3D's whole frames,
584x876 (`img_scale=(584, 876)`; its `pre_eval` resizes the ground truth bilinearly to 584x876): the DSLR frame
downscaled by 2 with cv2 INTER_CUBIC (FiT3D's `dslr/downscale.py`), then undistorted at that size
(`dslr/undistort.py`). snd makes the frame at `FRAME_HW` the same way (`image_resize="cv2_cubic"`: OpenCV's cubic
restated in `snd.data.cv2_cubic`; fisheye downloads in FiT3D's order, pinhole ones cubic from the undistorted
1168x1752 image) and ray casts the depth at that size with FiT3D's camera.
"""
from __future__ import annotations

from pathlib import Path

from snd.errors import SndError
from snd.eval.datasets.registry import OFFICIAL_DEPTH_RANGE, register_dataset
from snd.eval.datasets.scenes import SceneFrames

URL = "https://kaldir.vc.in.tum.de/scannetpp/ (ScanNet++ v2: dslr, scans, splits)"
NUM_CLASSES = 100
FRAME_HW = (584, 876)  # FiT3D's ScanNet++ frames (the 1168x1752 DSLR frame halved): the official depth input


def _check(path: Path) -> str:
    raw = (path / "data").is_dir() and (path / "splits" / "nvs_sem_train.txt").is_file()
    if raw:
        return "ok"
    if (path / "scenes").is_dir() and (path / "metadata" / "nvs_sem_train.txt").is_file():
        return ("ok (prepared FiT3D/SnD layout: depth/semantics need the raw v2 meshes "
                f"data/<scene>/scans/ in {path})")
    return f"missing {path / 'data'} and {path / 'splits' / 'nvs_sem_train.txt'} (download {URL} into {path})"


@register_dataset("scannetpp", folder="scannetpp", tasks=("depth", "normals", "seg"), check=_check,
                  num_classes=NUM_CLASSES, depth_range=OFFICIAL_DEPTH_RANGE["scannetpp"],
                  protocol="nvs_sem_train (probe train) / nvs_sem_val (report); mesh-rendered depth/semantics")
def build(path: Path, split: str, task: str, img_hw: tuple[int, int], **kw) -> SceneFrames:
    from snd.data import open_dataset

    layout = kw.pop("layout", "auto")
    ds = open_dataset(path, layout, cache_dir=kw.get("cache_dir"))
    if task == "seg" and ds.semantic_classes() is None:
        f = Path(path) / "metadata" / "semantic_classes.txt"
        raise SndError(f"ScanNet++ seg needs a dataset-wide class table: missing {f}", path=f,
                       hint="copy the release's metadata/semantic_benchmark/top100.txt to that path")
    names = ds.scene_names(split)
    if kw.get("whole_frame"):
        kw["frame_hw"] = FRAME_HW
        kw["image_resize"] = "cv2_cubic"  # FiT3D's frames: cv2 INTER_CUBIC (module docstring)
    return SceneFrames("scannetpp", path, names, split, task, img_hw, num_classes=NUM_CLASSES, layout=layout, **kw)
