"""NYUv2 labelled set (1,449 images): depth, Ladický normals and 13-class segmentation, 795/654 split.

Files under `<data_root>/nyuv2/` (the published names; nothing to convert by hand):

    nyu_depth_v2_labeled.mat   http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat
                               (MATLAB v7.3 = HDF5; h5py sees images [1449,3,640,480], depths/labels
                               [1449,640,480]: MATLAB's [480,640,...] arrays with the axes reversed)
    splits.mat                 http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat
                               (trainNdxs 795 / testNdxs 654, 1-based)
    classMapping40.mat         github.com/ankurhanda/nyuv2-meta-data (mapClass: 894 names -> NYU40), seg only
    all_normals.pklz           Ladický et al. normals for the 1,449 images, from FAIR's
                               nyuv2_surfacenormal_metadata.zip (the file Probe3D uses), normals only;
                               or normals.npy [1449, 480, 640, 3] float (written from the .pklz on first use)

Segmentation uses the 13 classes of Couprie et al. (the SnD/FiT3D config: num_classes 13): 894 -> NYU40 via
classMapping40.mat, then NYU40 -> 13 with the fixed table below; label 0 (unlabelled) -> 255.
`seg_classes=40` keeps NYU40 instead. Depth is the in-painted `depths` field (`depth_key="rawDepths"` for the
raw one), values above 10 m set invalid (Probe3D); on the val split, depth outside the Eigen crop
(rows 45:471, cols 41:601 of 480x640) is set invalid so metrics follow the standard protocol.

`probe3d_test=True` (normals, val; the paper protocol, Probe3D's `NYU_test(center_crop=True)`): the image is
the centre square (480x480 of 480x640: columns 80:560) centre-padded to `img_hw` with the ImageNet mean (what
Probe3D's zero padding of the normalised image is; the eval plan passes `snd.eval.protocol.paper_val_hw`, the
square rounded up to the backbone's patch: 490x490 for 14, 480x480 for 16), and the target is the matching
480x480 normals, NaN where the raw depth (`rawDepths`, values above 10 m dropped) is 0, so validity is
"raw depth > 0" and a zero normal at a valid pixel stays zero (scored as 90 degrees by the evaluation).

`whole_frame=True` (depth; `ProbeDataset`): the official depth test feeds the whole 480x640 frame padded to the
patch; its training crops come from the `NYUCrop` region (rows 45:472, cols 43:608, 427x565, the image's white
border cut), so on the train split the image and depth are that region, padded the same way (`nyu_crop`).

`depth_set="bts"` (the paper protocol's depth, both splits, `snd.eval.protocol`): the official config does not read
this .mat but BTS's 24,231 training frames and the 654 test frames in the Toolbox layout
(`snd.eval.datasets.nyu_depth`, found in `nyuv2/data_depth/` or `nyu/`); `build` returns that reader, with the same
depth rules (`depth_target`, `nyu_crop`). The fast protocol keeps the labelled set.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
from pathlib import Path
from typing import Optional

import numpy as np

from snd.errors import SndError
from snd.eval.datasets.base import IGNORE, ProbeDataset, RawSample
from snd.eval.datasets.matfile import load_mat
from snd.eval.datasets.registry import OFFICIAL_DEPTH_RANGE, register_dataset
from snd.eval.datasets.transforms import Fit

MAT = "nyu_depth_v2_labeled.mat"
SPLITS = "splits.mat"
MAPPING = "classMapping40.mat"
NORMALS_PKLZ = "all_normals.pklz"
NORMALS_NPY = "normals.npy"
MAT_URL = "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat"
SPLITS_URL = "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat"
MAPPING_URL = "https://github.com/ankurhanda/nyuv2-meta-data (classMapping40.mat)"
NORMALS_URL = "https://dl.fbaipublicfiles.com/fair_self_supervision_benchmark/nyuv2_surfacenormal_metadata.zip"
EIGEN_CROP = (45, 471, 41, 601)  # rows [45, 471), cols [41, 601) of the 480x640 image
NYU_CROP = (45, 472, 43, 608)  # the official depth training pipeline's `NYUCrop`: rows [45, 472), cols [43, 608)
MAX_DEPTH = OFFICIAL_DEPTH_RANGE["nyuv2"][1]

# NYU40 id (1..40) -> 13-class id (1..13): bed books ceiling chair floor furniture objects picture sofa
# table TV wall window (Couprie et al. 2013; the table of github.com/howard-mahe/nyudv2_class_mapping).
NYU40_TO_13 = np.array(
    [0, 12, 5, 6, 1, 4, 9, 10, 12, 13, 6, 8, 6, 13, 10, 6, 13, 6, 7, 7, 5, 7, 3, 2, 6, 11, 7, 7, 7, 7, 7,
     7, 6, 7, 7, 7, 7, 7, 7, 6, 7],
    dtype=np.int64,
)


def _check(path: Path) -> str:
    from snd.eval.datasets.nyu_depth import find_nyu_depth, missing_message

    bts = find_nyu_depth(path)
    missing = []
    if not (path / MAT).is_file():
        missing.append(f"{path / MAT} (download {MAT_URL})")
    if not (path / SPLITS).is_file():
        missing.append(f"{path / SPLITS} (download {SPLITS_URL})")
    if missing and bts is None:
        return "missing " + "; ".join(missing) + f"; the paper protocol's depth: {missing_message(path)}"
    if missing:  # the BTS layout alone: the paper protocol's depth
        return f"ok (depth of --protocol paper only, from {bts}; fast, normals and seg need " + "; ".join(missing) + ")"
    extra = [] if bts is not None else [f"--protocol paper depth needs the BTS layout: {missing_message(path)}"]
    if _normals_file(path) is None:
        extra.append(f"normals task needs {path / NORMALS_PKLZ} (from {NORMALS_URL})")
    if _mapping_file(path) is None:
        extra.append(f"seg task needs {path / MAPPING} ({MAPPING_URL})")
    return "ok" if not extra else "ok (" + "; ".join(extra) + ")"


def _normals_file(path: Path) -> Optional[Path]:
    for p in (path / NORMALS_NPY, path / NORMALS_PKLZ, path / "surfacenormal_metadata" / NORMALS_PKLZ):
        if p.is_file():
            return p
    return None


def _mapping_file(path: Path) -> Optional[Path]:
    for p in (path / MAPPING, path / "classMapping40.npy"):
        if p.is_file():
            return p
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a .pklz from the web cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object"), ("_codecs", "encode"),  # bytes in protocol-2 pickles
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays are allowed)")


def load_normals_pklz(path: Path) -> np.ndarray:
    """`all_normals.pklz` (gzip pickle {'all_normals': [N, H, W, 3]}) -> float32 array, numpy-only unpickling."""
    try:
        with gzip.open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, OSError, EOFError) as e:
        raise SndError(f"cannot read normals {path}: {e}", path=path) from e
    arr = obj.get("all_normals") if isinstance(obj, dict) else obj
    if not isinstance(arr, np.ndarray) or arr.ndim != 4:
        raise SndError(f"{path}: expected a dict with 'all_normals' [N, H, W, 3]", path=path)
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _open_normals(path: Path) -> np.ndarray:
    """Normals [N, H, W, 3]; the .pklz is converted once to normals.npy beside it (memory-mapped after)."""
    f = _normals_file(path)
    if f is None:
        raise SndError(
            f"NYUv2 normals missing: {path / NORMALS_PKLZ}", path=path / NORMALS_PKLZ,
            hint=f"download {NORMALS_URL} and put all_normals.pklz into {path}",
        )
    if f.suffix == ".npy":
        return np.load(f, mmap_mode="r")
    arr = load_normals_pklz(f)
    try:
        tmp = path / f"normals.tmp{os.getpid()}.npy"
        np.save(tmp, arr)
        os.replace(tmp, path / NORMALS_NPY)
    except OSError:
        pass  # read-only data folder: keep the in-memory copy
    return arr


def _read_splits(path: Path, split: str) -> np.ndarray:
    f = path / SPLITS
    if not f.is_file():
        raise SndError(f"NYUv2 split file missing: {f}", path=f, hint=f"download {SPLITS_URL} into {path}")
    m = load_mat(f, ["trainNdxs", "testNdxs"])
    key = "trainNdxs" if split == "train" else "testNdxs"
    if key not in m:
        raise SndError(f"{f} has no variable {key}", path=f)
    return m[key].reshape(-1).astype(np.int64) - 1  # 1-based -> 0-based


def _read_mapping(path: Path) -> np.ndarray:
    f = _mapping_file(path)
    if f is None:
        raise SndError(
            f"NYUv2 class mapping missing: {path / MAPPING}", path=path / MAPPING,
            hint=f"get classMapping40.mat from {MAPPING_URL} and put it into {path}",
        )
    arr = np.load(f) if f.suffix == ".npy" else load_mat(f, ["mapClass"]).get("mapClass")
    if arr is None:
        raise SndError(f"{f} has no numeric variable mapClass", path=f)
    arr = np.asarray(arr).reshape(-1).astype(np.int64)
    if arr.min() < 0 or arr.max() > 40:
        raise SndError(f"{f}: mapClass values must be NYU40 ids 0..40, got {arr.min()}..{arr.max()}", path=f)
    return np.concatenate([[0], arr])  # index by raw label (0 = unlabelled)


class NYUv2(ProbeDataset):
    name = "nyuv2"
    tasks = ("depth", "normals", "seg")

    def __init__(self, path: Path, split: str, task: str, img_hw: tuple[int, int], *, fit: Fit = "crop",
                 seg_classes: int = 13, depth_key: str = "depths", eval_crop: bool = True,
                 probe3d_test: bool = False, whole_frame: bool = False):
        super().__init__(split, task, img_hw, fit=fit, whole_frame=whole_frame)
        self.probe3d_test = probe3d_test and task == "normals"
        self.zero_normal_is_error = self.probe3d_test  # validity = raw depth > 0 (NaN elsewhere), not the normal
        self.path = Path(path)
        mat = self.path / MAT
        if not mat.is_file():
            raise SndError(f"NYUv2 labelled set missing: {mat}", path=mat, hint=f"download {MAT_URL} into {self.path}")
        if seg_classes not in (13, 40):
            raise SndError(f"nyuv2: seg_classes must be 13 or 40, got {seg_classes}")
        self.indices = _read_splits(self.path, split)
        self.seg_classes, self.depth_key, self.eval_crop = seg_classes, depth_key, eval_crop
        self._lut = None
        if task == "seg":
            raw_to_40 = _read_mapping(self.path)
            self._lut = raw_to_40 if seg_classes == 40 else NYU40_TO_13[raw_to_40]
        self._normals = _open_normals(self.path) if task == "normals" else None
        self._h5 = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.indices)

    def _file(self):
        if self._h5 is None or self._pid != os.getpid():  # one handle per DataLoader worker
            import h5py

            self._h5, self._pid = h5py.File(self.path / MAT, "r"), os.getpid()
        return self._h5

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"] = None
        return state

    def __getitem__(self, index: int) -> dict:
        if not self.probe3d_test:
            return super().__getitem__(index)
        import torch

        from snd.eval.protocol import pad_image

        raw = self.load(index)
        f = self._file()
        d = np.asarray(f["rawDepths"][int(self.indices[index])], dtype=np.float32).T
        H, W = d.shape
        c0 = (W - H) // 2  # the centre square (Probe3D: [..., 80:-80] of 640 columns)
        img = pad_image(raw.image[:, c0 : c0 + H], self.img_hw, "nyuv2 probe3d normals test")
        n = torch.from_numpy(np.ascontiguousarray(raw.normals[:, c0 : c0 + H])).permute(2, 0, 1).float()
        valid = torch.from_numpy((d[:, c0 : c0 + H] > 0) & (d[:, c0 : c0 + H] <= MAX_DEPTH))
        n = torch.where(valid[None], torch.nan_to_num(n), torch.full_like(n, float("nan")))
        return {"image": img, "normals": n.contiguous(),
                "meta": {"dataset": self.name, "split": self.split, "index": int(index), "id": raw.id}}

    def load(self, index: int) -> RawSample:
        i = int(self.indices[index])
        f = self._file()
        n = f["images"].shape[0]
        if not 0 <= i < n:
            raise SndError(f"{self.path / SPLITS}: index {i + 1} outside the {n} images of {MAT}")
        image = np.asarray(f["images"][i]).transpose(2, 1, 0)  # [3, W, H] -> [H, W, 3]
        raw = RawSample(image=np.ascontiguousarray(image, dtype=np.uint8), id=f"{i + 1:04d}")
        if self.task == "depth":
            d = np.asarray(f[self.depth_key][i], dtype=np.float32).T  # [W, H] -> [H, W]
            raw.depth = depth_target(d, eigen=self.split == "val" and self.eval_crop and d.shape == (480, 640))
        elif self.task == "seg":
            lab = np.asarray(f["labels"][i]).T.astype(np.int64)
            if lab.max() >= len(self._lut):
                raise SndError(f"{MAT}: label {lab.max()} outside the {len(self._lut) - 1} classes of the mapping")
            cls = self._lut[lab]
            raw.seg = np.where(cls > 0, cls - 1, IGNORE).astype(np.int64)
        elif self.task == "normals":
            raw.normals = np.asarray(self._normals[i], dtype=np.float32)
        if self.whole_frame and self.split == "train":  # the official training crops from the NYUCrop region
            raw = nyu_crop(raw, self.path / MAT)
        return raw


def depth_target(d: np.ndarray, *, eigen: bool) -> np.ndarray:
    """Depth [H, W] in metres -> the probe's target: 0 outside (0, 10 m] (Probe3D's cap) and, with `eigen` (the
    validation split of a 480x640 map), outside the Eigen crop, so the metrics score what the official
    `eval_mask` scores."""
    d = np.where((d > 0) & (d <= MAX_DEPTH), d, 0.0).astype(np.float32)
    if eigen:
        r0, r1, c0, c1 = EIGEN_CROP
        mask = np.zeros(d.shape, dtype=bool)
        mask[r0:r1, c0:c1] = True
        d = np.where(mask, d, 0.0).astype(np.float32)
    return d


def nyu_crop(raw: RawSample, source: Path) -> RawSample:
    """`raw` cut to the official depth training pipeline's `NYUCrop` region (rows 45:472, cols 43:608 of 480x640:
    the frame's white border removed), image and every target; a frame of another size is an SndError naming
    `source`."""
    if raw.image.shape[:2] != (480, 640):
        raise SndError(f"{source}: image {raw.id} is {raw.image.shape[0]}x{raw.image.shape[1]}; the paper "
                       "protocol's NYUCrop (rows 45:472, cols 43:608) needs the 480x640 frames", path=source)
    r0, r1, c0, c1 = NYU_CROP
    raw.image = np.ascontiguousarray(raw.image[r0:r1, c0:c1])
    for k in ("depth", "normals", "seg"):
        if getattr(raw, k) is not None:
            setattr(raw, k, np.ascontiguousarray(getattr(raw, k)[r0:r1, c0:c1]))
    return raw


@register_dataset(
    "nyuv2", folder="nyuv2", tasks=("depth", "normals", "seg"), check=_check, num_classes=13,
    depth_range=OFFICIAL_DEPTH_RANGE["nyuv2"],
    protocol="795/654 split (splits.mat); Ladický normals; 13 classes; depth <= 10 m, Eigen crop on val; "
             "paper depth: BTS 24,231 / 654 (depth_set='bts')",
)
def build(path: Path, split: str, task: str, img_hw: tuple[int, int], *, depth_set: str = "labelled",
          **kw) -> ProbeDataset:
    """`depth_set="labelled"`: this module's reader; `"bts"` (the paper protocol's depth, `snd.eval.protocol`):
    `snd.eval.datasets.nyu_depth`, the official config's BTS / Toolbox layout."""
    if depth_set == "bts":
        from snd.eval.datasets.nyu_depth import open_nyu_depth

        return open_nyu_depth(path, split, task, img_hw, **kw)
    if depth_set != "labelled":
        raise SndError(f"nyuv2: depth_set must be 'labelled' or 'bts', got {depth_set!r}")
    return NYUv2(path, split, task, img_hw, **kw)
