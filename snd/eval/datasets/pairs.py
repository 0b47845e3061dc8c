"""Image pairs with depth, intrinsics and relative pose for the correspondence probe.

One pair sample (all at the dataset's `img_hw` = H x W; snd camera convention: pixel centres at integers,
OpenCV camera axes x right, y down, z forward):

    image0, image1   [3, H, W] float32 in [0, 1]
    depth0, depth1   [H, W]    float32 z-depth metres, 0 = invalid
    K0, K1           [3, 3]    float32 pixel intrinsics for H x W
    T_0to1           [4, 4]    float32, maps camera-0 coordinates to camera-1 coordinates
    meta             dict: dataset, split, index, id

Datasets:
* `scannet1500`: SuperGlue's ScanNet test pairs. `<data_root>/scannet1500/scannet_test_pairs_with_gt.txt`
  (github.com/magicleap/SuperGluePretrainedNetwork assets/): per line `name0 name1 rot0 rot1 K0(9) K1(9)
  T_0to1(16)`, K for the 1296x968 colour frames, T row-major. Frames and depth come from the exported
  test scenes as LoFTR/Probe3D ship them (`scannet_test_1500.tar`): `<root>/[scannet_test_1500/]
  <sceneXXXX_XX>/color/<n>.jpg` (640x480) and `depth/<n>.png` (uint16 mm). Image names like
  `scene0707_00_frame-000015.jpg` (or `scans_test/scene0707_00/.../frame-000015.color.jpg`) give scene
  and frame number. Images and depth are resized (stretched, no crop) to img_hw and K is scaled from
  `native_hw` (968x1296) to img_hw. Non-zero EXIF rotations are rejected (ScanNet has none).
  With `intrinsics="npz"` (the paper protocol, as Probe3D's `ScanNetPairsDataset`) both views take their
  scene's K from `<root>/[scannet_test_1500/]intrinsics.npz` (LoFTR's file, keyed by scene id, K of the
  640x480 frames) instead of the pair list's colour-frame K.
* `synth` (task "correspondence"): frames i and i+gap of each procedural scene of the split, for each gap
  in `gaps`; depth, cameras and poses are exact.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from snd.data.camera import Camera
from snd.errors import SndError
from snd.eval.datasets.base import check_args
from snd.eval.datasets.io import first_existing, read_png_u16, read_rgb
from snd.eval.datasets.registry import register_dataset
from snd.eval.datasets.transforms import resize_depth, resize_image

PAIRS_FILE = "scannet_test_pairs_with_gt.txt"
INTRINSICS_NPZ = "intrinsics.npz"
INTRINSICS_URL = "https://raw.githubusercontent.com/zju3dv/LoFTR/master/assets/scannet_test_1500/intrinsics.npz"
NPZ_HW = (480, 640)  # the frames LoFTR's intrinsics.npz describes
PAIRS_URL = "https://github.com/magicleap/SuperGluePretrainedNetwork/blob/master/assets/scannet_test_pairs_with_gt.txt"
FRAMES_URL = "scannet_test_1500.tar (LoFTR, see github.com/mbanani/probe3d data_processing/README.md)"
SCANNET_COLOR_HW = (968, 1296)
_NAME = re.compile(r"(scene\d{4}_\d{2}).*?frame-(\d+)")


def parse_pair_line(line: str) -> dict[str, Any]:
    """One line of scannet_test_pairs_with_gt.txt -> names, EXIF rotations, K0, K1 [3,3], T_0to1 [4,4]."""
    parts = line.split()
    if len(parts) != 38:
        raise SndError(f"ScanNet pair line has {len(parts)} fields, expected 38 "
                       f"(name0 name1 rot0 rot1 K0[9] K1[9] T_0to1[16]): {line[:80]!r}")
    vals = np.array([float(x) for x in parts[4:]], dtype=np.float64)
    return {"name0": parts[0], "name1": parts[1], "rot0": int(parts[2]), "rot1": int(parts[3]),
            "K0": vals[:9].reshape(3, 3), "K1": vals[9:18].reshape(3, 3), "T_0to1": vals[18:].reshape(4, 4)}


def parse_frame_name(name: str) -> tuple[str, int]:
    """`scene0707_00_frame-000015.jpg` (or a path containing scene id and frame-N) -> (scene, frame number)."""
    m = _NAME.search(name)
    if m is None:
        raise SndError(f"cannot find 'sceneXXXX_XX' and 'frame-N' in pair image name {name!r}")
    return m.group(1), int(m.group(2))


def scale_K(K: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Intrinsics for a stretched image (pixel centres at integers: c' = (c + 0.5) s - 0.5)."""
    return Camera(K=K, c2w=np.eye(4), height=from_hw[0], width=from_hw[1]).scaled(*to_hw).K


