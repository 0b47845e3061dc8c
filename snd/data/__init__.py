"""snd.data: scene readers (raw ScanNet++ v2, FiT3D/SnD prepared), procedural scenes, ray casting, pairs.

Entry point: `open_dataset(root, layout="auto", *, height=None, width=None, cache_dir=None)` returns a
`Dataset` whose `scene(name)` serves the `snd.data.scene.Scene` interface. Layouts live in a small
registry (`register_layout`, `list_layouts`), each with a detector used by ``layout="auto"``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NoReturn

from snd.data.camera import Camera
from snd.data.scene import Scene
from snd.errors import SndError

log = logging.getLogger(__name__)

Split = Literal["distill", "train", "val", "all"]
_SPLITS = ("distill", "train", "val", "all")
V1_SPLIT_SIZES = {"train": 230, "val": 50}  # ScanNet++ v1's nvs_sem lists: the paper's 280 distillation scenes


@dataclass(frozen=True)
class _Layout:
    name: str
    detect: Callable[[Path], bool]
    split_dir: str  # folder (under root) holding nvs_sem_train.txt / nvs_sem_val.txt
    scenes_dir: str  # folder (under root) holding one folder per scene
    describe: str


_LAYOUTS: dict[str, _Layout] = {}


def register_layout(layout: _Layout) -> _Layout:
    """Add a folder layout to the registry (name must be new)."""
    if layout.name in _LAYOUTS:
        raise ValueError(f"layout {layout.name!r} is already registered")
    _LAYOUTS[layout.name] = layout
    return layout


def list_layouts() -> list[str]:
    """Names of the known dataset layouts (what ``layout=`` accepts besides "auto")."""
    return sorted(_LAYOUTS)


def _is_raw(root: Path) -> bool:
    data = root / "data"
    if not data.is_dir():
        return False
    if (root / "splits").is_dir():
        return True
    return any((p / "dslr").is_dir() for p in data.iterdir() if p.is_dir())


def _is_prepared(root: Path) -> bool:
    return (root / "scenes").is_dir()


register_layout(_Layout("scannetpp", _is_raw, "splits", "data", "raw ScanNet++ v2 (data/<scene>/dslr, scans; splits/); also `snd data synth` output"))
register_layout(_Layout("prepared", _is_prepared, "metadata", "scenes", "FiT3D/SnD prepared (scenes/<scene>/images, instance_segmentation, transforms_train.json; metadata/)"))


def _no_root(root: Path) -> NoReturn:
    """The error for a dataset root that is no folder: a missing path, or a file given for the folder."""
    what = "is a file, not a folder" if root.exists() else "does not exist"
    raise SndError(f"dataset root {what}: {root}", path=root,
                   hint="pass the dataset's top folder (or make one: snd data synth --out <folder>)")


def detect_layout(root: str | Path) -> str:
    """The layout name of the dataset at `root`, or an `SndError` saying what was looked for."""
    root = Path(root)
    if not root.is_dir():
        _no_root(root)
    found = [name for name, lay in sorted(_LAYOUTS.items()) if lay.detect(root)]
    if not found:
        looked = "; ".join(f"{n}: {lay.describe}" for n, lay in sorted(_LAYOUTS.items()))
        raise SndError(f"unknown dataset layout at {root}", path=root, hint=f"expected one of: {looked}; or generate one with `snd data synth`")
    if len(found) > 1:
        log.info("dataset at %s matches layouts %s; using %s", root, found, found[0])
    return found[0]


class Dataset:
    """A dataset root in one layout: scene lists per split and `Scene` objects at one image size."""

    def __init__(self, root: str | Path, layout: str, *, height: int | None = None, width: int | None = None, cache_dir: str | Path | None = None,
                 image_resize: str = "bilinear"):
        self.root = Path(root)
        self.image_resize = image_resize
        if layout not in _LAYOUTS:
            raise SndError(f"unknown layout {layout!r}", hint=f"choose one of {['auto'] + list_layouts()}")
        if (height is None) != (width is None):
            raise SndError(f"give both height and width or neither (got height={height}, width={width})")
        self.layout = layout
        self.height, self.width = height, width
        self._lay = _LAYOUTS[layout]
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._classes: list[str] | None | bool = False  # False = not looked up yet

    # -- scene lists ---------------------------------------------------------------------------
    def _split_file(self, which: str) -> Path:
        return self.root / self._lay.split_dir / f"nvs_sem_{which}.txt"

    def available_scenes(self) -> list[str]:
        """Every scene folder present on disk (sorted)."""
        d = self.root / self._lay.scenes_dir
        if not d.is_dir():
            raise SndError(f"missing scenes folder: {d}", path=d)
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    def scene_names(self, split: str = "distill") -> list[str]:
        """Scene names of a split, keeping only scenes present on disk (missing ones are logged).

        "train" = nvs_sem_train.txt, "val" = nvs_sem_val.txt, "distill" = both (SnD's 280 scenes; train
        first, duplicates dropped), "all" = every scene folder on disk.
        """
        if split not in _SPLITS:
            raise SndError(f"unknown split {split!r}", hint=f"choose one of {list(_SPLITS)}")
        if split == "all":
            return self.available_scenes()
        from snd.data.formats import read_list

        parts = ["train", "val"] if split == "distill" else [split]
        names: list[str] = []
        for which in parts:
            for n in read_list(self._split_file(which), f"{which} split list"):
                if n not in names:
                    names.append(n)
        present = set(self.available_scenes())
        kept = [n for n in names if n in present]
        if len(kept) < len(names):
            log.warning("%d of %d scenes of split %r are not under %s; using the %d present", len(names) - len(kept), len(names), split, self.root / self._lay.scenes_dir, len(kept))
        return kept

    def split_sizes(self) -> dict[str, int]:
        """Number of names in each split list present (``train``, ``val``), before the on-disk filter."""
        from snd.data.formats import read_list

        return {w: len(read_list(self._split_file(w), f"{w} split list")) for w in ("train", "val")
                if self._split_file(w).is_file()}

    def describe_selection(self, split: str, names: list[str]) -> str:
        """One line saying which scenes a stage selected, and whether the split lists are ScanNet++ v1's.

        Why: "the paper's 280 scenes" (FiT3D's and SnD's training set) are ScanNet++ v1's nvs_sem_train
        (230) + nvs_sem_val (50); the v2 release's lists hold more scenes, so `--split distill` on v2
        trains on a different (larger) set. Longer lists than v1's are reported as v2."""
        line = f"{len(names)} scenes selected from split {split!r} of {self.root} ({self.layout} layout)"
        sizes = self.split_sizes() if split in ("distill", "train", "val") else {}
        if sizes:
            line += "; lists: " + ", ".join(f"nvs_sem_{k}.txt {v}" for k, v in sizes.items())
            if sizes.get("train", 0) > V1_SPLIT_SIZES["train"] or sizes.get("val", 0) > V1_SPLIT_SIZES["val"]:
                line += (" - longer than ScanNet++ v1's 230 + 50: these look like the v2 lists, so this is not the "
                         "paper's 280-scene set (use v1's nvs_sem_train/val.txt for that)")
        return line

    def check_scenes(self, names: list[str]) -> None:
        """Fail at the start, naming every scene that cannot serve training (prepared layout: no
        ``instance_segmentation/`` folder, which FiT3D's preparation does not write; SnD adds it)."""
        if self.layout != "prepared":
            return
        d = self.root / self._lay.scenes_dir
        missing = [n for n in names if not (d / n / "instance_segmentation").is_dir()]
        if missing:
            shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise SndError(
                f"{len(missing)} of {len(names)} prepared scenes have no instance_segmentation/ folder: {shown}",
                path=d / missing[0],
                hint="FiT3D's preparation writes images/ and masks/ (anonymisation) but not the per-image instance "
                     "masks SnD trains with: add scenes/<scene>/instance_segmentation/<frame>.png (e.g. written by "
                     "snd.data.prepared.export_prepared from the raw ScanNet++ scenes), or use the raw layout "
                     "(snd ray-casts the masks from the mesh annotations), or pass --scenes/--split to leave them out")

    # -- scenes --------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is None:
            from snd.data.render_cache import default_cache_dir

            self._cache_dir = default_cache_dir(self.root)
        return self._cache_dir

    def semantic_classes(self) -> list[str] | None:
        """The dataset-wide class table (``metadata/semantic_classes.txt``), or None if absent."""
        if self._classes is False:
            from snd.data.formats import read_list

            p = self.root / "metadata" / "semantic_classes.txt"
            self._classes = read_list(p, "semantic class list") if p.is_file() else None
        return self._classes  # type: ignore[return-value]

    def scene(self, name: str) -> Scene:
        d = self.root / self._lay.scenes_dir / name
        if not d.is_dir():
            raise SndError(f"missing scene folder: {d}", path=d)
        if self.layout == "scannetpp":
            from snd.data.render_cache import MapCache
            from snd.data.scannetpp import ScanNetppScene

            return ScanNetppScene(d, height=self.height, width=self.width, cache=MapCache(self.cache_dir), classes=self.semantic_classes(),
                                  image_resize=self.image_resize)
        from snd.data.prepared import PreparedScene

        return PreparedScene(d, height=self.height, width=self.width, image_resize=self.image_resize)

    def __repr__(self) -> str:
        size = f"{self.height}x{self.width}" if self.height else "native"
        return f"Dataset(root={str(self.root)!r}, layout={self.layout!r}, size={size})"


def open_dataset(root: str | Path, layout: str = "auto", *, height: int | None = None, width: int | None = None, cache_dir: str | Path | None = None,
                 image_resize: str = "bilinear") -> Dataset:
    """Open a dataset root.

    Args:
        root: dataset root (raw ScanNet++ v2 / synth output, or the prepared layout).
        layout: "auto" (detect), or one of `list_layouts()`.
        height, width: size of every image, mask, depth map and camera the scenes return (default native).
        cache_dir: where ray-cast masks/depth are cached (default ``<root>/.snd_cache`` if writable,
            else ``~/.cache/snd``).
        image_resize: "bilinear" (PIL), or "cv2_cubic" (FiT3D's frames, raw layout only; `snd.data.scannetpp`).
    """
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in _LAYOUTS:
        raise SndError(f"unknown layout {layout!r}", hint=f"choose one of {['auto'] + list_layouts()}")
    elif not root.is_dir():
        _no_root(root)
    return Dataset(root, layout, height=height, width=width, cache_dir=cache_dir, image_resize=image_resize)


__all__ = ["Camera", "Dataset", "Scene", "detect_layout", "list_layouts", "open_dataset", "register_layout"]
