"""snd's own CUDA kernels for the transfer-operator builder (`snd.splat.operator_build`), built and called here.

Why snd writes CUDA at all: a transfer operator needs, per target render, (a) the render's adjoint applied to the
kept labels' mean selectors (the instance part) and (b) the compositing weights at the ~2 % of pixels the bilinear
downsampling reads, summed per target patch through the Gaussians' upsampling taps (the direct part). gsplat has
kernels for neither: (a) runs through its backward kernel on all K channels of every (pixel, Gaussian) pair (28.7
of a 12-target chunk's 68 ms on an H200, `docs/bench/profile_operator_synthetic_h200.jsonl`), and (b) through its
index list plus torch glue that sorts and reduces that list twice (~2/3 of the builder's device time on an H100,
docs/performance.md). `csrc/operator_kernels.cu` has one kernel for each (its header says how they work):

* `slot_adjoint` (``SND_SLOT_ADJOINT``): the adjoint for a field with one channel set per pixel;
* `direct_rows` (``SND_DIRECT_KERNEL``): the direct part's capped rows, one block per (job, patch).

It is plain CUDA with C entry points, built with nvcc in seconds into snd's build cache (``<cache>/kernels``,
`snd.pipeline.buildcache.cache_root`) and called through ctypes on torch's stream.

Both are on by default on CUDA: on an H100 they cut the builder from 6.6 to 3.5 ms per 576x880 target of the
random-init MVSplat scaffold and stage one from 17.9 to 23.0 pairs/s, with the same operators as the paths they
replace (`docs/performance.md`, "snd's operator kernels"). ``=off`` in either variable goes back to gsplat's backward
kernel / the torch aggregation (for an A/B, or a GPU they misbehave on). When they cannot build (no nvcc, a failed
build) a call raises `KernelUnavailable`; the caller (`snd.splat.contrib`) then falls back to those paths and says so
once.
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

__all__ = ["KernelUnavailable", "USE", "enabled", "direct_rows", "fall_back", "slot_adjoint", "library_path", "status",
           "switched_on"]

SOURCE = Path(__file__).with_name("csrc") / "operator_kernels.cu"
log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_LIBS: dict[tuple[int, int], ctypes.CDLL] = {}


# per kernel, "on"/"off" when set by code (tests, the profile script's A/B, a failed build); None: the environment
USE: dict[str, str | None] = {"slot": None, "direct": None}
ENV = {"slot": "SND_SLOT_ADJOINT", "direct": "SND_DIRECT_KERNEL"}


OFF = ("off", "0", "false", "no")


def switched_on(value: str) -> bool:
    """The value of one of snd's kernel switches (a `USE` setting, ``SND_SLOT_ADJOINT`` / ``SND_DIRECT_KERNEL``, and
    MVSplat's ``SND_CORR_KERNEL``): on unless it says off, 0, false or no (any case, spaces ignored)."""
    return value.strip().lower() not in OFF


def enabled(kernel: str) -> bool:
    """Whether the operator builder uses this kernel ("slot" or "direct") on CUDA: the setting in `USE`, else its
    variable (``SND_SLOT_ADJOINT`` / ``SND_DIRECT_KERNEL``, on by default; `switched_on`), read each time, so
    `snd doctor` and the builder never disagree."""
    return switched_on(USE[kernel] or os.environ.get(ENV[kernel], "on"))


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
    return (root or cache_root()) / "kernels" / f"operator_kernels-{digest}-sm{major}{minor}.so"


def status(root: Path | None = None) -> str:
    """One line for `snd doctor`: built, buildable, or why the operators fall back to gsplat's backward kernel.
    From files only (nothing is built here)."""
    nvcc = _nvcc()
    off = [f"{k} ({ENV[k]}=off)" for k in ENV if not enabled(k)]
    head = "on: slot adjoint and direct rows" if not off else \
        f"off: {', '.join(off)} (gsplat's backward kernel / the torch aggregation instead)"
    return f"{head}; {_where(nvcc, root)}"