def _pair_sample(name: str, split: str, index: int, pid: str, img0, img1, d0, d1, K0, K1, T) -> dict:
    return {
        "image0": img0, "image1": img1, "depth0": d0, "depth1": d1,
        "K0": torch.as_tensor(K0, dtype=torch.float32), "K1": torch.as_tensor(K1, dtype=torch.float32),
        "T_0to1": torch.as_tensor(T, dtype=torch.float32),
        "meta": {"dataset": name, "split": split, "index": int(index), "id": pid},
    }


def _check_scannet1500(path: Path) -> str:
    if not (path / PAIRS_FILE).is_file():
        return f"missing {path / PAIRS_FILE} (download {PAIRS_URL})"
    base = first_existing(path / "scannet_test_1500", path)
    if not any(base.glob("scene*/color")):
        return f"missing {path / 'scannet_test_1500'}/<scene>/color,depth (get {FRAMES_URL})"
    return "ok"


class ScanNet1500Pairs(torch.utils.data.Dataset):
    """SuperGlue's 1,500 ScanNet test pairs with depth (see the module docstring)."""

    name = "scannet1500"

    def __init__(self, path: Path, split: str, img_hw: tuple[int, int], *,
                 native_hw: tuple[int, int] = SCANNET_COLOR_HW, pairs_file: Optional[Path] = None,
                 intrinsics: str = "pairs"):
        check_args(self.name, split, "correspondence", ("correspondence",), img_hw)
        if split != "val":
            raise SndError("scannet1500 is evaluation-only: use split 'val'")
        self.path, self.split = Path(path), split
        self.img_hw = (int(img_hw[0]), int(img_hw[1]))
        self.native_hw = tuple(native_hw)
        f = Path(pairs_file) if pairs_file is not None else self.path / PAIRS_FILE
        if not f.is_file():
            raise SndError(f"ScanNet-1500 pair list missing: {f}", path=f, hint=f"download {PAIRS_URL} into {self.path}")
        self.pairs = [parse_pair_line(ln) for ln in f.read_text().splitlines() if ln.strip()]
        for p in self.pairs:
            if p["rot0"] or p["rot1"]:
                raise SndError(f"{f}: EXIF rotations {p['rot0']},{p['rot1']} are not supported ({p['name0']})")
        self.base = first_existing(self.path / "scannet_test_1500", self.path)
        if intrinsics not in ("pairs", "npz"):
            raise SndError(f"scannet1500: intrinsics must be 'pairs' or 'npz', got {intrinsics!r}")
        self.scene_K: Optional[dict[str, np.ndarray]] = None
        if intrinsics == "npz":
            npz = first_existing(self.base / INTRINSICS_NPZ, self.path / INTRINSICS_NPZ)
            if npz is None:
                raise SndError(f"ScanNet-1500 intrinsics missing: {self.base / INTRINSICS_NPZ}",
                               path=self.base / INTRINSICS_NPZ, hint=f"download {INTRINSICS_URL} into {self.base}")
            with np.load(npz) as z:
                self.scene_K = {k: np.asarray(z[k], dtype=np.float64).reshape(3, 3) for k in z.files}

    def _K(self, name: str, K_pairs: np.ndarray) -> np.ndarray:
        """K of the returned image: the pair list's (native colour size) or the scene's from intrinsics.npz."""
        if self.scene_K is None:
            return scale_K(K_pairs, self.native_hw, self.img_hw)
        scene, _ = parse_frame_name(name)
        if scene not in self.scene_K:
            raise SndError(f"{INTRINSICS_NPZ} has no intrinsics for {scene}", hint=f"download {INTRINSICS_URL}")
        return scale_K(self.scene_K[scene], NPZ_HW, self.img_hw)

    def __len__(self) -> int:
        return len(self.pairs)

    def _frame(self, name: str) -> tuple[np.ndarray, np.ndarray, str]:
        scene, n = parse_frame_name(name)
        sdir = self.base / scene
        color = first_existing(sdir / "color" / f"{n}.jpg", sdir / "color" / f"{n:06d}.jpg", self.base / name)
        depth = first_existing(sdir / "depth" / f"{n}.png", sdir / "depth" / f"{n:06d}.png")
        if color is None or depth is None:
            missing = sdir / ("color" if color is None else "depth") / f"{n}.{'jpg' if color is None else 'png'}"
            raise SndError(f"ScanNet-1500 frame missing: {missing}", path=missing, hint=f"get {FRAMES_URL}")
        return read_rgb(color), read_png_u16(depth).astype(np.float32) / 1000.0, f"{scene}/{n}"

    def __getitem__(self, index: int) -> dict:
        p = self.pairs[index]
        img0, dep0, id0 = self._frame(p["name0"])
        img1, dep1, id1 = self._frame(p["name1"])
        K0, K1 = self._K(p["name0"], p["K0"]), self._K(p["name1"], p["K1"])
        return _pair_sample(
            self.name, self.split, index, f"{id0}-{id1}",
            resize_image(img0, self.img_hw, fit="resize"), resize_image(img1, self.img_hw, fit="resize"),
            resize_depth(dep0, self.img_hw, fit="resize"), resize_depth(dep1, self.img_hw, fit="resize"),
            K0, K1, p["T_0to1"],
        )


