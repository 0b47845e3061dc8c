"""Probe training and evaluation loops: deterministic batches, exact resume, safetensors checkpoints.

Resume is exact: the batch order is a pure function of (seed, epoch) (`batch_order`), the learning rate a
pure function of the step (`schedules.lr_factor`), and the checkpoint holds the probe, the AdamW moments and
the step. A checkpoint is one safetensors file (tensors `probe.*`, `optim.<i>.*`; metadata: step, task, probe
config, recipe) replaced atomically, plus a human-readable `state.json` beside it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from snd.eval.augment import augment_batch
from snd.eval.metrics import ConfusionAccumulator, MeanAccumulator, depth_metrics, normal_metrics
from snd.eval.probes.base import Probe, ProbeSpec, to_device
from snd.eval.probes.schedules import lr_factor

log = logging.getLogger(__name__)

__all__ = ["TARGETS", "ProbeData", "batch_order", "train_probe", "evaluate_probe", "save_checkpoint",
           "load_checkpoint"]

TARGETS = {"depth": ("depth",), "normals": ("normals",), "seg": ("seg",)}


class ProbeData(torch.utils.data.Dataset):
    """Items for a probe: cached `tokens` (when a store is given) or the `image`, plus the task's targets.

    Args:
        dataset: items with `image [3,H,W]`, `depth [H,W]`, `normals [3,H,W]`, `seg [H,W]` (what the task needs).
        indices: which items (row i of the store is `dataset[indices[i]]`).
        task: "depth" | "normals" | "seg".
        store: a `FeatureStore` (cached path) or None (live path: images go through the backbone).
        with_image: also return the image when cached (for figures).
        memory_mb: keep decoded items in RAM up to this size per process (the probe reads every item once
            per epoch; small datasets — synth, NYUv2 — then load each file once). 0 disables.
    """

    def __init__(self, dataset, indices: list[int], task: str, store=None, with_image: bool = False,
                 memory_mb: float = 1024.0):
        if task not in TARGETS:
            raise ValueError(f"unknown probe task {task!r}; expected one of {list(TARGETS)}")
        if store is not None and len(store) != len(indices):
            raise ValueError(f"feature store has {len(store)} rows but {len(indices)} indices were given")
        self.dataset, self.indices, self.task, self.store, self.with_image = dataset, list(indices), task, store, with_image
        self.budget = int(memory_mb * 2**20)
        self._mem: dict[int, dict[str, Tensor]] = {}
        self._used = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, j: int) -> dict[str, Tensor]:
        if j in self._mem:
            return self._mem[j]
        item = self.dataset[self.indices[j]]
        keys = list(TARGETS[self.task]) + (["image"] if self.store is None or self.with_image else [])
        out = {k: torch.as_tensor(item[k]) for k in keys}
        size = sum(v.numel() * v.element_size() for v in out.values())
        if self._used + size <= self.budget:
            self._mem[j] = out
            self._used += size
        return out

    def target(self, j: int) -> Tensor:
        """The task's target of row `j` (no tokens; filling the in-RAM cache as training would)."""
        return self._item(j)[TARGETS[self.task][0]]

    def __getitem__(self, j: int) -> dict[str, Tensor]:
        out = dict(self._item(j))
        if self.store is not None:
            out["tokens"] = self.store.tokens(j)
        out["row"] = torch.tensor(j)
        return out


def batch_order(n: int, batch: int, seed: int, start_step: int, total_steps: int) -> Iterator[list[int]]:
    """Batches of row indices for steps [start_step, total_steps): a fresh permutation per epoch."""
    if n <= 0:
        raise ValueError("cannot train a probe on an empty dataset")
    batch = min(batch, n)
    per_epoch = n // batch  # drop_last
    step = start_step
    while step < total_steps:
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        yield perm[k * batch:(k + 1) * batch]
        step += 1


class _Batches(torch.utils.data.Sampler):
    def __init__(self, *args):
        self.args = args

    def __iter__(self):
        return batch_order(*self.args)

    def __len__(self) -> int:
        return max(self.args[4] - self.args[3], 0)


def _tokens(batch: dict, backbone: nn.Module | None) -> Tensor:
    if "tokens" in batch:
        return batch["tokens"]
    if backbone is None:
        raise ValueError("a batch without cached tokens needs the backbone (live path)")
    from snd.eval.features import extract_tokens

    return extract_tokens(backbone, batch["image"])


