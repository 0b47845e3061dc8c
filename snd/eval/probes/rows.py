"""Every training row of a probe held on the training device, so that a batch is a gather, not a read.

Why: a linear probe's step is ~1 ms of GPU work; reading two rows from disk, collating them in a worker and
copying them to the GPU costs more than that, so the paper's 307,200-step schedules were bound by the data
path (snd bench eval: 18–40 ms per step). When the split fits (`plan_residency`), its tokens (float16, as
cached) and targets (compact dtypes of `snd.eval.targets.STORED`) are loaded once, in row order, and each
step's batch is an `index_select` on the device. Splits that do not fit (ScanNet++'s 140 k views) stream
from the token and target caches instead. Probes over the same rows (a dataset's depth and segmentation)
hold the tokens once with one target per probe (`DeviceRows.load` of several `ProbeData`, `SharedRows`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["DeviceRows", "row_bytes", "group_row_bytes", "budget_bytes", "plan_residency", "Residency", "SharedRows"]

Residency = Literal["auto", "device", "stream"]


def _target_dtype(task: str) -> torch.dtype:
    """The compact dtype of the target cache (`snd.eval.targets.STORED`): resident and cached rows agree."""
    from snd.eval.targets import STORED

    return getattr(torch, STORED[task])


def _target_key(task: str) -> str:
    from snd.eval.probes.data import TARGETS

    return TARGETS[task][0]


def row_bytes(data) -> int:
    """Bytes one row of `data` (a `ProbeData` with a feature store) takes when resident."""
    return group_row_bytes([data])


def group_row_bytes(datas) -> int:
    """Bytes one row takes when resident for probes that share the rows of `datas` (`ProbeData`s over the
    same token store): the tokens once, each probe's target."""
    item = datas[0][0]
    tok = item["tokens"]
    tgt = sum(d.target(0).numel() * _target_dtype(d.task).itemsize for d in datas)
    return tok.numel() * tok.element_size() + tgt


def budget_bytes(device: torch.device, budget_gib: float | None) -> int:
    """Bytes of rows `auto` may keep on `device`."""
    if budget_gib is not None:
        return int(budget_gib * 2**30)
    if device.type == "cuda":  # all free memory but 8 GiB: room for the step's activations and evaluation
        free, _ = torch.cuda.mem_get_info(device)
        return max(int(free - 8 * 2**30), 0)
    return 4 * 2**30


def plan_residency(data, device: torch.device, mode: Residency = "auto", budget_gib: float | None = None,
                   *, need: int | None = None) -> tuple[str, str]:
    """("device" | "stream", why). `auto` keeps the rows on the device when they fit the budget (free GPU
    memory less 8 GiB; 4 GiB of RAM on CPU; or `budget_gib`). `need`: the rows' bytes when several probes
    share them (default: `row_bytes(data) * len(data)`)."""
    if mode not in ("auto", "device", "stream"):
        raise ValueError(f"residency must be auto|device|stream, got {mode!r}")
    if data.store is None:
        return "stream", "no feature store: the backbone runs every step (live path)"
    if mode != "auto":
        return mode, f"asked for {mode}"
    need = row_bytes(data) * len(data) if need is None else need
    have = budget_bytes(device, budget_gib)
    if need <= have:
        return "device", f"{need / 2**30:.2f} GiB of rows fit the {have / 2**30:.2f} GiB budget"
    return "stream", f"{need / 2**30:.2f} GiB of rows exceed the {have / 2**30:.2f} GiB budget"


@dataclass
class DeviceRows:
    """tokens [N, 1+h*w, C] (as cached) and one target [N, ...] (compact dtype) per probe, on one device."""

    tokens: Tensor
    targets: list[Tensor]
    tasks: list[str]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def target(self) -> Tensor:
        """The first probe's targets (the only ones when the rows serve one probe)."""
        return self.targets[0]

    @classmethod
    def load(cls, data, device: torch.device, *, num_workers: int = 0, batch: int = 64) -> "DeviceRows":
        """Read every row of `data` (a `ProbeData`, or a list of them over the same token store) once, in
        order (the token and target stores' chunk order)."""
        datas = list(data) if isinstance(data, (list, tuple)) else [data]
        n = len(datas[0])
        assert all(len(d) == n for d in datas), f"probes sharing rows need equal lengths, got {[len(d) for d in datas]}"
        loader = torch.utils.data.DataLoader(SharedRows(datas), batch_size=batch, shuffle=False, num_workers=num_workers)
        tokens, targets, i = None, [], 0
        for b in loader:
            tok = b["tokens"]
            if tokens is None:
                tokens = torch.empty((n, *tok.shape[1:]), dtype=tok.dtype, device=device)
                targets = [torch.empty((n, *b[f"t{k}"].shape[1:]), dtype=_target_dtype(d.task), device=device)
                           for k, d in enumerate(datas)]
            m = tok.shape[0]
            tokens[i:i + m].copy_(tok)
            for k, d in enumerate(datas):
                tgt = b[f"t{k}"]
                if d.task == "seg" and tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) > 255):
                    raise ValueError(f"segmentation ids must lie in 0..255 (255 = ignore), got {int(tgt.min())}..{int(tgt.max())}")
                targets[k][i:i + m].copy_(tgt.to(targets[k].dtype))
            i += m
        assert tokens is not None and i == n
        return cls(tokens, targets, [d.task for d in datas])

    def gather(self, idx: Tensor, out: tuple[Tensor, Tensor] | None = None, k: int = 0) -> tuple[Tensor, Tensor]:
        """Rows `idx` (a device tensor): (tokens, target of probe k), written into `out` when given."""
        if out is None:
            return self.tokens.index_select(0, idx), self.targets[k].index_select(0, idx)
        torch.index_select(self.tokens, 0, idx, out=out[0])
        torch.index_select(self.targets[k], 0, idx, out=out[1])
        return out


class SharedRows(torch.utils.data.Dataset):
    """Row j of probes that share a token store: {"tokens", "t0", "t1", ...} (each probe's target), so a
    streamed step reads the tokens once for all of them."""

    def __init__(self, datas):
        self.datas = list(datas)

    def __len__(self) -> int:
        return len(self.datas[0])

    def __getitem__(self, j: int) -> dict[str, Tensor]:
        first = self.datas[0][j]
        out = {"tokens": first["tokens"], "t0": first[_target_key(self.datas[0].task)], "row": first["row"]}
        for k, d in enumerate(self.datas[1:], 1):
            out[f"t{k}"] = d.target(j)
        return out
