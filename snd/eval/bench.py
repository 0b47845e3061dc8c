"""`snd bench eval`: how long `snd eval all` takes on the real datasets' sizes, measured piece by piece.

Why measure pieces and project: the full suite is ~2 M probe iterations over ~240 k images; no one call to
the lent GPU (10 min) can run it. So each piece runs through snd's real code on generated inputs at the
real image size and batch — feature extraction with cache writes (`ensure_features`), probe training on
cached features (`train_probe`, the paper's batch sizes), probe evaluation (`evaluate_probe`), and
correspondence matching (`pair_errors`) — for a bounded count, and the suite's time is projected as
Σ size / measured rate with the real sizes and schedules below. The JSON marks what was measured and what
is projected. Labels are random (speed does not depend on them); the images are random too.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from snd.pipeline.config import BenchEvalConfig

__all__ = ["SUITE", "bench"]


@dataclass(frozen=True)
class Entry:
    """One (task, dataset) of the suite with its real size (images; correspondence: pairs)."""

    task: str
    dataset: str
    n_train: int
    n_val: int
    source: str


# Real sizes (../shared/reference/snd-facts.md "Probing", the official split files).
SUITE: tuple[Entry, ...] = (
    Entry("depth", "scannetpp", 140_451, 30_638, "230/50 ScanNet++ scenes, all DSLR views"),
    Entry("depth", "nyuv2", 795, 654, "NYUv2 labelled, standard split"),
    Entry("depth", "scannet", 20_000, 5_000, "scannet_frames_25k, random 80/20"),
    Entry("depth", "kitti", 23_158, 652, "KITTI Eigen split"),
    Entry("normals", "nyuv2", 795, 654, "NYUv2 labelled"),
    Entry("seg", "scannetpp", 140_451, 30_638, "ScanNet++ (features shared with depth)"),
    Entry("seg", "ade20k", 20_210, 2_000, "ADE20k official"),
    Entry("seg", "voc", 1_464, 1_449, "Pascal VOC 2012 official"),
    Entry("correspondence", "scannet1500", 0, 1_500, "ScanNet-1500 pairs (SuperGlue list)"),
)


class _Images(torch.utils.data.Dataset):
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_extract(net, hw, n, device, work: Path) -> tuple[float, object]:
    from snd.eval.features import ensure_features
    from snd.stages.evaluate import EXTRACT_BATCH

    ds = _Images(n, hw)
    warm = ensure_features(net, _Images(EXTRACT_BATCH, hw, seed=1), cache_dir=work / "warm", dataset_name="bench",
                           split="train", img_hw=hw, batch=EXTRACT_BATCH, device=device)
    del warm
    _sync(device)
    t0 = time.perf_counter()
    store = ensure_features(net, ds, cache_dir=work / "features", dataset_name="bench", split="train", img_hw=hw,
                            batch=EXTRACT_BATCH, device=device)
    _sync(device)
    return n / (time.perf_counter() - t0), store


def _probe(task: str, dim: int, dataset: str):
    from snd.eval.probes import DepthProbe, NormalProbe, SegProbe
    from snd.stages.evaluate import _depth_range

    if task == "depth":
        lo, hi = _depth_range(dataset)
        return DepthProbe(dim, min_depth=lo, max_depth=hi)
    if task == "normals":
        return NormalProbe(dim)
    return SegProbe(dim, num_classes=150, ignore_index=255)


def _measure_probe(task: str, net, store, n: int, hw, grid, iters: int, device, work: Path, workers: int) -> dict:
    """Train `iters` steps at the paper's batch size on cached tokens and cached targets, once with the
    rows held on the device and once streamed from the stores; evaluate on the same rows."""
    from snd.eval.features import final_norm_params
    from snd.eval.probes import ProbeData, default_spec, evaluate_probe, train_probe
    from snd.eval.probes.rows import row_bytes
    from snd.eval.targets import ensure_targets

    dim = int(net.embed_dim)
    spec = default_spec(task, 795)
    images = _Images(n, hw)
    _sync(device)
    t0 = time.perf_counter()
    targets = ensure_targets(images, list(range(n)), task, cache_dir=work, dataset_name="bench", split="train",
                             img_hw=hw, num_workers=workers)
    targets_rate = n / (time.perf_counter() - t0)
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
    return {"batch": spec.batch, "train_iters_per_s": rates, "graph": graph, "row_bytes": row_bytes(data),
            "targets_images_per_s": targets_rate, "eval_images_per_s": n / (time.perf_counter() - t0),
            "paper_iters": spec.iters}


def _measure_corr(dim: int, grid: tuple[int, int], n_pairs: int, device) -> float:
    """Pairs/s of the matcher at the probe's scale-0.25 grid with dense valid depth."""
    from snd.eval.correspondence import pair_errors

    h, w = grid[0] * 14 // 4, grid[1] * 14 // 4
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


