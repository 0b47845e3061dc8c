"""Run checkpoints (safetensors + JSON, atomic) and loading a trained backbone from a run.

A run directory holds:
    config.json                   resolved DistillConfig (`snd.pipeline.config.save_config`)
    backbone_base.safetensors     the base backbone (timm keys, native position grid), written once
    checkpoints/step_NNNNNNN.safetensors   student LoRA + head, teacher (EMA) LoRA + head, Adam moments
    checkpoints/step_NNNNNNN.json          step, data position, per-rank RNG states, scheduler state
    checkpoints/latest.json                pointer to the newest complete checkpoint (written last)

Why this split: tensors go to safetensors (no pickle), everything else to readable JSON; the pointer is
replaced only after both files are complete, so a run killed mid-save resumes from the previous one.
Only the tensors that change are stored; the base backbone (frozen) is stored once, so a run is
self-contained (`load_backbone_from_run` needs no --weights).
"""
from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from snd.errors import SndError

__all__ = ["BASE_FILE", "CKPT_DIR", "CONFIG_FILE", "KEEP", "checkpoint_step", "latest_checkpoint", "load_backbone_from_run",
           "load_base", "load_checkpoint", "rng_state", "save_base", "save_checkpoint", "set_rng_state", "atomic_write_text",
           "CheckpointWriter", "checkpoint_path"]

CONFIG_FILE = "config.json"
BASE_FILE = "backbone_base.safetensors"
CKPT_DIR = "checkpoints"
LATEST = "latest.json"
KEEP = 2  # checkpoints kept (older ones are deleted after a new one is complete)


# ---- atomic files --------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ---- RNG -----------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict[str, Any]:
    """All RNG states of this process as JSON lists (torch CPU, CUDA of `device`, python, numpy)."""
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state(device).tolist() if device.type == "cuda" else None,
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# ---- save / load ---------------------------------------------------------------------------------------
def save_base(run_dir: Path, base_state: dict[str, Tensor]) -> Path:
    """Write the base backbone once (frozen weights the LoRA adapters sit on)."""
    path = Path(run_dir) / BASE_FILE
    if not path.is_file():
        _atomic_save_tensors(base_state, path, metadata={"format": "timm"})
    return path


def load_base(model: nn.Module, base_file: Path) -> nn.Module:
    """Load a run's `backbone_base.safetensors` into `model`; a damaged file is an SndError that says what the
    file is and how to get it back (not the generic advice for a user's --weights file)."""
    from snd.models.weights import load_backbone_weights

    try:
        load_backbone_weights(model, base_file)
    except SndError as e:
        raise SndError(f"the run's base backbone {base_file} is damaged: {e.message}", path=base_file,
                       hint="restore it (it is the run's copy of its --weights, or of its seeded random init); or "
                            "delete it and resume the run with `snd distill`, the run's settings and the same "
                            "--weights: the resumed run writes it again") from e
    return model


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where step `step`'s checkpoint tensors live (its .json beside them)."""
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}.safetensors"


