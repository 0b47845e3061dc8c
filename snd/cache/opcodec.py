"""Transfer operators (`snd.splat.operator`) <-> the stored ``op_*`` arrays of schema v2.

Why a codec: stage one builds operators as float64/long tensors on the GPU; the store keeps them
compact (float16 coefficients, int16 columns when they fit) and stage two wants them back as a batched
`TransferOperator` on its device. Missing targets (slot index -1) are stored as all-zero operators.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from snd.cache.schema import OperatorSpec
from snd.splat.operator import TransferOperator

__all__ = ["OP_KEYS", "empty_operator_arrays", "encode_operators", "operator_from_batch"]

OP_KEYS = ("op_cols", "op_vals", "op_inst", "op_inst_ids", "op_inst_w", "op_valid", "op_stats")


def empty_operator_arrays(spec: OperatorSpec, B: int, T: int) -> dict[str, np.ndarray]:
    """All-zero ``op_*`` arrays for B pairs x T target slots (stored dtypes)."""
    P, J, R, Kc = spec.P, spec.J, spec.row_cap, spec.inst_cap
    return {
        "op_cols": np.zeros((B, T, P, R), spec.col_dtype),
        "op_vals": np.zeros((B, T, P, R), np.float16),
        "op_inst": np.zeros((B, T, Kc, J), np.float16),
        "op_inst_ids": np.zeros((B, T, P, 4), np.int16),
        "op_inst_w": np.zeros((B, T, P, 4), np.float16),
        "op_valid": np.zeros((B, T, P), np.uint8),
        "op_stats": np.zeros((B, T, 3), np.float32),
    }


def encode_operators(ops: list[list[TransferOperator | None]], spec: OperatorSpec) -> dict[str, np.ndarray]:
    """ops[b][t] (None = no target in that slot) -> stored arrays with leading [B, T]."""
    B, T = len(ops), len(ops[0]) if ops else 0
    out = empty_operator_arrays(spec, B, T)
    for b, row in enumerate(ops):
        assert len(row) == T, f"pair {b}: {len(row)} target slots, expected {T}"
        for t, op in enumerate(row):
            if op is None:
                continue
            assert op.cols.shape == (spec.P, spec.row_cap), f"op cols {tuple(op.cols.shape)} vs {(spec.P, spec.row_cap)}"
            assert op.inst.shape == (spec.inst_cap, spec.J), f"op inst {tuple(op.inst.shape)} vs {(spec.inst_cap, spec.J)}"
            out["op_cols"][b, t] = op.cols.cpu().numpy().astype(spec.col_dtype)
            out["op_vals"][b, t] = op.vals.cpu().numpy().astype(np.float16)
            out["op_inst"][b, t] = op.inst.cpu().numpy().astype(np.float16)
            out["op_inst_ids"][b, t] = op.inst_ids.cpu().numpy().astype(np.int16)
            out["op_inst_w"][b, t] = op.inst_w.cpu().numpy().astype(np.float16)
            out["op_valid"][b, t] = op.valid.cpu().numpy().astype(np.uint8)
            out["op_stats"][b, t] = [float(op.dropped_direct), float(op.dropped_inst), float(op.max_row_nnz)]
    return out


def operator_from_batch(batch: dict[str, Tensor], device: torch.device | None = None) -> TransferOperator:
    """A collated stream batch's ``op_*`` tensors [B, ...] -> a batched TransferOperator on `device`
    (indices as int64 for scatter, coefficients kept in their stored dtype; `apply_operator` promotes)."""
    dev = device if device is not None else batch["op_cols"].device

    def get(k: str) -> Tensor:
        return batch[k].to(dev, non_blocking=True)

    stats = get("op_stats").float()
    return TransferOperator(cols=get("op_cols").long(), vals=get("op_vals"), inst=get("op_inst"),
                            inst_ids=get("op_inst_ids").long(), inst_w=get("op_inst_w"), valid=get("op_valid").bool(),
                            dropped_direct=stats[..., 0], dropped_inst=stats[..., 1], max_row_nnz=stats[..., 2].long())