# ---- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(path: Path, probe: Probe, optimizer: torch.optim.Optimizer, step: int, spec: ProbeSpec,
                    extra: dict | None = None) -> None:
    """Atomically write probe + AdamW state + step to `path` (safetensors) and `state.json` beside it."""
    from safetensors.torch import save_file

    tensors = {f"probe.{k}": v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous().reshape(-1) if k == "step" \
                else v.detach().cpu().contiguous()
    meta = {"step": str(step), "task": probe.task, "config": json.dumps(probe.config()),
            "spec": json.dumps(spec.to_json()), "extra": json.dumps(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    js = path.with_name("state.json")
    js.with_name("state.json.tmp").write_text(json.dumps({"step": step, "iters": spec.iters, "task": probe.task,
                                                          "config": probe.config(), "spec": spec.to_json(),
                                                          **(extra or {})}, indent=1))
    os.replace(js.with_name("state.json.tmp"), js)


def load_checkpoint(path: Path, probe: Probe, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a `save_checkpoint` file into `probe` (+ `optimizer`); returns the metadata (step as int)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("task") != probe.task:
        raise ValueError(f"checkpoint {path} is a {meta.get('task')!r} probe, not {probe.task!r}")
    if json.loads(meta["config"]) != probe.config():
        raise ValueError(f"checkpoint {path} was made for probe config {meta['config']}, not {probe.config()}")
    probe.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("probe.")}, strict=True)
    if optimizer is not None:
        sd = optimizer.state_dict()
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
        sd["state"] = state
        optimizer.load_state_dict(sd)
    meta["step"] = int(meta["step"])
    return meta


# ---- training -------------------------------------------------------------------------------------
def _optimizer(probe: Probe, spec: ProbeSpec) -> torch.optim.AdamW:
    return torch.optim.AdamW(probe.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


def train_probe(
    probe: Probe,
    data: ProbeData,
    spec: ProbeSpec,
    *,
    grid: tuple[int, int],
    norm: dict[str, Tensor],
    ckpt: Path | None = None,
    backbone: nn.Module | None = None,
    augment: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_workers: int = 0,
    ckpt_every: int = 2000,
    stop_after: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Train `probe` for `spec.iters` steps, resuming from `ckpt` when it exists.

    Args:
        probe: the head (moved to `device`).
        data: `ProbeData` of the training split.
        spec: the recipe (iters, batch, AdamW, schedule, clip).
        grid: patch grid (h, w) of the tokens; norm: the backbone's final LayerNorm params.
        ckpt: checkpoint file (safetensors); written every `ckpt_every` steps and at the end.
        backbone: frozen backbone for the live path (data without a store); augment: flip/colour per step.
        stop_after: stop (after checkpointing) once this many steps ran in this call (tests of resume).
        progress: called as progress(step, iters, loss) after each step.

    Returns:
        {"steps", "start_step", "loss" (mean of the last <=50 steps), "seconds"}.
    """
    probe.to(device).train()
    opt = _optimizer(probe, spec)
    start = 0
    if ckpt is not None and Path(ckpt).is_file():
        start = load_checkpoint(Path(ckpt), probe, opt)["step"]
        log.info("resumed %s probe at step %d/%d from %s", probe.task, start, spec.iters, ckpt)
    if start >= spec.iters:
        return {"steps": start, "start_step": start, "loss": math.nan, "seconds": 0.0}
    loader = torch.utils.data.DataLoader(data, batch_sampler=_Batches(len(data), spec.batch, seed, start, spec.iters),
                                         num_workers=num_workers, pin_memory=str(device).startswith("cuda"))
    gen = torch.Generator().manual_seed(seed + 7919 * start)
    if backbone is not None:
        backbone.to(device).eval()
    t0, recent, step = time.perf_counter(), [], start
    for batch in loader:
        if augment and "image" in batch and "tokens" not in batch:
            batch = augment_batch(batch, gen)
        batch = to_device(batch, device)
        f = lr_factor(spec.schedule, step, spec.iters, warmup=spec.warmup, warmup_ratio=spec.warmup_ratio,
                      min_ratio=spec.min_ratio)
        for g in opt.param_groups:
            g["lr"] = spec.lr * f
        with torch.no_grad():
            feats = probe.prepare(_tokens(batch, backbone), grid, norm)
        loss = probe.loss(feats, batch, step=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(probe.parameters(), spec.grad_clip)
        opt.step()
        step += 1
        recent = (recent + [float(loss.detach())])[-50:]
        if progress is not None:
            progress(step, spec.iters, recent[-1])
        last = step >= spec.iters or (stop_after is not None and step - start >= stop_after)
        if ckpt is not None and (step % ckpt_every == 0 or last):
            save_checkpoint(Path(ckpt), probe, opt, step, spec)
        if last:
            break
    return {"steps": step, "start_step": start, "loss": sum(recent) / max(len(recent), 1),
            "seconds": time.perf_counter() - t0}


# ---- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_probe(
    probe: Probe,
    data: ProbeData,
    *,
    grid: tuple[int, int],
    norm: dict[str, Tensor],
    backbone: nn.Module | None = None,
    device: str | torch.device = "cpu",
    batch: int = 8,
    keep: int = 4,
    num_workers: int = 0,
) -> tuple[dict, list[dict]]:
    """Metrics of `probe` on `data` at the label resolution, and the first `keep` predictions (for figures).

    Returns:
        (metrics, samples): depth -> per-image means of `DEPTH_METRICS` (GT in (1e-3, max_depth) of the
        probe); normals -> per-image means of `NORMAL_METRICS`; seg -> aAcc/mIoU/mAcc from the summed
        confusion matrix. samples: dicts with `image`, `pred`, `gt` (CPU tensors).
    """
    probe.to(device).eval()
    if backbone is not None:
        backbone.to(device).eval()
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, num_workers=num_workers)
    task = probe.task
    acc = ConfusionAccumulator(probe.num_classes, probe.ignore_index) if task == "seg" else MeanAccumulator()
    samples: list[dict] = []
    for b in loader:
        b = to_device(b, device)
        gt = b[TARGETS[task][0]]
        pred = probe.predict(probe.prepare(_tokens(b, backbone), grid, norm), tuple(gt.shape[-2:]))
        if task == "depth":
            acc.update(depth_metrics(pred, gt, min_depth=1e-3, max_depth=probe.max_depth))
        elif task == "normals":
            acc.update(normal_metrics(pred, gt))
        else:
            acc.update(pred, gt)
        for i in range(pred.shape[0]):
            if len(samples) < keep:
                samples.append({"image": b["image"][i].cpu() if "image" in b else None, "pred": pred[i].cpu(),
                                "gt": gt[i].cpu()})
    metrics = acc.compute()
    if task == "seg":
        metrics = {k: v for k, v in metrics.items() if k in ("aAcc", "mIoU", "mAcc")}
        metrics["n_images"] = len(data)
    return metrics, samples
