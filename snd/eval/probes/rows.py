"""Every training row of a probe held on the training device, so that a batch is a gather, not a read.

Why: a linear probe's step is ~1 ms of GPU work; reading two rows from disk, collating them in a worker and
copying them to the GPU costs more than that, so the paper's 307,200-step schedules were bound by the data
path (snd bench eval: 18–40 ms per step). When the split fits (`plan_residency`), its tokens (float16, as
cached) and targets (compact dtypes of `snd.eval.targets.STORED`) are loaded once, in row order, and each
step's batch is an `index_select` on the device. Splits that do not fit (ScanNet++'s 140 k views) stream
from the token and target caches instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["DeviceRows", "row_bytes", "budget_bytes", "plan_residency", "Residency"]

Residency = Literal["auto", "device", "stream"]


def _target_dtype(task: str) -> torch.dtype:
    """The compact dtype of the target cache (`snd.eval.targets.STORED`): resident and cached rows agree."""
    from snd.eval.targets import STORED

    return getattr(torch, STORED[task])


def _target_key(task: str) -> str:
    from snd.eval.probes.train import TARGETS

    return TARGETS[task][0]


def row_bytes(data) -> int:
    """Bytes one row of `data` (a `ProbeData` with a feature store) takes when resident."""
    item = data[0]
    tok, tgt = item["tokens"], item[_target_key(data.task)]
    return tok.numel() * tok.element_size() + tgt.numel() * _target_dtype(data.task).itemsize


def budget_bytes(device: torch.device, budget_gib: float | None) -> int:
    """Bytes of rows `auto` may keep on `device`."""
    if budget_gib is not None:
        return int(budget_gib * 2**30)
    if device.type == "cuda":  # all free memory but 8 GiB: room for the step's activations and evaluation
        free, _ = torch.cuda.mem_get_info(device)
        return max(int(free - 8 * 2**30), 0)
    return 4 * 2**30


def plan_residency(data, device: torch.device, mode: Residency = "auto", budget_gib: float | None = None) -> tuple[str, str]:
    """("device" | "stream", why). `auto` keeps the rows on the device when they fit the budget (free GPU
    memory less 8 GiB; 4 GiB of RAM on CPU; or `budget_gib`)."""
    if mode not in ("auto", "device", "stream"):
        raise ValueError(f"residency must be auto|device|stream, got {mode!r}")
    if data.store is None:
        return "stream", "no feature store: the backbone runs every step (live path)"
    if mode != "auto":
        return mode, f"asked for {mode}"
    need, have = row_bytes(data) * len(data), budget_bytes(device, budget_gib)
    if need <= have:
        return "device", f"{need / 2**30:.2f} GiB of rows fit the {have / 2**30:.2f} GiB budget"
    return "stream", f"{need / 2**30:.2f} GiB of rows exceed the {have / 2**30:.2f} GiB budget"


@dataclass
class DeviceRows:
    """tokens [N, 1+h*w, C] (as cached) and target [N, ...] (compact dtype) on one device."""

    tokens: Tensor
    target: Tensor
    task: str

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def load(cls, data, device: torch.device, *, num_workers: int = 0, batch: int = 64) -> "DeviceRows":
        """Read every row of `data` once, in order (the token and target stores' chunk order)."""
        key = _target_key(data.task)
        dt = _target_dtype(data.task)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, num_workers=num_workers)
        tokens = target = None
        i = 0
        for b in loader:
            tok, tgt = b["tokens"], b[key]
            if tokens is None:
                tokens = torch.empty((len(data), *tok.shape[1:]), dtype=tok.dtype, device=device)
                target = torch.empty((len(data), *tgt.shape[1:]), dtype=dt, device=device)
            if data.task == "seg" and tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) > 255):
                raise ValueError(f"segmentation ids must lie in 0..255 (255 = ignore), got {int(tgt.min())}..{int(tgt.max())}")
            m = tok.shape[0]
            tokens[i:i + m].copy_(tok)
            target[i:i + m].copy_(tgt.to(dt))
            i += m
        assert tokens is not None and target is not None and i == len(data)
        return cls(tokens, target, data.task)

    def gather(self, idx: Tensor, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Rows `idx` (a device tensor): (tokens, target), written into `out` when given."""
        if out is None:
            return self.tokens.index_select(0, idx), self.target.index_select(0, idx)
        torch.index_select(self.tokens, 0, idx, out=out[0])
        torch.index_select(self.target, 0, idx, out=out[1])
        return out
