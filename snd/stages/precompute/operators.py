"""The transfer operators of a landed batch (`snd.splat.operator`), built from the decoded stored scaffold."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from snd.cache.encode import decode_scaffold
from snd.cache.opcodec import encode_operator_jobs
from snd.cache.schema import Encoding, OperatorSpec

if TYPE_CHECKING:
    from snd.splat.operator_build import ChunkSize
    from snd.stages.precompute.frames import _Batch
    from snd.stages.precompute.launch import _Phases


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
    out = encode_operator_jobs(ops, torch.from_numpy(bi * T + ti), B, T, spec)
    if ph is not None:
        ph.mark("operators_to_host")
    return out
