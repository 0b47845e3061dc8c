"""The render's adjoint for a field with one channel set per pixel, by snd's own CUDA kernel.

Why: the instance part of a transfer operator is the render's adjoint applied to the kept labels' mean
selectors, a field Y [N, H, W, K] whose every pixel has at most one non-zero channel (its label's slot).
gsplat's backward kernel computes that adjoint, but it works on all K channels of every (pixel, Gaussian)
pair: on an H200 it took 28.7 of a 12-target chunk's 68 ms (`docs/bench/profile_operator_synthetic_h200.jsonl`).
`csrc/slot_adjoint.cu` walks each pixel front to back as gsplat's forward kernel does and adds its weight to
its one slot only (its header says how). gsplat has no such kernel, so this is the one piece of CUDA snd
writes; it is plain CUDA with a C entry point, built with nvcc in seconds into snd's build cache
(``<cache>/kernels``, `snd.pipeline.buildcache.cache_root`) and called through ctypes on torch's stream.

Opt-in (``SND_SLOT_ADJOINT=on``): on an H200 it gives the adjoint of the by-hand list (GPU test), but it has
not been timed against gsplat's backward kernel yet (`scripts/gpu_next.sh` step ``slot``), so gsplat's stays the
default. `slot_adjoint` raises `KernelUnavailable` when it cannot build (no nvcc, a failed build); the caller
(`snd.splat.contrib`) then falls back to gsplat's backward kernel and says so once.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["KernelUnavailable", "USE", "enabled", "slot_adjoint", "library_path", "status"]

SOURCE = Path(__file__).with_name("csrc") / "slot_adjoint.cu"
log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_LIBS: dict[tuple[int, int], ctypes.CDLL] = {}


# "on"/"off" when set by code (tests, the profile script's A/B, a failed build); None: SND_SLOT_ADJOINT decides
USE: dict[str, str | None] = {"use": None}


def enabled() -> bool:
    """Whether the operator builder uses this kernel: the setting in `USE`, else ``SND_SLOT_ADJOINT=on`` (read each
    time, so `snd doctor` and the builder never disagree)."""
    return (USE["use"] or os.environ.get("SND_SLOT_ADJOINT", "off")) == "on"


class KernelUnavailable(RuntimeError):
    """snd's CUDA kernel could not be built or loaded here (the message says why)."""


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME  # where torch's own extension builds look

    for cand in ([str(Path(CUDA_HOME) / "bin" / "nvcc")] if CUDA_HOME else []) + [shutil.which("nvcc") or ""]:
        if cand and Path(cand).is_file():
            return cand
    return None


def library_path(capability: tuple[int, int], root: Path | None = None) -> Path:
    """Where the kernel built for a GPU of this compute capability is kept (named by the source's hash, so an
    edited source is rebuilt and never mixed up with an old build)."""
    from snd.pipeline.buildcache import cache_root

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    major, minor = capability
    return (root or cache_root()) / "kernels" / f"slot_adjoint-{digest}-sm{major}{minor}.so"


def status(root: Path | None = None) -> str:
    """One line for `snd doctor`: built, buildable, or why the operators fall back to gsplat's backward kernel.
    From files only (nothing is built here)."""
    nvcc = _nvcc()
    head = "on (SND_SLOT_ADJOINT=on)" if enabled() else "off: gsplat's backward kernel is used (SND_SLOT_ADJOINT=on opts in)"
    return f"{head}; {_where(nvcc, root)}"


def _where(nvcc: str | None, root: Path | None) -> str:
    if not torch.cuda.is_available():
        return "needs CUDA (on the CPU the torch plan builds the operators)"
    built = library_path(torch.cuda.get_device_capability(), root)
    if built.is_file():
        return f"built for this GPU (in {built.parent})"
    if nvcc is None:
        return "nvcc not found: operators use gsplat's backward kernel (the same result)"
    return f"not built yet: the first operator build compiles it with {nvcc} (a few seconds)"


