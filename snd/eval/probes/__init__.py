"""Linear probes on frozen tokens: depth (bins + SigLoss), normals (angular NLL), segmentation (CE).

`PROBES` maps a task to its head class and `default_spec(task, n_train)` gives the paper's recipe.
"""
from __future__ import annotations

from snd.eval.probes.base import Probe, ProbeSpec
from snd.eval.probes.depth import DEPTH_RANGE, DEPTH_SPEC, DepthProbe
from snd.eval.probes.normals import NormalProbe, normals_spec
from snd.eval.probes.seg import SEG_SPEC, SegProbe
from snd.eval.probes.evaluate import evaluate_probe
from snd.eval.probes.checkpoint import load_checkpoint, save_checkpoint
from snd.eval.probes.data import ProbeData
from snd.eval.probes.train import train_probe

__all__ = ["PROBES", "Probe", "ProbeSpec", "DepthProbe", "NormalProbe", "SegProbe", "DEPTH_RANGE", "default_spec",
           "list_probes", "ProbeData", "train_probe", "evaluate_probe", "save_checkpoint", "load_checkpoint"]

PROBES: dict[str, type[Probe]] = {"depth": DepthProbe, "normals": NormalProbe, "seg": SegProbe}


def list_probes() -> list[str]:
    return list(PROBES)


def default_spec(task: str, n_train: int) -> ProbeSpec:
    """The paper's recipe for `task` (normals: 10 epochs of `n_train` images at batch 8)."""
    if task == "depth":
        return DEPTH_SPEC
    if task == "seg":
        return SEG_SPEC
    if task == "normals":
        return normals_spec(n_train)
    raise KeyError(f"unknown probe task {task!r}; expected one of {list_probes()}")
