"""Probe training and evaluation loops: deterministic batches, exact resume, a step fast enough for 10^5 steps.

Resume is exact: the batch order is a pure function of (seed, epoch) (`batch_order`), the learning rate a
pure function of the step (`schedules.lr_factor`), and the checkpoint (`checkpoint.py`) holds the probe, the
AdamW moments and the step.

Speed: the paper's schedules are 307,200 / 320,000 steps of a linear head whose GPU work is ~1 ms. So the
step reads nothing back to the host (masked-sum losses, the loss summed on the device and read every
`log_every` steps, fused capturable AdamW with a device-tensor lr), on CUDA it is captured once and replayed
as a CUDA graph, and a split that fits is held on the device (`rows.DeviceRows`): a batch is then a gather.
Larger splits stream from the token and target caches (`snd.eval.targets`) through DataLoader workers.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from snd.eval.augment import augment_batch
from snd.eval.metrics import ConfusionAccumulator, MeanAccumulator, depth_metrics, normal_metrics
from snd.eval.probes.base import Probe, ProbeSpec, to_device
from snd.eval.probes.checkpoint import load_checkpoint, save_checkpoint
from snd.eval.probes.rows import DeviceRows, Residency, plan_residency
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
        targets: a `snd.eval.targets.TargetStore` of the same rows: targets are read from it (two raw
            chunks per item with the token store) instead of decoding the dataset item every epoch.
    """

    def __init__(self, dataset, indices: list[int], task: str, store=None, with_image: bool = False,
                 memory_mb: float = 1024.0, targets=None):
        if task not in TARGETS:
            raise ValueError(f"unknown probe task {task!r}; expected one of {list(TARGETS)}")
        for what, s in (("feature", store), ("target", targets)):
            if s is not None and len(s) != len(indices):
                raise ValueError(f"{what} store has {len(s)} rows but {len(indices)} indices were given")
        self.dataset, self.indices, self.task, self.store, self.with_image = dataset, list(indices), task, store, with_image
        self.targets = targets
        self.budget = int(memory_mb * 2**20)
        self._mem: dict[int, dict[str, Tensor]] = {}
        self._used = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, j: int) -> dict[str, Tensor]:
        if j in self._mem:
            return self._mem[j]
        need_image = self.store is None or self.with_image
        if self.targets is not None and not need_image:
            return {TARGETS[self.task][0]: self.targets.target(j)}  # already one raw chunk: no RAM copy
        item = self.dataset[self.indices[j]]
        keys = list(TARGETS[self.task]) + (["image"] if need_image else [])
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


