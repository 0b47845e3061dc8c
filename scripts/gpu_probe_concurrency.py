"""GPU diagnostic for the evaluation suite: where a probe step's time goes and whether probes overlap.

Prints JSON lines: per-kernel profile of one depth / seg step, single-probe graph rates, the aggregate rate
of K probes replayed on K streams, and the backbone's forward rate per precision (feature extraction).
Run on the GPU machine: `python3 scripts/gpu_probe_concurrency.py`.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from snd.eval.probes import DepthProbe, SegProbe, default_spec
from snd.eval.probes.step import _optimizer, _set_lr, _Step

dev = torch.device("cuda")
HW, GRID, DIM = (476, 630), (34, 45), 384
N_ROWS = 64


def emit(**kw):
    print(json.dumps(kw), flush=True)


def make(task: str, classes: int = 150):
    torch.manual_seed(0)
    if task == "depth":
        probe = DepthProbe(DIM, min_depth=1e-3, max_depth=10.0)
        tgt = (0.5 + 9 * torch.rand(N_ROWS, *HW)).half()
    else:
        probe = SegProbe(DIM, num_classes=classes)
        tgt = torch.randint(0, classes, (N_ROWS, *HW)).to(torch.uint8)
    probe.to(dev).train()
    spec = default_spec(task, 795)
    opt = _optimizer(probe, spec, dev)
    norm = {"weight": torch.ones(DIM), "bias": torch.zeros(DIM), "eps": torch.tensor([1e-6], dtype=torch.float64)}
    step = _Step(probe, opt, spec, GRID, norm, dev)
    tokens = torch.randn(N_ROWS, 1 + GRID[0] * GRID[1], DIM).half().to(dev)
    return {"probe": probe, "opt": opt, "spec": spec, "step": step, "tokens": tokens, "target": tgt.to(dev),
            "stream": torch.cuda.Stream(dev)}


def capture(r):
    idx = torch.arange(r["spec"].batch, device=dev)
    tok, tgt = r["tokens"].index_select(0, idx), r["target"].index_select(0, idx)
    s = r["stream"]
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for k in range(3):
            r["opt"].zero_grad(set_to_none=True)
            r["step"](tok, tgt, 200 + k)
    torch.cuda.current_stream().wait_stream(s)
    r["buf"] = (tok.clone(), tgt.clone())
    r["opt"].zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        r["step"](r["buf"][0], r["buf"][1], 300)
    r["graph"] = g
    r["perm"] = torch.randperm(N_ROWS, device=dev)
    return r


def tick(r, i, with_data=True):
    with torch.cuda.stream(r["stream"]):
        if with_data:
            b = r["spec"].batch
            j = (i * b) % (N_ROWS - b)
            idx = r["perm"][j:j + b]
            torch.index_select(r["tokens"], 0, idx, out=r["buf"][0])
            torch.index_select(r["target"], 0, idx, out=r["buf"][1])
            _set_lr(r["opt"], 1e-4 * (1 - i / 1e6))
        r["graph"].replay()


def rate(runs, steps=400, with_data=True):
    for i in range(20):
        for r in runs:
            tick(r, i, with_data)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        for r in runs:
            tick(r, i, with_data)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return steps * len(runs) / dt, steps / dt


def profile_step(r, name):
    from torch.profiler import ProfilerActivity, profile

    tok, tgt = r["buf"]
    for k in range(3):
        r["opt"].zero_grad(set_to_none=True)
        r["step"](tok, tgt, 400)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in range(10):
            r["opt"].zero_grad(set_to_none=True)
            r["step"](tok, tgt, 400)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.count >= 10:
            rows.append((t / 10 / 1000, e.count // 10, e.key[:90]))
    rows.sort(reverse=True)
    emit(what="kernels", probe=name, total_ms=round(sum(x[0] for x in rows), 3), n_kernels=sum(x[1] for x in rows),
         top=[(round(a, 4), c, k) for a, c, k in rows[:18]])


def _time(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / n * 1000, 4)


def micro():
    """fwd+bwd of the depth head's bin sum written three ways, and the seg resize in fp32 vs TF32."""
    from snd.eval.probes.resize import resize_bilinear

    bins = torch.linspace(1e-3, 10, 256, device=dev)
    x = torch.randn(2, 136, 180, 256, device=dev, requires_grad=True)

    def a():
        r = torch.relu(x)
        nd = r @ torch.stack([bins, torch.ones_like(bins)], 1)
        nd.sum().backward()

    def b():
        r = torch.relu(x)
        m = torch.zeros(256, 8, device=dev)
        m[:, 0], m[:, 1] = bins, 1
        (r @ m).sum().backward()

    def c():
        r = torch.relu(x)
        ((r * bins).sum(-1) + r.sum(-1)).sum().backward()

    emit(what="bin_sum_ms", matmul2=_time(a), matmul8=_time(b), two_sums=_time(c))
    z = torch.randn(2, 150, 34, 45, device=dev, requires_grad=True)
    res = {}
    for tf in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf
        res["tf32" if tf else "fp32"] = _time(lambda: resize_bilinear(z, (476, 630), channels_last=True).sum().backward())
    torch.backends.cuda.matmul.allow_tf32 = False
    emit(what="seg_resize_fwd_bwd_ms", **res)


