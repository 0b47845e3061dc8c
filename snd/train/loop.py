"""The distillation loop: run directory, resume, data, steps, logging, checkpoints, multi-process.

Exact resume: a checkpoint holds every tensor that changes (student/teacher LoRA + heads, Adam moments),
the scheduler state, the data position (items consumed per rank) and each rank's RNG states; a resumed run rebuilds the
networks (base weights from the run folder), restores all of it, opens the stream at the saved position
and continues with bit-identical losses (tested on CPU).

Multi-process: start with `torchrun --nproc_per_node=N -m -- snd.cli distill ...` (the `--` keeps torchrun
from reading `--run` as its own ambiguous `--run-path`; or call `train` in
processes that set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT): each rank streams a disjoint part of the
items, gradients are averaged by one all-reduce per step, only rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from snd.errors import SndError
from snd.pipeline.config import DistillConfig, load_config, save_config, to_jsonable
from snd.train.checkpoint import (BASE_FILE, CONFIG_FILE, checkpoint_step, latest_checkpoint, load_checkpoint, rng_state, save_base,
                                  CheckpointWriter, set_rng_state)
from snd.train.data import BatchIterator, DevicePrefetcher, StreamFactory, resolve_num_workers, shard_stream_factory, store_operators_fit
from snd.train.distiller import Distiller, TargetFn, build_base_backbone
from snd.train.distributed import DistEnv, all_gather_objects, broadcast_params, dist_env, init_distributed, resolve_device
from snd.train.interrupt import GracefulInterrupt
from snd.train.rundir import RunLogger, announce_targets
from snd.train.step import StepRunner
from snd.train.windows import StepRecord, WindowLog

log = logging.getLogger(__name__)

__all__ = ["TrainSummary", "train", "input_sized", "RESUME_MAY_DIFFER", "resume_point"]

# Options that may change between a run and its resume (they do not change the math; `iters` continues a
# run to a new total with the schedule re-laid, see `_relay_schedule`;
# image_decode moves a JPEG pixel by at most a few levels, like --device; runs from before it lack the key).
RESUME_MAY_DIFFER = {"run", "shards", "data", "weights", "num_workers", "prefetch", "log_every", "ckpt_every",
                     "device", "compile", "verify_store", "iters",
                     "image_decode", "ckpt_background"}


@dataclass
class TrainSummary:
    run: Path
    start_step: int
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # this session's per-step losses (rank-averaged)
    lrs: dict[int, float] = field(default_factory=dict)
    skipped: int = 0
    ema_updates: int = 0
    seconds: float = 0.0
    it_per_s: float = 0.0
    checkpoint: Path | None = None
    seen_indices: list[int] = field(default_factory=list)  # stream items this rank trained on
    rank: int = 0
    world_size: int = 1
    param_digest: float = 0.0  # sum of squares of the trainable parameters at the end (ranks must agree)
    complete: bool = False  # the run had already reached --iters: nothing was trained (`checkpoint` = its last)
    continued_from: int | None = None  # the --iters a resumed run was set for, when this call changed it
    interrupted: bool = False  # stopped by Ctrl-C after saving a checkpoint at `step` (a rerun resumes there)
    num_workers: int = 0  # loader workers used (--num-workers resolved)
    # after this session's first step (worker start-up and the first batch left out): the host's time blocked on
    # the loader, the wall time and the steps. Host-side, so an upper bound of what the loader cost the GPU
    data_wait_s: float = 0.0
    timed_s: float = 0.0
    timed_steps: int = 0


def _check_resume_config(run_dir: Path, cfg: DistillConfig) -> None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return
    old = to_jsonable(load_config(DistillConfig, path))
    if "targets_protocol" not in json.loads(path.read_text()).get("config", {}):
        old["targets_protocol"] = "snd"  # a run started before the field existed trained with the earlier rules
    new = to_jsonable(cfg)
    diff = {k: (old[k], new[k]) for k in new if k not in RESUME_MAY_DIFFER and old.get(k) != new[k]}
    if diff:
        shown = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise SndError(f"run {run_dir} was started with other settings ({shown})", path=path,
                       hint="resume with the run's settings, or pass a new --run folder")


def resume_point(run_dir: Path) -> tuple[Path, int, int | None] | None:
    """(latest checkpoint, its step, the --iters the run was last set for) of an existing run, else None."""
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        return None
    step = checkpoint_step(ckpt)
    cpath = Path(run_dir) / CONFIG_FILE
    iters = int(load_config(DistillConfig, cpath).iters) if cpath.is_file() else None
    return ckpt, step, iters


def _relay_schedule(sched, shape: dict) -> None:
    """A run continued with another --iters: keep the restored step count, take the one-cycle phases of the
    new total (`shape`, from a scheduler built for it) and set the learning rate to its value at this step.
    The steps already taken keep the old schedule's rates, so this is not a fresh run of the new length."""
    sched.__dict__.update(shape)
    sched.last_epoch -= 1
    sched.step()  # recomputes the current step's rate under the new phases (and writes it to the optimizer)


