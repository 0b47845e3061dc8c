"""The evaluation suite `snd bench eval` projects: every (task, dataset) at its real size, and how
`snd eval` would plan its probes' training (groups sharing rows, waves that fit the memory budget).

Why its own module: the sizes and the plan are data and pure functions, apart from the measuring
(`snd.bench.eval_measure`) and the projection (`snd.bench.eval`); tests check the plan on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SUITE", "Entry", "PlanGroup", "TARGET_BYTES", "plan_training", "real_iters"]


@dataclass(frozen=True)
class Entry:
    """One (task, dataset) of the suite with its real size (images; correspondence: pairs)."""

    task: str
    dataset: str
    n_train: int
    n_val: int
    source: str


# Real sizes (../shared/reference/snd-facts.md "Probing", the official split files).
SUITE: tuple[Entry, ...] = (
    Entry("depth", "scannetpp", 140_451, 30_638, "230/50 ScanNet++ scenes, all DSLR views"),
    Entry("depth", "nyuv2", 795, 654, "NYUv2 labelled, standard split"),
    Entry("depth", "scannet", 20_000, 5_000, "scannet_frames_25k, random 80/20"),
    Entry("depth", "kitti", 23_158, 652, "KITTI Eigen split"),
    Entry("normals", "nyuv2", 795, 654, "NYUv2 labelled"),
    Entry("seg", "scannetpp", 140_451, 30_638, "ScanNet++ (features shared with depth)"),
    Entry("seg", "ade20k", 20_210, 2_000, "ADE20k official"),
    Entry("seg", "voc", 1_464, 1_449, "Pascal VOC 2012 official"),
    Entry("correspondence", "scannet1500", 0, 1_500, "ScanNet-1500 pairs (SuperGlue list)"),
)
TARGET_BYTES = {"depth": 2, "seg": 1, "normals": 6}  # per pixel, as `snd.eval.targets.STORED` caches them


@dataclass
class PlanGroup:
    """Probes of the suite over one dataset's rows at one batch size (what `train_probes` shares)."""

    dataset: str
    tasks: list[str]
    batch: int
    n_train: int
    row_bytes: int
    where: str = "device"

    @property
    def runs(self) -> list[str]:
        """One entry per probe (what `_waves` counts)."""
        return self.tasks

    @property
    def need(self) -> int:
        return self.n_train * self.row_bytes


def plan_training(hw: tuple[int, int], tokens_per_row: int, dim: int, budget: int) -> list[list[PlanGroup]]:
    """The suite's probes as `snd eval` trains them: groups (one per dataset and batch size), each resident
    when its rows fit the budget, packed into waves by `snd.eval.probes.train._waves`."""
    from snd.eval.probes import default_spec
    from snd.eval.probes.train import _waves

    groups: dict[tuple[str, int], PlanGroup] = {}
    for e in SUITE:
        if e.task == "correspondence":
            continue
        batch = default_spec(e.task, e.n_train).batch
        g = groups.setdefault((e.dataset, batch), PlanGroup(e.dataset, [], batch, e.n_train, tokens_per_row * dim * 2))
        g.tasks.append(e.task)
        g.row_bytes += TARGET_BYTES[e.task] * hw[0] * hw[1]
    for g in groups.values():
        g.where = "device" if g.need <= budget else "stream"
    return _waves(list(groups.values()), budget, None)  # type: ignore[arg-type]


def real_iters(task: str, n_train: int, batch: int) -> int:
    """The paper's step count for `task` on `n_train` images (normals: 10 epochs at `batch`)."""
    from snd.eval.probes import default_spec

    return default_spec(task, n_train).iters if task != "normals" else 10 * -(-n_train // batch)
