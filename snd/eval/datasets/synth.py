"""`synth`: the procedural scenes of `snd data synth` as a probe dataset for every task (the CI dataset).

Read through `snd.data.open_dataset(<data_root>/synth)` (`get_dataset` also accepts the synth output
folder itself as the root). Split: the generator's split files when both lists are non-empty,
else all scenes but the last train and the last scene val. Depth and semantics are exact (ray cast from
the generated mesh); normals come from depth; correspondence pairs are built by `pairs.SynthPairs`.
"""
from __future__ import annotations

from pathlib import Path

from snd.eval.datasets.registry import register_dataset
from snd.eval.datasets.scenes import SceneFrames

def synth_num_classes() -> int:
    """Semantic classes of the generator (`snd.data.formats.SYNTH_CLASSES`; id k+1 in the Scene -> k here)."""
    from snd.data.formats import SYNTH_CLASSES

    return len(SYNTH_CLASSES)


def synth_split(path: Path, split: str) -> list[str]:
    """Scene names of `split` (the split files, or first scenes train / last scene val)."""
    from snd.data import open_dataset

    ds = open_dataset(path)
    train, val = ds.scene_names("train"), ds.scene_names("val")
    if train and val:
        return train if split == "train" else val
    everything = sorted(set(train) | set(val) | set(ds.scene_names("distill")))
    if len(everything) < 2:
        return everything
    return everything[:-1] if split == "train" else everything[-1:]


def _check(path: Path) -> str:
    if (path / "data").is_dir():
        return "ok"
    return f"missing {path / 'data'} (generate it: snd data synth --out {path})"


@register_dataset("synth", folder="synth", tasks=("depth", "normals", "seg", "correspondence"), check=_check,
                  num_classes=None, depth_range=(1e-3, 10.0),
                  protocol="procedural rooms; split files or last scene = val; exact depth/semantics")
def build(path: Path, split: str, task: str, img_hw: tuple[int, int], **kw):
    if task == "correspondence":
        from snd.eval.datasets.pairs import SynthPairs

        return SynthPairs(path, split, img_hw, **kw)
    return SceneFrames("synth", path, synth_split(path, split), split, task, img_hw,
                       num_classes=synth_num_classes(), **kw)