def _where(nvcc: str | None, root: Path | None) -> str:
    if not torch.cuda.is_available():
        return "needs CUDA (on the CPU the torch plan builds the operators)"
    built = library_path(torch.cuda.get_device_capability(), root)
    if built.is_file():
        return f"built for this GPU (in {built.parent})"
    if nvcc is None:
        return "nvcc not found: operators use gsplat's backward kernel and the torch aggregation (the same result)"
    return f"not built yet: the first operator build compiles them with {nvcc} (a few seconds)"


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
    log.info("building snd's operator kernels for sm_%s into %s (first use only, a few seconds)", arch, out)
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
            u32, i32, ptr = ctypes.c_uint32, ctypes.c_int32, ctypes.c_void_p
            lib.snd_slot_adjoint.argtypes = [i32, u32, i32, ptr, ptr, ptr, u32, u32, u32, u32, u32, ptr, ptr, ptr, ptr,
                                             u32, ptr, ptr]
            lib.snd_direct_rows.argtypes = [i32, u32, i32, u32, ptr, ptr, ptr, u32, u32, u32, u32, u32, ptr, ptr, u32,
                                            ptr, ptr, ptr, ptr, ptr, u32, u32, ptr, ptr, ptr, ptr, ptr, ptr]
            lib.snd_slot_adjoint.restype = lib.snd_direct_rows.restype = ctypes.c_int
            _LIBS[cap] = lib
        return _LIBS[cap]


def _renders(means2d: Tensor, conics: Tensor, opacities: Tensor, tile_offsets: Tensor,
             flatten_ids: Tensor) -> tuple[int, int, int, int, list[Tensor]]:
    """Both kernels' view of gsplat's projection and tile intersection of I images: (I, G, tile rows, tile columns,
    [means2d, conics, opacities, tile_offsets, flatten_ids] in the dtypes and layout the kernels read)."""
    I, G = int(opacities.shape[0]), int(opacities.shape[-1])
    if means2d.shape[:1] + means2d.shape[-2:] != (I, G, 2) or conics.shape[-2:] != (G, 3):
        raise ValueError(f"means2d/conics must be [I, 1, G, 2/3], got {tuple(means2d.shape)} / {tuple(conics.shape)}")
    th, tw = int(tile_offsets.shape[-2]), int(tile_offsets.shape[-1])
    return I, G, th, tw, [means2d.float().contiguous(), conics.float().contiguous(), opacities.float().contiguous(),
                          tile_offsets.int().contiguous(), flatten_ids.int().contiguous()]


def _launch(dev: torch.device, name: str, *args) -> None:
    """Call entry point `name` of the library for `dev` with its device index first and torch's current stream last;
    a CUDA error from the launch is a RuntimeError naming the kernel."""
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    err = getattr(_library(dev), name)(index, *args, torch.cuda.current_stream(dev).cuda_stream)
    if err != 0:
        raise RuntimeError(f"snd's {name.removeprefix('snd_')} kernel failed to launch (CUDA error {err})")


def fall_back(kernel: str, err: KernelUnavailable, instead: str) -> None:
    """Turn `kernel` off for this process after it could not build or load here, and say once what runs instead
    (the same operators)."""
    USE[kernel] = "off"
    log.warning("snd's %s kernel is unavailable (%s); %s (the same operators)", kernel, err, instead)


def slot_adjoint(means2d: Tensor, conics: Tensor, opacities: Tensor, tile_offsets: Tensor, flatten_ids: Tensor,
                 slot: Tensor, value: Tensor, channels: int, width: int, height: int, tile_size: int) -> Tensor:
    """sum_q w(q, g) value(q) [slot(q) == k] for every Gaussian g and slot k: [I * G, channels] float32.

    means2d [I, 1, G, 2], conics [I, 1, G, 3], opacities [I, 1, G] float32 and tile_offsets [I, 1, th, tw],
    flatten_ids [n] int32 are gsplat's projection and tile intersection of I images (one camera each);
    slot [I, H, W] int (-1: the pixel adds nothing) and value [I, H, W] float32 describe the field."""
    dev = means2d.device
    I, G, th, tw, (m, c, o, off, fid) = _renders(means2d, conics, opacities, tile_offsets, flatten_ids)
    out = torch.zeros(I * G, int(channels), dtype=torch.float32, device=dev)
    if channels == 0 or flatten_ids.numel() == 0:
        return out
    if slot.shape != (I, height, width) or value.shape != (I, height, width):
        raise ValueError(f"slot and value must be [I={I}, {height}, {width}], got {tuple(slot.shape)} / {tuple(value.shape)}")
    sl, val = slot.int().contiguous(), value.float().contiguous()
    _launch(dev, "snd_slot_adjoint", I, int(fid.numel()), m.data_ptr(), c.data_ptr(), o.data_ptr(), int(width),
            int(height), int(tile_size), tw, th, off.data_ptr(), fid.data_ptr(), sl.data_ptr(), val.data_ptr(),
            int(channels), out.data_ptr())
    return out