def _default_target_fn() -> TargetFn:
    from snd.splat.target import target_features

    return target_features


def _restore(runner: StepRunner, d: Distiller, tensors: dict, meta: dict, device: torch.device) -> None:
    with torch.no_grad():
        for name, p in list(runner.named.items()) + list(d.teacher_state().items()):
            if name not in tensors:
                raise SndError(f"checkpoint lacks tensor {name}; it belongs to another model/config")
            p.copy_(tensors[name].to(device))
    d.teacher.sync_merged()
    state = {}
    for i, name in enumerate(runner.named):
        state[i] = {k: tensors[f"optim.{name}.{k}"].to(device) for k in ("step", "exp_avg", "exp_avg_sq")
                    if f"optim.{name}.{k}" in tensors}
        state[i] = state[i] or {}
    sd = runner.opt.state_dict()
    sd["state"] = {i: s for i, s in state.items() if s}
    groups = meta["optimizer_groups"]
    if len(groups) != len(sd["param_groups"]) or any(g["params"] != h["params"] for g, h in zip(groups, sd["param_groups"])):
        raise SndError("checkpoint optimizer groups do not match this model's trainable parameters")
    sd["param_groups"] = [{**g, "betas": tuple(g["betas"])} for g in groups]  # lr as the schedule left it
    runner.opt.load_state_dict(sd)
    runner.opt.found_inf = torch.zeros((), dtype=torch.float32, device=device)
    runner.sched.load_state_dict(meta["scheduler"])
    runner.skipped.fill_(float(meta.get("skipped", 0)))
    runner.ema_updates = int(meta.get("ema_updates", 0))


def _checkpoint_tensors(runner: StepRunner, d: Distiller) -> dict:
    out = {n: p.detach() for n, p in runner.named.items()}
    out.update({n: p.detach() for n, p in d.teacher_state().items()})
    for name, p in runner.named.items():
        for k, v in runner.opt.state.get(p, {}).items():
            out[f"optim.{name}.{k}"] = v.detach()
    return out


def input_sized(cfg: DistillConfig) -> DistillConfig:
    """`cfg` with the backbone input size it leaves to the default (None) filled in from the model's patch
    (`snd.models.backbone.with_input_hw`: 574x868 for DINOv2, 576x880 for DINOv3), so the run's config.json
    records the size it trained at."""
    from snd.models.backbone import DISTILL_FRAME_HW, spec_of, with_input_hw

    return with_input_hw(cfg, spec_of(cfg.model).patch, DISTILL_FRAME_HW)


def train(cfg: DistillConfig, *, stream_factory: StreamFactory | None = None, target_fn: TargetFn | None = None,
          stop_after: int | None = None, progress: bool = True, env: DistEnv | None = None) -> TrainSummary:
    """Run (or resume) the distillation described by `cfg` in `cfg.run`.

    Args:
        cfg: the stage config.
        stream_factory: (start, rank, world_size) -> IterableDataset of stream items; default the Zarr
            store `cfg.shards` through `snd.cache.stream.ShardStream`.
        target_fn: default `snd.splat.target.target_features`.
        stop_after: stop (as if killed, no extra checkpoint) after this global step; for tests.
        progress: show a rich progress bar on rank 0.
        env: rank/world size; default from torchrun's environment variables.
    """
    cfg = input_sized(cfg)
    env = env or dist_env()
    point = resume_point(Path(cfg.run))
    if point is not None:
        _check_resume_config(Path(cfg.run), cfg)
        if point[1] >= cfg.iters:  # finished: say so (the caller prints it) without building or reading anything
            return TrainSummary(run=Path(cfg.run), start_step=point[1], step=point[1], checkpoint=point[0], complete=True,
                                rank=env.rank, world_size=env.world_size)
    device = resolve_device(cfg.device, env)
    created_pg = init_distributed(env, device)
    try:
        return _train(cfg, env, device, stream_factory or shard_stream_factory(cfg), target_fn or _default_target_fn(),
                      stop_after, progress)
    finally:
        if created_pg:
            dist.destroy_process_group()