class SynthPairs(torch.utils.data.Dataset):
    """Frame pairs (i, i + gap) of the procedural scenes, rendered directly at img_hw."""

    name = "synth"

    def __init__(self, path: Path, split: str, img_hw: tuple[int, int], *, gaps: Sequence[int] = (2, 4, 8),
                 stride: int = 2, cache_dir: Optional[Path] = None):
        check_args(self.name, split, "correspondence", ("correspondence",), img_hw)
        from snd.data import open_dataset
        from snd.eval.datasets.synth import synth_split

        if stride < 1 or not gaps or min(gaps) < 1:
            raise SndError(f"synth pairs: need stride >= 1 and gaps >= 1, got stride={stride}, gaps={gaps}")
        self.path, self.split = Path(path), split
        self.img_hw = (int(img_hw[0]), int(img_hw[1]))
        self._ds = open_dataset(self.path, height=self.img_hw[0], width=self.img_hw[1], cache_dir=cache_dir)
        self._scenes: dict = {}
        self.items: list[tuple[str, int, int]] = []
        for s in synth_split(self.path, split):
            n = len(self._scene(s))
            for g in gaps:
                self.items += [(s, i, i + g) for i in range(0, n - g, stride)]

    def _scene(self, name: str):
        if name not in self._scenes:
            self._scenes[name] = self._ds.scene(name)
        return self._scenes[name]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        s, i, j = self.items[index]
        sc = self._scene(s)
        c0, c1 = sc.camera(i), sc.camera(j)
        assert (c0.height, c0.width) == self.img_hw, f"scene rendered at {(c0.height, c0.width)}, wanted {self.img_hw}"
        T = c1.w2c @ c0.c2w
        d0 = torch.from_numpy(np.asarray(sc.depth(i), dtype=np.float32).copy())
        d1 = torch.from_numpy(np.asarray(sc.depth(j), dtype=np.float32).copy())
        return _pair_sample(
            self.name, self.split, index, f"{s}/{sc.frame_ids[i]}-{sc.frame_ids[j]}",
            resize_image(np.asarray(sc.image(i)), self.img_hw, fit="resize"),
            resize_image(np.asarray(sc.image(j)), self.img_hw, fit="resize"),
            d0, d1, c0.K, c1.K, T,
        )


@register_dataset("scannet1500", folder="scannet1500", tasks=("correspondence",), check=_check_scannet1500,
                  depth_range=(1e-3, 10.0),
                  protocol="SuperGlue's 1,500 ScanNet test pairs; Probe3D protocol (scale 0.25, 1,000 matches)")
def build_scannet1500(path: Path, split: str, task: str, img_hw: tuple[int, int], **kw) -> ScanNet1500Pairs:
    return ScanNet1500Pairs(path, split, img_hw, **kw)
