"""NYU Depth v2 as the official SnD depth probe reads it: BTS's training frames and the 654 official test frames.

The official depth config (`evaluation1/evaluation/configs/vits_nyu_depth_linear_config.py` of
davidshavin4/Splat-and-Distill) reads `data_root = "eval_data/nyuv2/data_depth"` through its `NYUDataset`
(`evaluation1/evaluation/depth/datasets/nyu.py`) with `split="nyu_train.txt"` / `"nyu_test.txt"` and
`depth_scale=1000`: the Monocular-Depth-Estimation-Toolbox layout (zhyever/Monocular-Depth-Estimation-Toolbox
`docs/dataset_prepare.md`, whose `data/nyu/` FiT3D calls `eval_data/nyu/`), built from BTS (cleinc/bts):

    <folder>/nyu_train.txt          24,231 lines "/<scene>_<nnnn>[a-z]/rgb_XXXXX.jpg /<scene>.../sync_depth_XXXXX.png 518.8579"
    <folder>/nyu_test.txt           654 lines "<sceneType>/rgb_XXXXX.jpg <sceneType>/sync_depth_XXXXX.png 518.8579"
    <folder>/<scene>_<nnnn>[a-z]/   BTS's "sync" training frames (284 raw-sequence scenes; every 7th synchronised
                                    frame, raw Kinect depth projected onto the colour camera, not in-painted)
    <folder>/<sceneType>/           the 654 test frames of the labelled set (bathroom/, bedroom/, ...; XXXXX = the
                                    0-based index into the 1,449): rgb = its colour with the 7-pixel border zeroed,
                                    sync_depth = `rawDepths` x 1000 cast to uint16 (raw, 0 = no depth, not in-painted)

colour 480x640 JPEG, depth 480x640 uint16 PNG in millimetres. `<folder>` is `<data_root>/nyuv2/data_depth/` (the
official config's path) or `<data_root>/nyu/` (the Toolbox's / FiT3D's). The two lists are the Toolbox's `splits/`
files, identical to BTS's `train_test_inputs/nyudepthv2_{train,test}_files_with_gt.txt` (accepted under those
names too). Parsing as `NYUDataset.load_annotations`: a line's first two space-separated fields, a leading "/"
removed, lines whose depth is "None" skipped, the focal ignored, items sorted by image path.

Sample: as `snd.eval.datasets.nyuv2` (the labelled set, `snd eval --protocol fast`) gives it: depth in metres
(PNG / 1000), 0 outside (0, 10 m], the Eigen crop (rows 45:471, cols 41:601) on val; `whole_frame=True` (the paper
protocol) trains on the `NYUCrop` region (rows 45:472, cols 43:608) and tests on the whole 480x640 frame.
`snd.eval.protocol` selects this reader for NYU depth under the paper protocol (`nyuv2(depth_set="bts")`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from snd.errors import SndError
from snd.eval.datasets.base import ProbeDataset, RawSample
from snd.eval.datasets.io import read_png_u16, read_rgb
from snd.eval.datasets.nyuv2 import depth_target, nyu_crop
from snd.eval.datasets.transforms import Fit

LISTS = {"train": ("nyu_train.txt", "nyudepthv2_train_files_with_gt.txt"),
         "val": ("nyu_test.txt", "nyudepthv2_test_files_with_gt.txt")}  # the config's name first, then BTS's
DEPTH_SCALE = 1000.0  # uint16 millimetres -> metres (the config's depth_scale)
FOCAL = 518.8579  # the lists' third column (ignored by the reader, written by the stand-in)
SYNC_URL = "https://drive.google.com/file/d/1AysroWpfISmm-yRFGBgFTrLy6FjQwvwP (BTS's sync.zip)"
DOWNLOAD = (
    "training frames: BTS's sync.zip (" + SYNC_URL + ", or `python utils/download_from_gdrive.py "
    "1AysroWpfISmm-yRFGBgFTrLy6FjQwvwP sync.zip` in github.com/cleinc/bts), its sync/<scene>/ folders moved into "
    "the folder; test frames: `python utils/extract_official_train_test_set_from_mat.py nyu_depth_v2_labeled.mat "
    "splits.mat out/` in github.com/cleinc/bts, out/test/<sceneType>/ moved into the folder; lists: nyu_train.txt "
    "and nyu_test.txt from github.com/zhyever/Monocular-Depth-Estimation-Toolbox/tree/main/splits (docs/datasets.md)")


def candidates(path: Path) -> list[Path]:
    """Where the layout may be, given the `nyuv2` folder `path` (the registry's): its `data_depth/` (the official
    config's eval_data/nyuv2/data_depth), the Toolbox's `nyu/` beside it, or `path` itself (a root pointed at it)."""
    path = Path(path)
    return [path / "data_depth", path.parent / "nyu", path]


def find_nyu_depth(path: Path) -> Optional[Path]:
    """The first of `candidates(path)` holding a split list, else None."""
    for cand in candidates(path):
        if any((cand / n).is_file() for names in LISTS.values() for n in names):
            return cand
    return None


def missing_message(path: Path) -> str:
    """What is missing when no folder holds the layout (`_check`'s and the reader's wording)."""
    a, b = candidates(path)[:2]
    return (f"no nyu_train.txt / nyu_test.txt in {a} (the official config's data_depth) or {b} (the Toolbox's): "
            "BTS's sync.zip, the 654 official test frames and the Toolbox's lists (docs/datasets.md)")


def parse_split(list_file: Path) -> list[tuple[str, str]]:
    """(image, depth) paths relative to the folder, as `NYUDataset.load_annotations` reads `list_file`: first two
    space-separated fields, one leading "/" or "\\" removed, depth "None" skipped, focal ignored, sorted by image.
    Blank lines are skipped; a line with fewer than two fields is an SndError naming the file and line."""
    items = []
    with open(list_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.strip().split(" ")
            if len(fields) < 2:
                raise SndError(f"{list_file}:{n}: expected 'rgb_path depth_path focal', got {line.strip()!r}",
                               path=list_file)
            if fields[1] == "None":
                continue
            items.append(tuple(p[1:] if p[:1] in ("/", "\\") else p for p in fields[:2]))
    return sorted(items, key=lambda it: it[0])


def list_file(folder: Path, split: str) -> Path:
    """The split list in `folder` (the config's name, else BTS's), or an SndError naming it and the download."""
    for name in LISTS[split]:
        if (folder / name).is_file():
            return folder / name
    f = folder / LISTS[split][0]
    raise SndError(f"NYU depth (BTS layout) split list missing: {f}", path=f, hint=f"get {DOWNLOAD}")


class NYUDepth(ProbeDataset):
    """NYU depth from the Toolbox / BTS layout (module docstring); one sample per listed (image, depth) pair."""

    name = "nyuv2"  # the same benchmark as the labelled set: records, tables and paper numbers stay "nyuv2"
    tasks = ("depth",)
    frame_tag = "-bts"  # its token stores never mix with the labelled set's of the same size (`snd eval`)

    def __init__(self, folder: Path, split: str, task: str, img_hw: tuple[int, int], *, fit: Fit = "crop",
                 eval_crop: bool = True, whole_frame: bool = False):
        super().__init__(split, task, img_hw, fit=fit, whole_frame=whole_frame)
        self.folder, self.eval_crop = Path(folder), eval_crop
        self.list_file = list_file(self.folder, split)
        self.items = parse_split(self.list_file)
        if not self.items:
            raise SndError(f"{self.list_file} lists no image with depth", path=self.list_file, hint=f"get {DOWNLOAD}")
        missing = [p for it in self.items for p in it if not (self.folder / p).is_file()]
        if missing:
            raise SndError(f"{len(missing)} file(s) listed in {self.list_file} are missing, first "
                           f"{self.folder / missing[0]}", path=self.folder / missing[0], hint=f"get {DOWNLOAD}")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> RawSample:
        rgb, dep = self.items[index]
        d = read_png_u16(self.folder / dep).astype(np.float32) / DEPTH_SCALE
        eigen = self.split == "val" and self.eval_crop
        if eigen and d.shape != (480, 640):
            raise SndError(f"{self.folder / dep}: depth is {d.shape[0]}x{d.shape[1]}; the Eigen crop (rows 45:471, "
                           "cols 41:601) needs the 480x640 maps", path=self.folder / dep)
        raw = RawSample(image=read_rgb(self.folder / rgb), id=rgb.rsplit(".", 1)[0], depth=depth_target(d, eigen=eigen))
        if self.whole_frame and self.split == "train":  # the official training crops from the NYUCrop region
            raw = nyu_crop(raw, self.folder / rgb)
        return raw


def open_nyu_depth(path: Path, split: str, task: str, img_hw: tuple[int, int], **kw) -> NYUDepth:
    """`NYUDepth` from the layout found near the `nyuv2` folder `path`; absent: an SndError naming what to download
    (the paper protocol asks for it; `--protocol fast` reads the labelled set instead)."""
    if task != "depth":
        raise SndError(f"nyuv2: the BTS layout holds depth only, not {task!r}")
    folder = find_nyu_depth(path)
    if folder is None:
        raise SndError(f"the paper protocol reads NYU depth from the official BTS / Toolbox set: {missing_message(path)}",
                       path=candidates(path)[0], hint=f"get {DOWNLOAD}; or use --protocol fast (the labelled set)")
    return NYUDepth(folder, split, task, img_hw, **kw)


def write_nyu_depth_standin(folder: str | Path, n_train: int = 3, n_test: int = 2, *, seed: int = 0) -> Path:
    """A procedural stand-in in exactly the layout above: 480x640 JPEG colour and uint16 millimetre PNG depth of a
    camera facing a tilted plane with a box in front (a band without depth, a patch beyond 10 m), training frames in
    `<scene>_<nnnn>/` listed with a leading "/" in shuffled order (as BTS's list), test frames in `<sceneType>/`
    with BTS's zeroed 7-pixel border, both lists with the focal column."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    H, W = 480, 640
    v, u = np.meshgrid(np.arange(H) - (H - 1) / 2, np.arange(W) - (W - 1) / 2, indexing="ij")
    rays = np.stack([u / FOCAL, v / FOCAL, np.ones_like(u)], -1)

    def frame(rel_rgb: str, rel_depth: str, test: bool) -> None:
        nrm = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), -1.0])
        depth = -rng.uniform(2.0, 6.0) / (rays @ (nrm / np.linalg.norm(nrm)))
        r0, c0 = rng.integers(H // 4, H // 2), rng.integers(W // 4, W // 2)
        depth[r0 : r0 + H // 4, c0 : c0 + W // 4] *= 0.6
        depth[: H // 16] = 0.0  # no Kinect return
        depth[H // 2 : H // 2 + 8, -40:] = 11.0  # beyond the 10 m cap
        shade = np.clip(255 * (1 - depth / 12.0), 0, 255)[..., None]
        colour = np.clip(shade * np.array([0.9, 0.7, 0.5]) + rng.normal(0, 4, (H, W, 3)), 0, 255).astype(np.uint8)
        if test:  # BTS's extraction keeps rows 7:474, cols 7:632 of the labelled image, zeros elsewhere
            keep = np.zeros((H, W), bool)
            keep[7:474, 7:632] = True
            colour[~keep] = 0
        (folder / rel_rgb).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(colour).save(folder / rel_rgb, quality=95)
        Image.fromarray(np.round(depth * DEPTH_SCALE).astype(np.uint16)).save(folder / rel_depth)

    lines = {"train": [], "val": []}
    for i in range(n_train):
        scene = f"{('bedroom', 'kitchen', 'office')[i % 3]}_{i // 3 + 1:04d}"
        rel = (f"{scene}/rgb_{7 * i:05d}.jpg", f"{scene}/sync_depth_{7 * i:05d}.png")
        frame(*rel, test=False)
        lines["train"].append(f"/{rel[0]} /{rel[1]} {FOCAL}")
    for i in range(n_test):
        scene = ("bathroom", "living_room")[i % 2]
        rel = (f"{scene}/rgb_{45 + 100 * i:05d}.jpg", f"{scene}/sync_depth_{45 + 100 * i:05d}.png")
        frame(*rel, test=True)
        lines["val"].append(f"{rel[0]} {rel[1]} {FOCAL}")
    order = rng.permutation(n_train)
    (folder / LISTS["train"][0]).write_text("\n".join(lines["train"][j] for j in order))
    (folder / LISTS["val"][0]).write_text("\n".join(lines["val"]))
    return folder
