"""Stage one's shard writer alone, on the host: ms per pair and how much it slows the other Python threads (issue 20).

Why: on two H100 machines stage one's writer thread was busy 25-60 ms per pair (`docs/bench/pipeline_ab3_h100.jsonl`,
`pipeline_ab4_h100.jsonl`), on one of them for the whole period, while the previous machine's writer took 15-19. The
writer competes for the GIL with the main thread's launches and the operator threads. This times `SceneWriter.add`
and `commit` on arrays of stage one's layout at the real size (576x880 scaffold, 3 targets, operators at the 41x62
grid; no frames), with and without a pure-Python thread spinning beside it, whose spins per second against an idle
baseline tell the share of the GIL the writer and its pool leave to other threads.

Values are drawn smooth (random walks in each dtype's range), so they compress somewhat like a scaffold; the absolute
MB per pair is not the store's (`scripts/measure_store_size.py` is).
`python scripts/writer_rates.py [--batches 6] [--batch-pairs 8] [--switch-interval S ...] [--pipeline zarr zarrs]
[--out FILE]` prints one JSON line per switch interval (`sys.setswitchinterval`, Python's GIL hand-over interval; 0.005
is Python's default) and codec pipeline: zarr's own (`BatchedCodecPipeline`, the default) or zarrs-python's Rust one
(`zarrs.ZarrsCodecPipeline`, `pip install zarrs`), which encodes a shard's chunks outside Python. `--writer process`
times stage one's `_WriterProcess` instead of `SceneWriter` in this thread: the batches go down its queue and spill files to
a child process (started and warmed up with a one-pair scene before the clock starts), and a pair's time runs from
the first batch queued to the commit reported back; the spinning thread then shares no GIL with the writer.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from snd.cache import manifest as M
from snd.cache.schema import Encoding, OperatorSpec, layout
from snd.cache.writer import CODEC_PIPELINES, SceneWriter, folder_bytes



def batch(specs: dict, B: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """B pairs of every array of `specs`: smooth integer fields, floats of small magnitude, valid indices."""
    out = {}
    for name, s in specs.items():
        shape = (B, *s.shape)
        if name in ("ctx_index", "tgt_index"):
            out[name] = np.broadcast_to(np.arange(shape[-1], dtype=s.dtype), shape).copy()
        elif np.issubdtype(s.dtype, np.floating):
            out[name] = (rng.normal(size=shape) * 0.1).astype(s.dtype)
        else:
            info = np.iinfo(s.dtype)
            lo, hi = max(info.min, -1000), min(info.max, 1000)
            walk = np.cumsum(rng.integers(-2, 3, size=shape), axis=-1)
            out[name] = np.clip(walk, lo, hi).astype(s.dtype)
    return out


def write(root: Path, specs: dict, fields: list[dict], H: int, W: int, T: int, enc: Encoding, op: OperatorSpec,
          codecs: str) -> dict:
    n = sum(len(f["depth"]) for f in fields)
    M.init_store(root, {"dataset": {"root": "x"}, "source": {"name": "bench"}, "scaffold": [H, W], "sampler": {},
                        "encoding": enc.to_dict()})
    t0 = time.perf_counter()
    w = SceneWriter(root, "scene0", n_pairs=n, n_targets=T, height=H, width=W, enc=enc, attrs={"frame_ids": []}, op=op,
                    codecs=codecs)
    t_add = 0.0
    for f in fields:
        t = time.perf_counter()
        w.add(f)
        t_add += time.perf_counter() - t
    t = time.perf_counter()
    M.write_marker(root, "scene0", w.commit())
    t_commit = time.perf_counter() - t
    return {"pairs": n, "add_ms_per_pair": t_add / n * 1e3, "commit_ms_per_pair": t_commit / n * 1e3,
            "wall_ms_per_pair": (time.perf_counter() - t0) / n * 1e3,
            "mb_per_pair": folder_bytes(root / "scene0") / n / 1e6}


def write_process(root: Path, fields: list[dict], H: int, W: int, T: int, enc: Encoding, codecs: str) -> dict:
    """The same scene written through stage one's writer process (`snd.stages.precompute.writer_process._WriterProcess`)."""
    from snd.pipeline.config import PrecomputeConfig
    from snd.stages.precompute.writer_process import _WriterProcess

    n = sum(len(f["depth"]) for f in fields)
    M.init_store(root, {"dataset": {"root": "x"}, "source": {"name": "bench"}, "scaffold": [H, W], "sampler": {},
                        "encoding": enc.to_dict()})
    cfg = PrecomputeConfig(data=root, out=root, height=H, width=W, targets_per_pair=T, images="off",
                           writer_codecs=codecs)
    done: dict[str, object] = {}
    ev = threading.Event()

    def finished(name: str, rec: object) -> None:
        done[name] = rec
        ev.set()

    w = _WriterProcess(root, cfg, enc, finished, finished)
    w.start()
    try:
        for scene, parts in (("warmup", [{k: v[:1] for k, v in fields[0].items()}]), ("scene0", fields)):
            ev.clear()
            t0 = time.perf_counter()
            w.q.put(("start", scene, sum(len(f["depth"]) for f in parts), []))
            for f in parts:
                w.q.put(("add", scene, f))
            t_add = time.perf_counter() - t0
            w.q.put(("commit", scene))
            ev.wait()
            wall = time.perf_counter() - t0
            if not isinstance(done[scene], dict):
                raise RuntimeError(f"the writer process failed: {done[scene]}")
    finally:
        w.q.put(("stop",))
        w.join()
    return {"pairs": n, "add_ms_per_pair": t_add / n * 1e3, "commit_ms_per_pair": None,
            "wall_ms_per_pair": wall / n * 1e3, "mb_per_pair": folder_bytes(root / "scene0") / n / 1e6}


