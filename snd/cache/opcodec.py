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
from snd.splat.operator import TransferOperator, stack_operators

__all__ = ["OP_KEYS", "empty_operator_arrays", "encode_operator_jobs", "encode_operators", "operator_from_batch"]

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
    assert all(len(row) == T for row in ops), f"every pair needs {T} target slots"
    jobs = [(b, t) for b, row in enumerate(ops) for t, op in enumerate(row) if op is not None]
    if not jobs:
        return empty_operator_arrays(spec, B, T)
    stacked = stack_operators([ops[b][t] for b, t in jobs])
    return encode_operator_jobs(stacked, torch.tensor([b * T + t for b, t in jobs]), B, T, spec)


def encode_operator_jobs(ops: TransferOperator, slots: Tensor, B: int, T: int, spec: OperatorSpec) -> dict[str, np.ndarray]:
    """N jobs' operators (leading [N], any device) -> stored arrays [B, T, ...]; job n fills slot
    ``slots[n] = b * T + t``, the other slots stay all-zero. Casts to the stored dtypes happen on the
    operators' device and each array crosses to the host once (not once per target)."""
    N = int(slots.numel())
    assert ops.cols.shape[1:] == (spec.P, spec.row_cap), f"op cols {tuple(ops.cols.shape[1:])} vs {(spec.P, spec.row_cap)}"
    assert ops.inst.shape[1:] == (spec.inst_cap, spec.J), f"op inst {tuple(ops.inst.shape[1:])} vs {(spec.inst_cap, spec.J)}"
    assert ops.cols.shape[0] == N, f"{ops.cols.shape[0]} operators for {N} slots"
    dev = ops.cols.device
    idx = slots.to(dev, torch.long)
    col_t = torch.int16 if spec.col_dtype == np.int16 else torch.int32
    stats = torch.stack([ops.dropped_direct.float(), ops.dropped_inst.float(), ops.max_row_nnz.float()], -1)
    src = {"op_cols": (ops.cols, col_t), "op_vals": (ops.vals, torch.float16), "op_inst": (ops.inst, torch.float16),
           "op_inst_ids": (ops.inst_ids, torch.int16), "op_inst_w": (ops.inst_w, torch.float16),
           "op_valid": (ops.valid, torch.uint8), "op_stats": (stats, torch.float32)}
    out = {}
    for k, (x, dt) in src.items():
        full = torch.zeros(B * T, *x.shape[1:], dtype=dt, device=dev)
        full[idx] = x.to(dt)
        out[k] = full.reshape(B, T, *x.shape[1:]).cpu().numpy()
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
