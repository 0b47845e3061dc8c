"""The transfer operators of a landed batch (`snd.splat.operator`), built from the decoded stored scaffold."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from snd.cache.encode import decode_scaffold
from snd.cache.opcodec import encode_operators
from snd.cache.schema import Encoding, OperatorSpec

if TYPE_CHECKING:
    from snd.stages.precompute.frames import _Batch
    from snd.stages.precompute.launch import _Phases


def _build_operators(fields: dict[str, np.ndarray], b: _Batch, enc: Encoding, spec: OperatorSpec,
                     dev: torch.device, ph: _Phases | None = None) -> dict[str, np.ndarray]:
    """Transfer operators of every (pair, target slot), built from the *decoded* stored scaffold, so that
    stage two's operator path equals its render path on exactly what the cache holds."""
    from snd.splat.gaussians import PixelGaussians
    from snd.splat.operator import build_operator
    from snd.train.distiller import rigid_inverse

    K = torch.from_numpy(b.ctx_K).to(dev)
    c2w = torch.from_numpy(b.ctx_c2w).to(dev)
    dec = {k: v for k, v in fields.items() if k in ("depth", "offset", "quats", "scales", "opacity", "offset_range", "scale_range")}
    means, quats, scales, opac = decode_scaffold(dec, K, c2w, enc=enc, device=dev)
    if ph is not None:
        ph.mark("operators_decode")
    ex = b.extra
    ops = []
    for i in range(len(b.ctx_K)):
        g = PixelGaussians(means[i], quats[i], scales[i], opac[i])
        ctx_masks = torch.from_numpy(ex["ctx_mask"][i].astype(np.int64)).to(dev)
        row = []
        for t, ti in enumerate(ex["tgt_index"][i]):
            if ti < 0:
                row.append(None)
                continue
            w2c = rigid_inverse(torch.from_numpy(ex["tgt_c2w"][i, t]).to(dev, torch.float32))
            row.append(build_operator(
                g, ctx_masks, torch.from_numpy(ex["tgt_mask"][i, t].astype(np.int64)).to(dev),
                torch.from_numpy(ex["tgt_K"][i, t]).to(dev, torch.float32), w2c, spec.ctx_hw, spec.out_hw,
                upsample=spec.upsample, blend=spec.blend, blend_weight=spec.blend_weight,
                protocol=spec.protocol, row_cap=spec.row_cap, inst_cap=spec.inst_cap))
        ops.append(row)
    if ph is not None:
        ph.mark("operators")
    out = encode_operators(ops, spec)
    if ph is not None:
        ph.mark("operators_to_host")
    return out
