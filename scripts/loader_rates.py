"""Stage two's loader alone: items per second of `snd distill`'s DataLoader over a store, per worker count.

Why: the e2e runs of 2026-12-05 waited ~12.9 ms per step for data with 12 workers (~70 items/s) on two
different hosts, where one worker decodes an item in ~40 ms on this repo's CPU. This separates the loader's own
rate (no GPU, no training process competing for the cores) from what the training loop sees.
Prints one JSON line per worker count: items/s over `--items` items after the first batch of each worker, the
worker CPU time per item (process CPU time of the workers is not visible here, so: wall x workers / items,
an upper bound) and the training process's own CPU time per item (receiving batches: what capped the loader at
~150 items/s before batches travelled as one block, `snd.cache.packed`; `--plain` sends them as torch does, for
an A/B).
Usage: python3 scripts/loader_rates.py STORE [--workers 1 4 8 12] [--items 400] [--plain | --ab]
"""
import argparse
import json
import os
import time

import torch

from snd.pipeline.config import DistillConfig
from snd.train.data import BatchIterator, shard_stream_factory
from snd.train.loop import input_sized

ap = argparse.ArgumentParser()
ap.add_argument("store")
ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8, 12])
ap.add_argument("--items", type=int, default=400)
ap.add_argument("--plain", action="store_true", help="workers send tensors one by one (as before snd.cache.packed)")
ap.add_argument("--ab", action="store_true", help="each worker count packed, then plain (an A/B on this host)")
a = ap.parse_args()
cfg = input_sized(DistillConfig(shards=a.store))  # the sizes `snd distill` resolves (the default model)
factory = shard_stream_factory(cfg)
for w, plain in [(w, p) for w in a.workers for p in ((False, True) if a.ab else (a.plain,))]:
    it = BatchIterator(factory, batch=1, start=0, rank=0, world_size=1, num_workers=w, prefetch=cfg.prefetch,
                       pin_memory=torch.cuda.is_available(), seed=0, pack=not plain)
    for _ in range(max(w, 1) * 2):  # every worker started and through its first items
        next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.items):
        next(it)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"workers": w, "items_per_s": a.items / dt, "worker_ms_per_item_upper": dt * max(w, 1) / a.items * 1e3,
                      "main_cpu_ms_per_item": cpu / a.items * 1e3, "packed": not plain,
                      "cpus": len(os.sched_getaffinity(0)), "items": a.items}), flush=True)
    del it
