"""What a checkpoint costs the step loop: `CheckpointWriter.submit` with the device snapshot (the default)
against the host copy (the old way), on tensors the size of a ViT-S run's checkpoint (~350 MB).

For each mode, alternating, `--rounds` times: a loop of dummy steps (matmuls on --device, a host sync every 10
steps as `snd distill`'s metrics flush does) with one `submit` after a flush, as the loop does at --ckpt-every.
One writer per mode for all rounds, as in a run: round 0's device snapshot allocates its buffers, later rounds
reuse them. Reports, per mode, the calling thread's time in `submit` and how much longer the window of 10 steps holding the
checkpoint took than the median window. JSON lines on stdout.
Usage: python scripts/checkpoint_stall.py [--device cuda] [--mb 350] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from snd.train.checkpoint import CheckpointWriter


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def one_round(w: CheckpointWriter, tensors: dict, dev: torch.device, out: Path, windows: int = 30, ckpt_at: int = 15) -> dict:
    x = torch.randn(1024, 1024, device=dev)
    times, submit_s = [], None
    for win in range(windows):
        t0 = time.perf_counter()
        for _ in range(10):
            x = torch.tanh(x @ x / 32.0)
            for v in tensors.values():  # the optimizer's in-place updates (one small op per tensor)
                v[:1].add_(1e-6)
        float(x[0, 0])  # the flush's host sync
        if win == ckpt_at:
            ts = time.perf_counter()
            w.submit(out, step=win, tensors=tensors, meta={})
            submit_s = time.perf_counter() - ts
        times.append(time.perf_counter() - t0)
    w.wait()
    med = statistics.median(times)
    after = times[ckpt_at + 1: ckpt_at + 6]  # the windows while the writer thread works
    return {"mode": w.snapshot, "submit_ms": submit_s * 1e3, "median_window_ms": med * 1e3,
            "ckpt_window_extra_ms": (times[ckpt_at] - med) * 1e3, "next5_windows_extra_ms": (sum(after) - 5 * med) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mb", type=float, default=350.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device(a.device)
    n = int(a.mb * 1e6 / 4 / 16)
    tensors = {f"t{i}": torch.randn(n, device=dev) for i in range(16)}
    with tempfile.TemporaryDirectory() as d:
        writers = {m: CheckpointWriter(snapshot=m) for m in ("host", "device")}  # a run's one writer: round 0 allocates
        for r in range(a.rounds):
            for mode, w in writers.items():
                res = one_round(w, tensors, dev, Path(d) / mode)
                print(json.dumps({"round": r, "device": str(dev), "mb": a.mb, **{k: (round(v, 2) if isinstance(v, float) else v)
                                                                                  for k, v in res.items()}}), flush=True)


if __name__ == "__main__":
    main()