def save_checkpoint(run_dir: Path, *, step: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write step_N.{safetensors,json} atomically, then point latest.json at them; keep the last KEEP."""
    path = checkpoint_path(run_dir, step)
    ck, stem = path.parent, path.stem
    ck.mkdir(parents=True, exist_ok=True)
    _atomic_save_tensors(tensors, ck / f"{stem}.safetensors")
    atomic_write_text(ck / f"{stem}.json", json.dumps({"step": step, **meta}))
    atomic_write_text(ck / LATEST, json.dumps({"step": step, "stem": stem}))
    old = sorted(p for p in ck.glob("step_*.safetensors") if p.stem != stem)
    for p in old[: max(len(old) - (KEEP - 1), 0)]:
        p.unlink(missing_ok=True)
        p.with_suffix(".json").unlink(missing_ok=True)
    return path


class CheckpointWriter:
    """`save_checkpoint` on a background thread, so the step loop does not wait for the file.

    Why: a checkpoint holds the student's and the teacher's 65,536-prototype heads and Adam's moments (~350 MB
    for a ViT-S run). Writing it took 0.6-1.9 s on the host, and at ~100 steps/s one write every 1,000 steps
    cost ~15 % of the run (`snd distill` at 0.855 of `snd bench distill` on an H100, docs/performance.md).

    `submit` takes a snapshot of every tensor on the calling thread, so later steps cannot change what is
    written; everything else happens on the writer thread. With ``snapshot="device"`` (the default) the
    snapshot is a copy into buffers on the tensors' own device, kept from one checkpoint to the next: on a
    GPU a device-to-device copy queued behind the step (~350 MB at HBM speed, well under a millisecond),
    after which the writer thread copies the snapshot to pinned host buffers on its own CUDA stream and writes
    the file. The old way (``snapshot="host"``) copied to new pageable host memory on the training thread:
    on an H200 run the last half of 2,000 steps took ~0.4 s longer than at its last window's rate, with the
    step-1000 checkpoint the one difference: the gap left between `snd distill` and the bench
    (docs/performance.md, "Runs 5 and 6"). Measured on an H200 since: `submit` takes ~1 ms, and the steps after a
    checkpoint lose ~5 ms, except after a run's first, when the writer thread allocates the pinned buffers
    (~0.23 s once; docs/performance.md, "Run 7"). The device snapshot costs the tensors' size in device memory for
    the run (~350 MB for ViT-S); when that allocation fails the writer falls back to the host copy, once
    announced. safetensors' `save_file` releases the GIL while it writes (measured: a probe thread never
    waited more than ~4 ms during a 350 MB write), so the step loop's Python keeps running.

    One write is in flight at a time (a new submit waits for the previous, which also frees the buffers);
    the files stay atomic, so a kill mid-write resumes from the checkpoint before. A write's error is raised
    by the next `submit` or `wait`. `background=False` writes on the calling thread (`save_checkpoint`)."""

    def __init__(self, background: bool = True, snapshot: Literal["device", "host"] = "device"):
        if snapshot not in ("device", "host"):
            raise ValueError(f"snapshot must be 'device' or 'host', not {snapshot!r}")
        self.background = background
        self.snapshot = snapshot
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._snap: dict[str, Tensor] = {}  # device snapshot buffers, reused while names, shapes and dtypes match
        self._pinned: dict[str, Tensor] = {}  # their host copies (CUDA tensors only), pinned, reused likewise
        self.last: Path | None = None

    def submit(self, run_dir: Path, *, step: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
        """Start writing step `step`'s checkpoint; returns the path it will have once complete."""
        self.wait()
        path = checkpoint_path(run_dir, step)
        if not self.background:
            self.last = save_checkpoint(run_dir, step=step, tensors=tensors, meta=meta)
            return self.last
        snap, ready = self._take_snapshot(tensors)

        def write() -> None:
            try:
                save_checkpoint(run_dir, step=step, tensors=self._to_host(snap, ready), meta=meta)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e

        # not a daemon: an exception on the training thread still lets the write finish before the process ends
        self._thread = threading.Thread(target=write, name=f"snd-ckpt-{step}")
        self._thread.start()
        self.last = path
        return path

    def _take_snapshot(self, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], Any]:
        """(A copy of `tensors` that later steps do not touch, the CUDA event after which it is complete or None)."""
        if self.snapshot == "device":
            try:
                snap = {k: self._buffer(self._snap, k, v, v.device) for k, v in tensors.items()}
            except torch.OutOfMemoryError:
                self._snap.clear()
                self.snapshot = "host"
                import warnings

                warnings.warn("checkpoint: no device memory for the snapshot; copying to the host on the training "
                              "thread from now on (slower steps at each checkpoint)", stacklevel=3)
            else:
                with torch.no_grad():
                    for k, v in tensors.items():
                        snap[k].copy_(v.detach())
                cuda = [v.device for v in snap.values() if v.is_cuda]
                ready = None
                if cuda:
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(cuda[0]))
                return snap, ready
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, None

    def _to_host(self, snap: dict[str, Tensor], ready: Any) -> dict[str, Tensor]:
        """On the writer thread: the snapshot's CUDA tensors copied to pinned host buffers on a side stream
        (after `ready`), so the copy neither waits for nor delays the training stream's work."""
        cuda = {k: v for k, v in snap.items() if v.is_cuda}
        if not cuda:
            return snap
        dev = next(iter(cuda.values())).device
        side = torch.cuda.Stream(dev)
        side.wait_event(ready)
        with torch.cuda.stream(side):
            host = {k: self._buffer(self._pinned, k, v, torch.device("cpu"), pin=True) for k, v in cuda.items()}
            for k, v in cuda.items():
                host[k].copy_(v, non_blocking=True)
        side.synchronize()  # releases the GIL while it waits
        return {**snap, **host}

    @staticmethod
    def _buffer(pool: dict[str, Tensor], key: str, like: Tensor, device: torch.device, pin: bool = False) -> Tensor:
        """`pool[key]` if it still fits `like` (shape, dtype, device), else a new contiguous buffer put there."""
        b = pool.get(key)
        if b is None or b.shape != like.shape or b.dtype != like.dtype or b.device != device:
            b = pool[key] = torch.empty(like.shape, dtype=like.dtype, device=device, pin_memory=pin)
        return b

    def wait(self) -> Path | None:
        """Block until the write in flight is complete (re-raising its error); the newest checkpoint's path."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        return self.last


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint's .safetensors path, or None."""
    ptr = Path(run_dir) / CKPT_DIR / LATEST
    if not ptr.is_file():
        return None
    stem = str(_read_run_json(ptr, None, key="stem"))
    path = ptr.parent / f"{stem}.safetensors"
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise SndError(f"checkpoint {path} named by {ptr} is missing", path=path,
                       hint="delete checkpoints/latest.json to restart the run, or restore the file")
    return path