def main():
    emit(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    singles = {}
    for name, task, cls in (("depth", "depth", 0), ("seg150", "seg", 150), ("seg21", "seg", 21)):
        r = capture(make(task, cls))
        profile_step(r, name)
        agg, per = rate([r])
        agg_nd, _ = rate([r], with_data=False)
        singles[name] = agg
        emit(what="single", probe=name, it_s=round(agg, 1), it_s_replay_only=round(agg_nd, 1))
        del r
        torch.cuda.empty_cache()
    for combo in (["depth"] * 2, ["depth"] * 4, ["seg150"] * 2, ["seg150"] * 4, ["depth", "depth", "depth", "seg150", "seg150", "seg21"]):
        runs = [capture(make("depth" if c == "depth" else "seg", 150 if c == "seg150" else 21)) for c in combo]
        agg, per = rate(runs, steps=300)
        # what the same work takes one probe after another, from the single rates
        serial = 1 / sum(1 / singles[c] for c in combo) * len(combo)
        emit(what="concurrent", combo=combo, agg_it_s=round(agg, 1), per_probe_it_s=round(per, 1),
             serial_agg_it_s=round(serial, 1), speedup=round(agg / serial, 2))
        del runs
        torch.cuda.empty_cache()

    micro()
    # backbone forward for feature extraction
    from snd.eval.features import extract_tokens, load_eval_backbone

    net = load_eval_backbone("dinov2_vits14", init="random").to(dev)
    for batch in (8, 32):
        x = torch.rand(batch, 3, *HW, device=dev)
        for mode in ("fp32", "tf32", "bf16"):
            for _ in range(3):
                extract_tokens(net, x, mode)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                extract_tokens(net, x, mode)
            torch.cuda.synchronize()
            emit(what="extract_forward", batch=batch, mode=mode, img_s=round(10 * batch / (time.perf_counter() - t0), 1))
    # row writer alone (the cache's disk path)
    import tempfile
    from pathlib import Path

    import numpy as np

    from snd.eval.rowstore import RowWriter

    work = Path(tempfile.mkdtemp())
    rows = np.random.rand(8, 1531, DIM).astype(np.float16)
    w = RowWriter(work / "t.zarr", work / "t.json", {"n": 256}, {"tokens": ((1531, DIM), "float16", None)}, 256)
    t0 = time.perf_counter()
    for _ in range(32):
        w.append({"tokens": rows})
    emit(what="row_writer_tokens", img_s=round(256 / (time.perf_counter() - t0), 1))
    d = (0.5 + 9 * np.random.rand(16, *HW)).astype(np.float16)
    w = RowWriter(work / "d.zarr", work / "d.json", {"n": 256}, {"target": (HW, "float16", "auto")}, 256)
    t0 = time.perf_counter()
    for _ in range(16):
        w.append({"target": d})
    emit(what="row_writer_depth_zstd", img_s=round(256 / (time.perf_counter() - t0), 1))


if __name__ == "__main__":
    sys.exit(main())