def spins_per_s(fn) -> tuple[float, object]:
    """Run fn() while a Python thread counts loop iterations: (iterations per second, fn's result)."""
    stop = threading.Event()
    count = [0]

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1
        count[0] = n

    th = threading.Thread(target=spin)
    t0 = time.perf_counter()
    th.start()
    res = fn()
    stop.set()
    th.join()
    return count[0] / (time.perf_counter() - t0), res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--height", type=int, default=576)
    ap.add_argument("--width", type=int, default=880)
    ap.add_argument("--switch-interval", type=float, nargs="+", default=[0.005])
    ap.add_argument("--pipeline", nargs="+", choices=sorted(CODEC_PIPELINES), default=["zarr"])
    ap.add_argument("--writer", nargs="+", choices=["thread", "process"], default=["thread"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    H, W, T = a.height, a.width, 3
    enc = Encoding(offset=True)
    op = OperatorSpec(ctx_hw=(H // 14, W // 14), out_hw=(H // 14, W // 14))
    specs = layout(H, W, T, enc, op)
    rng = np.random.default_rng(0)
    fields = [batch(specs, a.batch_pairs, rng) for _ in range(a.batches)]
    lines = []
    keep = sys.getswitchinterval()
    for how, pipe, si in [(h, p, si) for h in a.writer for p in a.pipeline for si in a.switch_interval]:
        go = (lambda root: write(root, specs, fields, H, W, T, enc, op, pipe)) if how == "thread" else \
            (lambda root: write_process(root, fields, H, W, T, enc, pipe))
        tmp = Path(tempfile.mkdtemp(prefix="snd-writer-"))
        sys.setswitchinterval(si)
        try:
            plain = go(tmp / "a")
            idle, _ = spins_per_s(lambda: time.sleep(max(0.5, plain["wall_ms_per_pair"] * plain["pairs"] / 1e3)))
            busy, spun = spins_per_s(lambda: go(tmp / "b"))
        finally:
            sys.setswitchinterval(keep)
            shutil.rmtree(tmp, ignore_errors=True)
        lines.append(json.dumps({
            "what": "writer_rates", "writer": how, "pipeline": pipe, "switch_interval_s": si, "height": H, "width": W, "targets": T,
            "batch_pairs": a.batch_pairs, **plain, "beside_a_spinning_thread": spun,
            "python_thread_share": busy / idle if idle else None,  # 1: the writer left the GIL alone; 0: held it all
            "note": f"the {how} writer alone on this host; smooth random values, no frames"}))
        print(lines[-1], flush=True)
    if a.out:
        Path(a.out).write_text("".join(x + "\n" for x in lines))


if __name__ == "__main__":
    main()