def _build(out: Path, capability: tuple[int, int]) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        raise KernelUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH; gsplat's JIT build needs it too)")
    arch = f"{capability[0]}{capability[1]}"
    try:  # a temporary name, then a rename: a concurrent rank or a kill never leaves a half-written library
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise KernelUnavailable(f"cannot write to {out.parent}: {e} (set SND_CACHE_DIR to a writable folder)") from e
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
           "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-o", tmp, str(SOURCE)]
    log.info("building snd's slot adjoint kernel for sm_%s into %s (first use only, a few seconds)", arch, out)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise KernelUnavailable(f"nvcc failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library(device: torch.device) -> ctypes.CDLL:
    cap = torch.cuda.get_device_capability(device)
    with _LOCK:
        if cap not in _LIBS:
            path = library_path(cap)
            if not path.is_file():
                _build(path, cap)
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise KernelUnavailable(f"cannot load {path}: {e} (delete it to rebuild)") from e
            fn = lib.snd_slot_adjoint
            u32, i32, ptr = ctypes.c_uint32, ctypes.c_int32, ctypes.c_void_p
            fn.argtypes = [i32, u32, i32, ptr, ptr, ptr, u32, u32, u32, u32, u32, ptr, ptr, ptr, ptr, u32, ptr, ptr]
            fn.restype = ctypes.c_int
            _LIBS[cap] = lib
        return _LIBS[cap]


def slot_adjoint(means2d: Tensor, conics: Tensor, opacities: Tensor, tile_offsets: Tensor, flatten_ids: Tensor,
                 slot: Tensor, value: Tensor, channels: int, width: int, height: int, tile_size: int) -> Tensor:
    """sum_q w(q, g) value(q) [slot(q) == k] for every Gaussian g and slot k: [I * G, channels] float32.

    means2d [I, 1, G, 2], conics [I, 1, G, 3], opacities [I, 1, G] float32 and tile_offsets [I, 1, th, tw],
    flatten_ids [n] int32 are gsplat's projection and tile intersection of I images (one camera each);
    slot [I, H, W] int (-1: the pixel adds nothing) and value [I, H, W] float32 describe the field."""
    dev = means2d.device
    I, G = int(opacities.shape[0]), int(opacities.shape[-1])
    th, tw = int(tile_offsets.shape[-2]), int(tile_offsets.shape[-1])
    out = torch.zeros(I * G, int(channels), dtype=torch.float32, device=dev)
    if channels == 0 or flatten_ids.numel() == 0:
        return out
    if means2d.shape[:1] + means2d.shape[-2:] != (I, G, 2) or conics.shape[-2:] != (G, 3):
        raise ValueError(f"means2d/conics must be [I, 1, G, 2/3], got {tuple(means2d.shape)} / {tuple(conics.shape)}")
    if slot.shape != (I, height, width) or value.shape != (I, height, width):
        raise ValueError(f"slot and value must be [I={I}, {height}, {width}], got {tuple(slot.shape)} / {tuple(value.shape)}")
    lib = _library(dev)
    args = [means2d.float().contiguous(), conics.float().contiguous(), opacities.float().contiguous(),
            tile_offsets.int().contiguous(), flatten_ids.int().contiguous(), slot.int().contiguous(),
            value.float().contiguous()]
    m, c, o, off, fid, sl, val = args
    stream = torch.cuda.current_stream(dev).cuda_stream
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    err = lib.snd_slot_adjoint(index, I, int(fid.numel()), m.data_ptr(), c.data_ptr(), o.data_ptr(), int(width),
                               int(height), int(tile_size), tw, th, off.data_ptr(), fid.data_ptr(), sl.data_ptr(),
                               val.data_ptr(), int(channels), out.data_ptr(), stream)
    if err != 0:
        raise RuntimeError(f"snd's slot_adjoint kernel failed to launch (CUDA error {err})")
    return out