def _train(cfg: DistillConfig, env: DistEnv, device: torch.device, factory: StreamFactory, target_fn: TargetFn,
           stop_after: int | None, progress: bool) -> TrainSummary:
    run_dir = Path(cfg.run)
    if cfg.iters < 1:
        raise SndError(f"--iters must be >= 1, got {cfg.iters}")
    point = resume_point(run_dir)
    ckpt = point[0] if point is not None else None
    continued_from = point[2] if point is not None and point[2] not in (None, cfg.iters) else None
    # networks: the same seed on every rank (identical init, also broadcast below)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    base = build_base_backbone(cfg, run_dir / BASE_FILE if ckpt is not None else None)
    if env.is_main:  # only once the weights loaded: a bad --weights leaves no run folder behind
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
        save_base(run_dir, base.state_dict())
    d = Distiller(cfg, base).to(device).train()
    if env.is_main:  # which modules the run adapts (the registry's LoRA targets for this family)
        from rich.console import Console

        from snd.models.lora import describe_lora

        Console(stderr=True).print(f"[bold]LoRA[/] ({cfg.model}): {describe_lora(d.student)}")
    runner = StepRunner(d, cfg, device=device, target_fn=target_fn, world_size=env.world_size)

    step, position = 0, 0
    if ckpt is not None:
        tensors, meta = load_checkpoint(ckpt)
        shape = {k: runner.sched.__dict__[k] for k in ("total_steps", "_schedule_phases")}  # built for cfg.iters
        _restore(runner, d, tensors, meta, device)
        if continued_from is not None:
            _relay_schedule(runner.sched, shape)
        step, position = int(meta["step"]), int(meta["data_position"])
        log.info("resuming %s from step %d (data position %d)", run_dir, step, position)
    else:
        broadcast_params(list(runner.named.values()) + list(d.teacher_state().values()), env.world_size)
        if env.world_size > 1:
            d.teacher.sync_merged()

    workers = resolve_num_workers(cfg.num_workers, device=device, world_size=env.world_size,
                                  operators=lambda: store_operators_fit(cfg))
    batches = DevicePrefetcher(
        BatchIterator(factory, batch=cfg.batch, start=position, rank=env.rank, world_size=env.world_size,
                      num_workers=workers, prefetch=cfg.prefetch, pin_memory=device.type == "cuda", seed=cfg.seed),
        device)
    start_step, start_position = step, position
    if ckpt is not None:
        rngs = meta["rng"]
        if len(rngs) != env.world_size:
            raise SndError(f"checkpoint {ckpt} was written by {len(rngs)} processes, this run has {env.world_size}",
                           path=ckpt, hint="resume with the same number of processes")
        set_rng_state(rngs[env.rank], device)
    else:
        torch.manual_seed(cfg.seed + 7919 * (env.rank + 1))  # per-rank LoRA dropout stream
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    summary = TrainSummary(run=run_dir, start_step=step, step=step, rank=env.rank, world_size=env.world_size,
                           checkpoint=ckpt, continued_from=continued_from, skipped=int(runner.skipped.item()),
                           num_workers=workers)
    logger = RunLogger(run_dir, total=cfg.iters, start=step, active=env.is_main, progress=progress)
    log_every = max(int(cfg.log_every), 1)
    pending: list[StepRecord] = []  # this window's steps
    windows = WindowLog(logger, env, device, summary, lambda: runner.ema_updates)
    t_start = time.perf_counter()
    t_first: float | None = None  # when this session's first step was queued
    steps_since_log, wait_since_log = 0, 0.0
    stepper, path = None, "?"
    interrupt = GracefulInterrupt(active=env.world_size == 1).install()  # Ctrl-C: save at a step boundary, stop
    writer = CheckpointWriter(background=cfg.ckpt_background)
    try:
        while step < cfg.iters:
            tw = time.perf_counter()
            indices, batch = next(batches)
            waited = time.perf_counter() - tw
            wait_since_log += waited
            if t_first is not None:
                summary.data_wait_s += waited
            summary.seen_indices.extend(indices)
            if stepper is None:
                stepper, fast_why = _choose_stepper(runner, cfg, batch)
                announce_targets(run_dir, cfg, batch, fast=stepper is not runner, fast_why=fast_why, active=env.is_main)
                path = step_path(stepper, batch)
                logger.text("run/step_path", path, step)
            lr = runner.lr
            loss = stepper.step(batch, step + 1)
            step += 1
            steps_since_log += 1
            if t_first is None:
                t_first = time.perf_counter()
            # the running skip count after this step (a device copy, read with its window): which steps skipped
            pending.append(StepRecord(step, loss, lr, runner.skipped.clone(), (indices, batch.get("scene"))))
            last = step == cfg.iters
            # read once per step: a Ctrl-C landing after `ckpt_now` (e.g. while the window below closes) would otherwise stop
            # the run without the checkpoint it promises; it is honoured at the next step boundary instead
            stop = interrupt.requested
            ckpt_now = step % cfg.ckpt_every == 0 or last or stop
            ends = last or ckpt_now or (stop_after is not None and step >= stop_after)
            if step % log_every == 0 or ends:  # the window's read-back is queued; it is written at the next close
                windows.close(pending, wait_ms=wait_since_log / max(steps_since_log, 1) * 1e3, path=path)
                pending, steps_since_log, wait_since_log = [], 0, 0.0
                # rows up to a checkpoint are written with it: a resume starts after it and never logs them again
                windows.write(all_=ends)
            if ckpt_now:
                position = start_position + (step - start_step) * cfg.batch  # items trained on, per rank
                summary.checkpoint = _save(run_dir, runner, d, step, position, env, device, cfg, writer)
            if stop and not last:
                summary.interrupted = True
                break
            if stop_after is not None and step >= stop_after:
                break
    except BaseException:
        with contextlib.suppress(Exception):  # the write in flight completes; the loop's own error is the one raised
            writer.wait()
        if env.world_size == 1:  # windows already closed still reach metrics.jsonl (no collective to hang in)
            with contextlib.suppress(Exception):
                windows.write(all_=True)
        raise
    else:
        writer.wait()  # the last checkpoint is complete (or its write error raised) before the run returns
    finally:
        interrupt.restore()
        logger.close()
    summary.step = step
    summary.seconds = time.perf_counter() - t_start
    if t_first is not None:
        summary.timed_s = time.perf_counter() - t_first
        summary.timed_steps = step - summary.start_step - 1
    summary.it_per_s = (step - summary.start_step) / max(summary.seconds, 1e-9)
    summary.skipped = int(runner.skipped.item())
    summary.ema_updates = runner.ema_updates
    with torch.no_grad():
        summary.param_digest = float(sum(p.double().square().sum() for p in runner.params))
    return summary


