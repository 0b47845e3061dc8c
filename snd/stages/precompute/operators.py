"""The transfer operators of a landed batch (`snd.splat.operator`), built from the decoded stored scaffold."""
from __future__ import annotations

import logging
from dataclasses import fields as dc_fields
from typing import TYPE_CHECKING

import numpy as np
import torch

from snd.cache.encode import decode_scaffold
from snd.cache.opcodec import encode_operator_jobs
from snd.cache.schema import Encoding, OperatorSpec

if TYPE_CHECKING:
    from snd.splat.operator import TransferOperator
    from snd.splat.operator_build import ChunkSize
    from snd.stages.precompute.frames import _Batch
    from snd.stages.precompute.launch import _Phases

log = logging.getLogger(__name__)
FP16_MAX = 65504.0  # coefficients are stored as float16: a larger one would be read back as inf
TARGET_KEYS = ("tgt_index", "tgt_mask", "tgt_K", "tgt_c2w")  # the [B, T, ...] per-target arrays of a batch


def _build_operators(fields: dict[str, np.ndarray], b: _Batch, enc: Encoding, spec: OperatorSpec,
                     dev: torch.device, ph: _Phases | None = None, *,
                     chunk: int | ChunkSize = 8) -> dict[str, np.ndarray]:
    """Transfer operators of every (pair, target slot) of the batch, built together
    (`snd.splat.operator_build.build_operators`, `chunk` targets at a time, a `ChunkSize` that shrinks when
    a chunk runs out of GPU memory) from the *decoded* stored scaffold, so that stage two's operator path
    equals its render path on exactly what the cache holds."""
    from snd.splat.gaussians import PixelGaussians
    from snd.splat.operator import build_operators
    from snd.train.distiller import rigid_inverse

    K = torch.from_numpy(b.ctx_K).to(dev)
    c2w = torch.from_numpy(b.ctx_c2w).to(dev)
    dec = {k: v for k, v in fields.items() if k in ("depth", "offset", "quats", "scales", "opacity", "offset_range", "scale_range")}
    means, quats, scales, opac = decode_scaffold(dec, K, c2w, enc=enc, device=dev)
    if ph is not None:
        ph.mark("operators_decode")
    ex = b.extra
    B, T = ex["tgt_index"].shape
    bi, ti = np.nonzero(ex["tgt_index"] >= 0)  # the jobs: (pair, target slot) with a target
    ops = build_operators(
        [PixelGaussians(means[i], quats[i], scales[i], opac[i]) for i in range(B)],
        torch.from_numpy(ex["ctx_mask"].astype(np.int64)).to(dev),
        torch.from_numpy(ex["tgt_mask"][bi, ti].astype(np.int64)).to(dev),
        torch.from_numpy(ex["tgt_K"][bi, ti]).to(dev, torch.float32),
        rigid_inverse(torch.from_numpy(ex["tgt_c2w"][bi, ti]).to(dev, torch.float32)),  # [J, 4, 4], one call
        torch.from_numpy(bi).to(dev), spec.ctx_hw, spec.out_hw, upsample=spec.upsample, blend=spec.blend,
        blend_weight=spec.blend_weight, protocol=spec.protocol, row_cap=spec.row_cap, inst_cap=spec.inst_cap,
        chunk=chunk)
    if ph is not None:
        ph.mark("operators")
    ops, bi, ti, targets = _drop_nonfinite(ops, bi, ti, ex, b.scene)
    out = encode_operator_jobs(ops, torch.from_numpy(bi * T + ti), B, T, spec)
    if ph is not None:
        ph.mark("operators_to_host")
    return {**out, **targets}


def _drop_nonfinite(ops: TransferOperator, bi: np.ndarray, ti: np.ndarray, ex: dict,
                    scene: str) -> tuple[TransferOperator, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Leave out the targets whose operator holds a NaN/inf or a coefficient float16 cannot store.

    Why: such an operator gives a non-finite loss target on every step that draws it, which the training
    loop can only skip; a store must never hold one. The target is dropped from its pair (the pair's other
    targets move up, as the reader expects targets in the first slots) with a warning naming the scene and
    frames, so the store stays usable and the cause (a builder bug or a broken scaffold) can be examined.
    Returns (kept jobs' operators, their pair and new slot indices, the batch's per-target arrays when a
    target was dropped, else {}). One device reduction and one host sync per batch."""
    finite = [(torch.isfinite(x) & (x.abs() <= FP16_MAX)).flatten(1).all(1) for x in (ops.vals, ops.inst, ops.inst_w)]
    ok = torch.stack(finite).all(0).cpu().numpy()
    if ok.all():
        return ops, bi, ti, {}
    for b, t in zip(bi[~ok], ti[~ok]):
        log.warning("scene %s: the transfer operator of the pair of frames %s to target frame %d has non-finite or "
                    "out-of-range coefficients; that target is left out of the store", scene,
                    ex["ctx_index"][b].tolist(), int(ex["tgt_index"][b, t]))
    keep = torch.from_numpy(ok).to(ops.cols.device)
    ops = type(ops)(**{f.name: getattr(ops, f.name)[keep] for f in dc_fields(ops)})
    bi, ti = bi[ok], ti[ok]
    new_ti = np.zeros_like(ti)
    targets = {k: np.zeros_like(ex[k]) for k in TARGET_KEYS}
    targets["tgt_index"][:] = -1
    targets["tgt_c2w"][:] = np.eye(4)
    for n, (b, t) in enumerate(zip(bi, ti)):
        new_ti[n] = int((bi[:n] == b).sum())  # kept targets of the pair before this one, in slot order
        for k in TARGET_KEYS:
            targets[k][b, new_ti[n]] = ex[k][b, t]
    return ops, bi, new_ti, targets
