"""The pieces `snd bench eval` measures, each through snd's real code on generated inputs at the real size.

Why its own module: the measurements (feature extraction per precision and its error, target caching,
one probe alone resident and streamed, a planned wave of probes trained together, correspondence
matching) are independent of how their rates are projected to the suite's time (`snd.bench.eval`).
Labels and images are random (speed does not depend on them).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from snd.bench.eval_suite import PlanGroup

__all__ = ["GeneratedImages", "steady_rate", "measure_extract", "measure_live", "token_error", "measure_probe",
           "measure_wave", "measure_corr"]


class GeneratedImages(torch.utils.data.Dataset):
    """n items at (H, W) with every probe target, cycling through a small pool generated once (so the
    benchmark times snd's code, not the generation of random numbers)."""

    POOL = 8

    def __init__(self, n: int, hw: tuple[int, int], classes: int = 150, seed: int = 0):
        self.n, self.hw = n, hw
        g = torch.Generator().manual_seed(seed)
        H, W = hw
        self.pool = [{"image": torch.rand(3, H, W, generator=g), "depth": 0.5 + 9 * torch.rand(H, W, generator=g),
                      "normals": torch.nn.functional.normalize(torch.randn(3, H, W, generator=g), dim=0),
                      "seg": torch.randint(0, classes, (H, W), generator=g)} for _ in range(min(n, self.POOL))]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.pool[i % len(self.pool)]


class _MemTokens:
    """Token rows in host memory (a `FeatureStore` stand-in): one per resident group, so groups stay apart."""

    def __init__(self, n: int, tokens: int, dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.t = torch.randn(n, tokens, dim, generator=g).half()

    def __len__(self) -> int:
        return len(self.t)

    def tokens(self, i: int) -> torch.Tensor:
        return self.t[i]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_rate(cache_pass: Callable[[int], object], n: int, device) -> tuple[float, float, object]:
    """(items/s at steady state, start-up seconds, the n-item pass's result) of a cache-writing pass, from two
    fresh passes of n // 4 and n items: rate = the difference in items over the difference in time.

    Why: each pass starts its DataLoader workers and fills its pipeline (about a second with 8 workers), and a
    benchmark of a few hundred generated images would spread that over every item as if it were per-item cost;
    a real split of 20k-140k images pays it once. The projection adds the start-up once per pass.
    `cache_pass(k)` writes a fresh cache of the first k items and returns what the caller keeps."""
    n0 = max(1, n // 4)
    times, out = [], None
    for k in (n0, n):
        _sync(device)
        t0 = time.perf_counter()
        out = cache_pass(k)
        _sync(device)
        times.append(time.perf_counter() - t0)
    dt = times[1] - times[0]
    if n <= n0 or dt <= 0:  # too few items (or noise) to separate the two: all of it counted per item
        return n / times[1], 0.0, out
    rate = (n - n0) / dt
    return rate, max(0.0, times[1] - n / rate), out


def measure_extract(net, hw, n, device, work: Path, precision: str, workers: int) -> tuple[float, float, object]:
    """(steady images/s, start-up s per pass, the n-image feature store) of `ensure_features` (`steady_rate`)."""
    from snd.eval.features import ensure_features
    from snd.stages.evaluate import EXTRACT_BATCH

    kw = dict(dataset_name="bench", split="train", img_hw=hw, batch=EXTRACT_BATCH, device=device, precision=precision,
              num_workers=workers)
    ensure_features(net, GeneratedImages(EXTRACT_BATCH, hw, seed=1), cache_dir=work / f"warm-{precision}", **kw)

    def cache_pass(k: int):
        return ensure_features(net, GeneratedImages(k, hw), cache_dir=work / f"features-{precision}-{k}", **kw)

    return steady_rate(cache_pass, n, device)


def token_error(net, hw, device, precision: str) -> dict:
    """Relative L2 error per token of `precision` against fp32, and of float16 storage (what the cache
    keeps) against fp32, on a few generated images.

    A randomly initialised DINOv2 has LayerScale 1e-5, so its blocks barely touch the tokens and any
    arithmetic error would vanish; the error is measured on a copy with every LayerScale at 1 (each block
    adds its full output: the worst case for error growing through the residual stream)."""
    import copy

    from snd.eval.features import extract_tokens

    net = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".gamma"):  # timm's LayerScale
                p.fill_(1.0)
    x = GeneratedImages(4, hw, seed=3)
    imgs = torch.stack([x[i]["image"] for i in range(4)]).to(device)
    ref = extract_tokens(net, imgs, "fp32")
    got = extract_tokens(net, imgs, precision)

    def rel(a):
        return ((a - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).flatten()

    e, h = rel(got), rel(ref.half().float())
    return {"median": float(e.median()), "max": float(e.max()), "float16_storage_median": float(h.median())}


def _probe(task: str, dim: int, dataset: str):
    from snd.eval import datasets as D
    from snd.eval.probes import DepthProbe, NormalProbe, SegProbe
    from snd.stages.evaluate import _depth_range

    if task == "depth":
        lo, hi = _depth_range(dataset)
        return DepthProbe(dim, min_depth=lo, max_depth=hi)
    if task == "normals":
        return NormalProbe(dim)
    return SegProbe(dim, num_classes=D.num_classes(dataset) or 150, ignore_index=255)


def measure_probe(task: str, net, store, n: int, hw, grid, iters: int, device, work: Path, workers: int) -> tuple[dict, object]:
    """One probe alone: `iters` steps at the paper's batch size on cached tokens and cached targets, once
    with the rows held on the device and once streamed from the stores; evaluation on the same rows."""
    from snd.eval.features import final_norm_params
    from snd.eval.probes import ProbeData, default_spec, evaluate_probe, train_probe
    from snd.eval.probes.rows import row_bytes
    from snd.eval.targets import ensure_targets

    from snd.eval import datasets as D

    dim = int(net.embed_dim)
    spec = default_spec(task, 795)
    images = GeneratedImages(n, hw, classes=D.num_classes("scannetpp") or 150)  # the streamed split's labels
    targets_rate, targets_startup, targets = steady_rate(
        lambda k: ensure_targets(images, list(range(k)), task, cache_dir=work, dataset_name="bench", split="train",
                                 img_hw=hw, num_workers=workers), n, device)
    data = ProbeData(None, list(range(n)), task, store, targets=targets)
    norm = final_norm_params(net)
    rates, graph = {}, False
    for where in ("device", "stream"):
        kw = dict(grid=grid, norm=norm, device=device, residency=where, num_workers=workers)
        warm = 150 if device.type == "cuda" else 3  # on CUDA: past the depth loss's warm-up and the graph capture
        train_probe(_probe(task, dim, "scannetpp"), data, spec.with_overrides(iters=warm), **kw)
        _sync(device)
        t0 = time.perf_counter()
        out = train_probe(_probe(task, dim, "scannetpp"), data, spec.with_overrides(iters=iters), **kw)
        _sync(device)
        rates[where] = iters / (time.perf_counter() - t0)
        graph = bool(out.get("graph"))
    probe = _probe(task, dim, "scannetpp")
    t0 = time.perf_counter()
    evaluate_probe(probe, ProbeData(images, list(range(n)), task, store, with_image=True), grid=grid, norm=norm,
                   device=device, num_workers=workers)
    _sync(device)
    return ({"batch": spec.batch, "train_iters_per_s_alone": rates, "graph": graph, "row_bytes": row_bytes(data),
             "targets_images_per_s": targets_rate, "targets_startup_s": targets_startup,
             "eval_images_per_s": n / (time.perf_counter() - t0),
             "paper_iters": spec.iters}, targets)


def measure_wave(wave: list[PlanGroup], net, store, targets: dict, hw, grid, iters: int, device, workers: int,
                  pool: int) -> list[dict]:
    """Train one planned wave's probes together (`train_probes`) for `iters` steps each and return every
    probe's steady rate (steps/s between 15 % of the run and its end, after warm-up and graph capture)."""
    from snd.eval import datasets as D
    from snd.eval.features import final_norm_params
    from snd.eval.probes import ProbeData, default_spec
    from snd.eval.probes.train import ProbeJob, train_probes

    dim, T = int(net.embed_dim), 1 + grid[0] * grid[1]
    jobs, marks, rows = [], [], []
    for gi, g in enumerate(wave):
        if g.where == "stream":  # the real token and target caches, through DataLoader workers
            datas = [ProbeData(None, list(range(len(store))), t, store, targets=targets[t]) for t in g.tasks]
        else:  # rows of the real size, held on the device like the real split's
            mem = _MemTokens(pool, T, dim, seed=gi)
            items = GeneratedImages(pool, hw, classes=D.num_classes(g.dataset) or 150, seed=gi)
            datas = [ProbeData(items, list(range(pool)), t, mem) for t in g.tasks]
        for t, d in zip(g.tasks, datas):
            times: list[tuple[float, int]] = []
            spec = default_spec(t, 795).with_overrides(iters=iters)
            jobs.append(ProbeJob(_probe(t, dim, g.dataset), d, spec, residency=g.where,  # type: ignore[arg-type]
                                 progress=lambda s, n, l, times=times: times.append((time.perf_counter(), s))))
            marks.append(times)
            rows.append({"task": t, "dataset": g.dataset, "residency": g.where, "rows_shared_by": len(g.tasks)})
    start = time.perf_counter()
    train_probes(jobs, grid=grid, norm=final_norm_params(net), device=device, num_workers=workers)
    for r, times in zip(rows, marks):
        later = [(t, s) for t, s in times if s >= 0.15 * iters]
        if len(later) < 2:  # too few logged steps (short CPU runs): the whole run
            later = [(start, 0)] + times[-1:]
        (t0, s0), (t1, s1) = later[0], later[-1]
        r["iters_per_s"] = (s1 - s0) / max(t1 - t0, 1e-9)
    return rows


def measure_live(net, hw: tuple[int, int], batches: tuple[int, ...], device, precision: str,
                 steps: int = 20) -> dict[int, float]:
    """Images/s of the paper protocol's live forward (`extract_tokens` at `precision`, which `snd eval` takes from
    `--extract-precision` for live rows as for cached ones; no cache) at each probe batch.

    Why not the extraction rate: the live rows (augmented depth/seg training, GeoNet normals) forward a probe
    batch of 2 or 8 images and keep the tokens on the device, while extraction batches 32 images and spends
    most of its time on the host writing the cache (154.6 img/s on an H100 against ~560 for the backbone
    alone on an H200). Neither rate predicts the other, so the projection uses this one for the live rows."""
    from snd.eval.features import extract_tokens

    out = {}
    for b in batches:
        x = torch.rand(b, 3, *hw, device=device)
        for _ in range(3):  # warm-up: cuDNN/cuBLAS plans, the allocator
            extract_tokens(net, x, precision)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            extract_tokens(net, x, precision)
        _sync(device)
        out[b] = steps * b / (time.perf_counter() - t0)
    return out


def measure_corr(dim: int, grid: tuple[int, int], n_pairs: int, device, p: int = 14) -> float:
    """Pairs/s of the matcher at the probe's scale-0.25 grid with dense valid depth (p: the patch size)."""
    from snd.eval.correspondence import pair_errors

    h, w = grid[0] * p // 4, grid[1] * p // 4
    K = torch.tensor([[w * 0.8, 0, (w - 1) / 2], [0, w * 0.8, (h - 1) / 2], [0, 0, 1.0]], device=device)
    T = torch.eye(4, device=device)
    f = [torch.randn(2, dim, *grid, device=device) for _ in range(2)]
    d = 1 + torch.rand(h, w, device=device)
    pair_errors(f[0][0], f[0][1], d, d, K, K, T)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(n_pairs):
        pair_errors(f[i % 2][0], f[i % 2][1], d, d, K, K, T)
    _sync(device)
    return n_pairs / (time.perf_counter() - t0)