def epoch_perm(n: int, seed: int, epoch: int) -> Tensor:
    """The row permutation of one epoch: a pure function of (seed, epoch), so resume is exact."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_order(n: int, batch: int, seed: int, start_step: int, total_steps: int,
                device: torch.device | None = None) -> Iterator:
    """Batches of row indices for steps [start_step, total_steps): a fresh permutation per epoch.

    Lists of ints, or slices of a device tensor when `device` is given (device-resident rows gather with
    them; the order is the same either way)."""
    if n <= 0:
        raise ValueError("cannot train a probe on an empty dataset")
    batch = min(batch, n)
    per_epoch = n // batch  # drop_last
    step, cur = start_step, (-1, None)
    while step < total_steps:
        epoch, k = divmod(step, per_epoch)
        if cur[0] != epoch:
            perm = epoch_perm(n, seed, epoch)
            cur = (epoch, perm.tolist() if device is None else perm.to(device))
        yield cur[1][k * batch:(k + 1) * batch]
        step += 1


def _tokens(batch: dict, backbone: nn.Module | None) -> Tensor:
    if "tokens" in batch:
        return batch["tokens"]
    if backbone is None:
        raise ValueError("a batch without cached tokens needs the backbone (live path)")
    from snd.eval.features import extract_tokens

    return extract_tokens(backbone, batch["image"])


def _float_tokens(batch: dict, backbone: nn.Module | None) -> Tensor:
    return _tokens(batch, backbone).float()


# ---- training -------------------------------------------------------------------------------------
class _Batches(torch.utils.data.Sampler):
    def __init__(self, *args):
        self.args = args

    def __iter__(self):
        return batch_order(*self.args)

    def __len__(self) -> int:
        return max(self.args[4] - self.args[3], 0)


def _optimizer(probe: Probe, spec: ProbeSpec, device: torch.device) -> torch.optim.AdamW:
    """AdamW of the recipe; on CUDA fused and capturable with a device-tensor lr (CUDA-graph safe)."""
    if device.type == "cuda":
        lr = torch.tensor(spec.lr, dtype=torch.float32, device=device)
        return torch.optim.AdamW(probe.parameters(), lr=lr, betas=spec.betas, weight_decay=spec.weight_decay,
                                 fused=True, capturable=True)
    return torch.optim.AdamW(probe.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        if isinstance(g["lr"], Tensor):
            g["lr"].fill_(lr)  # a kernel with a scalar argument: no host sync, read by the replayed graph
        else:
            g["lr"] = lr


class _Step:
    """The probe's optimizer step on one batch (tokens, target), with no host reads: run eagerly, or
    captured once and replayed as a CUDA graph."""

    def __init__(self, probe: Probe, opt, spec: ProbeSpec, grid, norm, device: torch.device):
        # the norm's weights live on the device (a graph cannot copy from pageable host memory); eps stays
        # a host scalar
        norm = {k: (v if k == "eps" else v.to(device)) for k, v in norm.items()}
        self.probe, self.opt, self.spec, self.grid, self.norm = probe, opt, spec, grid, norm
        self.key = TARGETS[probe.task][0]
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.params = [p for p in probe.parameters() if p.requires_grad]

    def __call__(self, tokens: Tensor, target: Tensor, step: int) -> None:
        with torch.no_grad():
            feats = self.probe.prepare(tokens.float(), self.grid, self.norm)
        tgt = target.long() if self.probe.task == "seg" else target.float()
        loss = self.probe.loss(feats, {self.key: tgt}, step=step)
        loss.backward()
        if self.spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.grad_clip, foreach=True)
        self.opt.step()
        self.loss_sum.add_(loss.detach())


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
    residency: Residency = "auto",
    resident_gib: float | None = None,
    graph: str = "auto",
    log_every: int = 50,
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
        progress: called as progress(step, iters, mean loss) every `log_every` steps and at the end.
        residency: keep every row on the device ("device"), read rows per step ("stream"), or decide by
            size ("auto", `snd.eval.probes.rows.plan_residency`).
        graph: "auto" (CUDA graphs on CUDA with cached tokens), "on", "off". The loss is read back only
            every `log_every` steps either way.

    Returns:
        {"steps", "start_step", "loss" (mean of the last logged window), "seconds", "residency", "graph"}.
    """
    device = torch.device(device)
    probe.to(device).train()
    opt = _optimizer(probe, spec, device)
    start = 0
    if ckpt is not None and Path(ckpt).is_file():
        start = load_checkpoint(Path(ckpt), probe, opt)["step"]
        log.info("resumed %s probe at step %d/%d from %s", probe.task, start, spec.iters, ckpt)
    if start >= spec.iters:
        return {"steps": start, "start_step": start, "loss": math.nan, "seconds": 0.0}
    if len(data) == 0:
        raise ValueError("cannot train a probe on an empty dataset")
    live = data.store is None
    if live and backbone is None:
        raise ValueError("a ProbeData without cached tokens needs the backbone (live path)")
    where, why = plan_residency(data, device, residency, resident_gib)
    use_graph = not live and (graph == "on" or (graph == "auto" and device.type == "cuda"))
    if use_graph and device.type != "cuda":
        raise ValueError("graph='on' needs a CUDA device")
    log.info("%s probe: rows %s (%s); %s", probe.task, where, why, "CUDA graph" if use_graph else "eager")
    if live:
        backbone.to(device).eval()  # type: ignore[union-attr]
        gen = torch.Generator().manual_seed(seed + 7919 * start)

    # per step: a device index into the resident rows, or a (tokens, target) batch from the loader
    if where == "device":
        rows = DeviceRows.load(data, device, num_workers=num_workers)
        source = batch_order(len(rows), spec.batch, seed, start, spec.iters, device=device)
    else:
        loader = torch.utils.data.DataLoader(data, batch_sampler=_Batches(len(data), spec.batch, seed, start, spec.iters),
                                             num_workers=num_workers, pin_memory=device.type == "cuda")

        def streamed():
            key = TARGETS[probe.task][0]
            for b in loader:
                if live:
                    if augment:
                        b = augment_batch(b, gen)
                    b = to_device(b, device)
                    yield _tokens(b, backbone), b[key]
                else:
                    yield b["tokens"].to(device, non_blocking=True), b[key].to(device, non_blocking=True)
        source = streamed()

    run = _Step(probe, opt, spec, grid, norm, device)
    eager_until = start if not use_graph else max(start, probe.graph_from()) + 3  # 3 warm-up steps before capture
    g: torch.cuda.CUDAGraph | None = None
    buf: tuple[Tensor, Tensor] | None = None
    side = torch.cuda.Stream(device) if use_graph else None
    t0, step, window, last_loss = time.perf_counter(), start, 0, math.nan

    def flush() -> float:
        nonlocal window
        mean = float(run.loss_sum) / max(window, 1)
        run.loss_sum.zero_()
        window = 0
        return mean

    for item in source:
        tokens, target = rows.gather(item, out=buf if g is not None else None) if where == "device" else item
        _set_lr(opt, spec.lr * lr_factor(spec.schedule, step, spec.iters, warmup=spec.warmup,
                                         warmup_ratio=spec.warmup_ratio, min_ratio=spec.min_ratio))
        if not use_graph or step < eager_until:
            if side is not None and step >= eager_until - 3:  # PyTorch's capture recipe: warm up on a side stream
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    opt.zero_grad(set_to_none=True)
                    run(tokens, target, step)
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                opt.zero_grad(set_to_none=True)
                run(tokens, target, step)
        else:
            if g is None:  # capture once, on static buffers, after the warm-up steps (capture runs nothing)
                buf = (tokens.clone(), target.clone())
                opt.zero_grad(set_to_none=True)
                g = torch.cuda.CUDAGraph()
                # thread_local: the DataLoader's pin-memory thread keeps allocating pinned buffers while
                # this thread captures; in the default (global) mode those calls would abort the capture
                with torch.cuda.graph(g, capture_error_mode="thread_local"):
                    run(buf[0], buf[1], step)
            elif where != "device":  # resident rows were gathered straight into the buffers
                buf[0].copy_(tokens, non_blocking=True)  # type: ignore[index]
                buf[1].copy_(target, non_blocking=True)  # type: ignore[index]
            g.replay()
        step += 1
        window += 1
        last = step >= spec.iters or (stop_after is not None and step - start >= stop_after)
        if step % log_every == 0 or last:
            last_loss = flush()
            if progress is not None:
                progress(step, spec.iters, last_loss)
        if ckpt is not None and (step % ckpt_every == 0 or last):
            save_checkpoint(Path(ckpt), probe, opt, step, spec)
        if last:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"steps": step, "start_step": start, "loss": last_loss, "seconds": time.perf_counter() - t0,
            "residency": where, "graph": g is not None}


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
        pred = probe.predict(probe.prepare(_float_tokens(b, backbone), grid, norm), tuple(gt.shape[-2:]))
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