def checkpoint_step(path: Path) -> int:
    """The step recorded in a checkpoint's JSON (SndError naming the file when it is damaged)."""
    path = Path(path)
    return int(_read_run_json(path.with_suffix(".json"), path, key="step"))


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint written by `save_checkpoint`; a damaged file is an SndError that
    names it and says how to go on (checkpoints are written atomically, so only disk faults or copies
    truncate them)."""
    path = Path(path)
    meta = _read_run_json(path.with_suffix(".json"), path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated/garbled files
        raise SndError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})", path=path,
                       hint=_damaged_hint(path.parent, path)) from e
    return tensors, meta


def _read_run_json(path: Path, ckpt: Path | None, key: str | None = None) -> Any:
    """A checkpoint's JSON (`ckpt`'s) or latest.json (`ckpt` None) with `key` present, else an SndError
    naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
        return obj[key] if key is not None else obj
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SndError(f"checkpoint file {path} is unreadable ({type(e).__name__}: {e})", path=path,
                       hint=_damaged_hint(Path(path).parent, ckpt)) from e


def _damaged_hint(ck: Path, ckpt: Path | None) -> str:
    """How to go on when `ckpt` (None: the latest.json pointer) in checkpoint folder `ck` is damaged: point
    latest.json at the newest complete checkpoint before it, if there is one, else restart."""
    older = [p for p in sorted(ck.glob("step_*.safetensors"))
             if (ckpt is None or p.stem < ckpt.stem) and p.with_suffix(".json").is_file()]
    restart = f"delete {ck} to restart the run from step 0 (or pass a new --run)"
    if not older:
        return f"restore the file, or {restart}"
    prev = older[-1]
    step = prev.stem.split("_")[-1].lstrip("0") or "0"
    drop = f"delete {ckpt.stem}.* and " if ckpt is not None else ""
    return (f"restore the file; or resume from checkpoint {prev.stem}: {drop}write "
            f"{{\"step\": {step}, \"stem\": \"{prev.stem}\"}} to {ck / LATEST}; or {restart}")


# ---- a trained backbone for evaluation / export ----------------------------------------------------
def _run_dir_of(path: Path) -> tuple[Path, Path | None]:
    path = Path(path)
    if path.is_dir():
        return path, None
    if path.suffix == ".safetensors" and path.parent.name == CKPT_DIR:
        return path.parent.parent, path
    raise SndError(f"{path} is neither an snd run directory nor one of its checkpoints", path=path,
                   hint="pass the --run folder of `snd distill` (it holds config.json and checkpoints/)")


def load_backbone_from_run(path: str | Path, *, which: Literal["student", "teacher"] = "student",
                           img_size: tuple[int, int] | None = None) -> nn.Module:
    """The run's trained backbone with LoRA merged: a plain timm ViT (eval mode, no grads).

    Args:
        path: run directory (uses its latest checkpoint) or a `checkpoints/step_N.safetensors` file.
        which: "student" (what SnD releases) or "teacher" (the EMA copy).
        img_size: optional (H, W) to resample the position embedding to; default the native grid.
    """
    from snd.models.backbone import create_backbone, set_input_size
    from snd.models.lora import apply_lora, merged_copy
    from snd.pipeline.config import DistillConfig, load_config
    from snd.train.distiller import lora_spec

    run_dir, ckpt = _run_dir_of(Path(path))
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise SndError(f"{run_dir} has no {CONFIG_FILE}; not an snd run directory", path=run_dir)
    cfg = load_config(DistillConfig, cfg_path)
    ckpt = ckpt or latest_checkpoint(run_dir)
    if ckpt is None:
        raise SndError(f"run {run_dir} has no checkpoint yet", path=run_dir,
                       hint="wait for the first checkpoint (--ckpt-every) or let the run finish")
    base_file = run_dir / BASE_FILE
    if not base_file.is_file():
        raise SndError(f"run {run_dir} lacks {BASE_FILE}", path=base_file)
    model = load_base(create_backbone(cfg.model, init="random"), base_file)
    model = apply_lora(model, lora_spec(cfg))
    tensors, _ = load_checkpoint(ckpt)
    prefix = "student." if which == "student" else "teacher."
    lora = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    own = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    if set(lora) != set(own):
        missing, extra = sorted(set(own) - set(lora)), sorted(set(lora) - set(own))
        raise SndError(f"checkpoint {ckpt} does not match its run's LoRA layout (missing {missing[:3]}, extra {extra[:3]})",
                       path=ckpt)
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(lora[n])
    plain = merged_copy(model).eval()
    if img_size is not None:
        set_input_size(plain, img_size)
    return plain