def bench(cfg: BenchEvalConfig) -> dict:
    """Measure the pieces, project the suite (both models: `snd eval all` with a --baseline doubles the
    feature and probe work), print and return the JSON."""
    from snd.eval.features import load_eval_backbone
    from snd.pipeline.device import resolve_device

    device = resolve_device(cfg.device)
    hw = (cfg.img_height, cfg.img_width)
    net = load_eval_backbone(cfg.model, weights=cfg.weights, init=cfg.init).to(device).eval()
    p = 14
    grid = (hw[0] // p, hw[1] // p)
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="snd-bench-eval-"))
    t_start = time.perf_counter()
    extract_rate, store = _measure_extract(net, hw, cfg.images, device, work)
    probes = {t: _measure_probe(t, net, store, cfg.images, hw, grid, cfg.probe_iters, device, work, cfg.workers)
              for t in ("depth", "normals", "seg")}
    corr_rate = _measure_corr(int(net.embed_dim), grid, cfg.corr_pairs, device)
    measured_s = time.perf_counter() - t_start

    from snd.eval.probes.rows import budget_bytes

    budget = budget_bytes(device, cfg.resident_gib)  # the resident-rows budget `snd eval` would use here
    rows, total = [], 0.0
    feats_done: set[str] = set()
    for e in SUITE:
        row = asdict(e)
        if e.task == "correspondence":
            row.update(corr_pairs_per_s=corr_rate, features_s=2 * e.n_val / extract_rate, targets_s=0.0, train_s=0.0,
                       eval_s=e.n_val / corr_rate)
        else:
            pr = probes[e.task]
            feats = 0.0 if e.dataset in feats_done else (e.n_train + e.n_val) / extract_rate
            feats_done.add(e.dataset)
            iters = pr["paper_iters"] if e.task != "normals" else 10 * -(-e.n_train // pr["batch"])
            where = "device" if e.n_train * pr["row_bytes"] <= budget else "stream"
            rate = pr["train_iters_per_s"][where]
            row.update(features_s=feats, targets_s=e.n_train / pr["targets_images_per_s"], probe_iters=iters,
                       probe_batch=pr["batch"], residency=where, resident_gib=e.n_train * pr["row_bytes"] / 2**30,
                       train_s=iters / rate, eval_s=e.n_val / pr["eval_images_per_s"])
            if where == "stream":  # what the disk must deliver once the split outgrows the page cache
                row["stream_mb_per_s"] = rate * pr["batch"] * pr["row_bytes"] / 1e6
        row["total_s"] = row["features_s"] + row["targets_s"] + row["train_s"] + row["eval_s"]
        total += row["total_s"]
        rows.append(row)
    out = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "measured": {"img_hw": list(hw), "images": cfg.images, "extract_images_per_s": extract_rate,
                     "probes": probes, "corr_pairs_per_s": corr_rate, "probe_iters_timed": cfg.probe_iters,
                     "resident_budget_gib": budget / 2**30, "seconds": measured_s},
        "projected": {"rows": rows, "suite_hours_one_model": total / 3600,
                      "suite_hours_with_baseline": 2 * total / 3600,
                      "bottleneck": max(rows, key=lambda r: r["total_s"])["task"] + "/" +
                                    max(rows, key=lambda r: r["total_s"])["dataset"],
                      "median_row_s": statistics.median(r["total_s"] for r in rows)},
        "goal_hours": 2.0,
        "note": "measured = rates of snd's own code on generated inputs at the real size and batch; "
                "projected = real dataset sizes / measured rates (features cached once per dataset; "
                "ScanNet++ depth and seg share them; a split whose rows fit the budget trains on device-resident "
                "rows, a larger one at the streamed rate, measured from the page cache: stream_mb_per_s is what "
                "the disk must sustain for it); decoding real image and label files (features, targets) is not "
                "included",
    }
    from snd.pipeline.jsonout import emit_json

    return emit_json(out, cfg.out)