def _choose_stepper(runner: StepRunner, cfg: DistillConfig, batch: dict):
    """(The fast path `snd.train.graph.GraphStep` when `--fast` allows it and the batch supports it, else
    the runner; why not fast)."""
    from snd.train.graph import GraphStep, graph_supported

    ok, why = graph_supported(runner, batch)
    if cfg.fast == "on" and not ok:
        raise SndError(f"--fast on: {why}", hint="use --fast auto/off, or a store with matching operators (--targets auto)")
    if ok and (cfg.fast == "on" or (cfg.fast == "auto" and runner.device.type == "cuda")):
        return GraphStep(runner), ""
    if ok:
        why = "--fast off" if cfg.fast == "off" else "CUDA graphs need a GPU (--fast on replays the body eagerly)"
    if cfg.fast == "auto" and runner.device.type == "cuda":
        log.info("fast path off: %s", why)
    return runner, why


def step_path(stepper, batch: dict) -> str:
    """The step path as `snd bench distill` names it: fast (CUDA graphs), operator (stored operators,
    eager) or render (per-step splatting)."""
    from snd.train.graph import GraphStep

    if isinstance(stepper, GraphStep):
        return "fast"
    return "operator" if any(k.startswith("op_") for k in batch) else "render"


def _save(run_dir: Path, runner: StepRunner, d: Distiller, step: int, position: int, env: DistEnv,
          device: torch.device, cfg: DistillConfig, writer: CheckpointWriter) -> Path | None:
    rngs = all_gather_objects(rng_state(device), env.world_size)
    if not env.is_main:
        return None
    meta = {"data_position": position, "rng": rngs, "scheduler": runner.sched.state_dict(),
            "optimizer_groups": runner.opt.state_dict()["param_groups"],
            "skipped": int(runner.skipped.item()), "ema_updates": runner.ema_updates, "world_size": env.world_size,
            "batch": cfg.batch, "torch": torch.__version__}
    return writer.submit(run_dir, step=step, tensors=_checkpoint_tensors(runner, d), meta=meta)