# table slots per row of `direct_rows` (a power of 2; 24 bytes each in shared memory): a row with more distinct
# columns than fit is rebuilt with 4x the slots, if one block's shared memory holds them (227 KiB on Hopper, 163 on
# an A100: there the second size is skipped and such a chunk goes to the torch path)
DIRECT_CAPACITY = (2048, 8192)
SLOT_BYTES = 24


def _capacities(dev: torch.device) -> list[int]:
    props = torch.cuda.get_device_properties(dev)
    limit = getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block
    return [c for c in DIRECT_CAPACITY if c * SLOT_BYTES + 64 <= limit]


def direct_rows(means2d: Tensor, conics: Tensor, opacities: Tensor, tile_offsets: Tensor, flatten_ids: Tensor,
                width: int, height: int, tile_size: int, tap_pix: Tensor, tap_coef: Tensor, pair: Tensor,
                ucols: Tensor, uw: Tensor, row_cap: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The direct part's rows of I jobs (`snd.splat.operator_rows._direct_ell`'s outputs) in one kernel.

    means2d .. flatten_ids: gsplat's projection and tile intersection of the I renders (as `slot_adjoint`);
    tap_pix [4, P] the downsampling's tap pixels (y * width + x), tap_coef [I, 4, P] float64 each tap's weight
    times its pixel's unblended share; pair [I] the pair whose upsampling taps job i reads; ucols / uw [pairs * G, 4]
    each Gaussian's context-patch columns and weights. Returns (cols [I*P, row_cap] long, vals [I*P, row_cap]
    float64, nnz [I, P] long, abs [I, P, 2] float64: each row's sum of |value| and the part dropped by the cap), or
    None when some row has more distinct columns than the largest table holds (the caller uses the torch glue)."""
    dev = means2d.device
    I, G, th, tw, (m, c, o, off, fid) = _renders(means2d, conics, opacities, tile_offsets, flatten_ids)
    P = int(tap_pix.shape[1])
    if tap_pix.shape != (4, P) or tap_coef.shape != (I, 4, P) or pair.shape != (I,):
        raise ValueError(f"tap_pix [4, P], tap_coef [I={I}, 4, P] and pair [I] expected, got {tuple(tap_pix.shape)}, "
                         f"{tuple(tap_coef.shape)}, {tuple(pair.shape)}")
    if ucols.shape != uw.shape or ucols.dim() != 2 or ucols.shape[1] != 4:
        raise ValueError(f"ucols and uw must be [pairs * G, 4], got {tuple(ucols.shape)} / {tuple(uw.shape)}")
    cols = torch.zeros(I * P, int(row_cap), dtype=torch.long, device=dev)
    vals = torch.zeros(I * P, int(row_cap), dtype=torch.float64, device=dev)
    nnz = torch.zeros(I * P, dtype=torch.long, device=dev)
    sums = torch.zeros(I * P, 2, dtype=torch.float64, device=dev)
    if I == 0 or P == 0:
        return cols, vals, nnz.reshape(I, P), sums.reshape(I, P, 2)
    tp, tc, pr = tap_pix.int().contiguous(), tap_coef.double().contiguous(), pair.int().contiguous()
    uc, uv = ucols.long().contiguous(), uw.double().contiguous()
    for capacity in _capacities(dev):
        overflow = torch.zeros(1, dtype=torch.int32, device=dev)
        _launch(dev, "snd_direct_rows", I, int(fid.numel()), G, m.data_ptr(), c.data_ptr(), o.data_ptr(), int(width),
                int(height), int(tile_size), tw, th, off.data_ptr(), fid.data_ptr(), P, tp.data_ptr(), tc.data_ptr(),
                pr.data_ptr(), uc.data_ptr(), uv.data_ptr(), capacity, int(row_cap), cols.data_ptr(), vals.data_ptr(),
                nnz.data_ptr(), sums.data_ptr(), overflow.data_ptr())
        full = int(overflow.item())  # a host sync, as the torch glue's own
        if not full:
            return cols, vals, nnz.reshape(I, P), sums.reshape(I, P, 2)
        log.info("%d operator rows hold more than %d distinct columns; rebuilding with a larger table", full, capacity)
        cols.zero_(), vals.zero_()
    return None
