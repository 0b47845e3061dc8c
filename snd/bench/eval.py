"""`snd bench eval`: how long `snd eval all` takes on the real datasets' sizes, measured piece by piece.

Why measure pieces and project: the full suite is ~2 M probe iterations over ~240 k images; no one call to
the lent GPU (10 min) can run it. So each piece runs through snd's real code on generated inputs at the
real image size and batch, for a bounded count, and the suite's time is projected from the measured rates
with the real sizes and schedules below:

* feature extraction with cache writes (`ensure_features`), at each precision, with the tokens' error
  against fp32 next to the float16 cache's own rounding;
* target caching (`ensure_targets`) and probe evaluation (`evaluate_probe`) per task;
* probe training as `snd eval` runs it: the suite's probes are planned into the same groups (probes over
  one dataset's rows share them) and waves (resident rows packed into the memory budget,
  `snd.eval.probes.train._waves`) as `train_probes` would make, and each wave is *run together* on
  generated rows of the real size (resident groups) or on the real token/target caches (streamed groups),
  giving each probe's rate when trained beside the others; a wave lasts as long as its slowest probe
  (an upper bound: probes that finish early leave the GPU to the rest). Each probe alone, resident and
  streamed, is timed too, for comparison;
* correspondence matching (`pair_errors`).

The JSON marks what was measured and what is projected. Labels and images are random (speed does not
depend on them).
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from snd.pipeline.config import BenchEvalConfig

__all__ = ["SUITE", "bench", "plan_training"]


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
TARGET_BYTES = {"depth": 2, "seg": 1, "normals": 6}  # per pixel, as `snd.eval.targets.STORED` caches them


@dataclass
class PlanGroup:
    """Probes of the suite over one dataset's rows at one batch size (what `train_probes` shares)."""

    dataset: str
    tasks: list[str]
    batch: int
    n_train: int
    row_bytes: int
    where: str = "device"

    @property
    def runs(self) -> list[str]:
        """One entry per probe (what `_waves` counts)."""
        return self.tasks

    @property
    def need(self) -> int:
        return self.n_train * self.row_bytes


def plan_training(hw: tuple[int, int], tokens_per_row: int, dim: int, budget: int) -> list[list[PlanGroup]]:
    """The suite's probes as `snd eval` trains them: groups (one per dataset and batch size), each resident
    when its rows fit the budget, packed into waves by `snd.eval.probes.train._waves`."""
    from snd.eval.probes import default_spec
    from snd.eval.probes.train import _waves

    groups: dict[tuple[str, int], PlanGroup] = {}
    for e in SUITE:
        if e.task == "correspondence":
            continue
        batch = default_spec(e.task, e.n_train).batch
        g = groups.setdefault((e.dataset, batch), PlanGroup(e.dataset, [], batch, e.n_train, tokens_per_row * dim * 2))
        g.tasks.append(e.task)
        g.row_bytes += TARGET_BYTES[e.task] * hw[0] * hw[1]
    for g in groups.values():
        g.where = "device" if g.need <= budget else "stream"
    return _waves(list(groups.values()), budget, None)  # type: ignore[arg-type]


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


def _measure_extract(net, hw, n, device, work: Path, precision: str, workers: int):
    from snd.eval.features import ensure_features
    from snd.stages.evaluate import EXTRACT_BATCH

    ds = _Images(n, hw)
    kw = dict(dataset_name="bench", split="train", img_hw=hw, batch=EXTRACT_BATCH, device=device, precision=precision,
              num_workers=workers)
    ensure_features(net, _Images(EXTRACT_BATCH, hw, seed=1), cache_dir=work / f"warm-{precision}", **kw)
    _sync(device)
    t0 = time.perf_counter()
    store = ensure_features(net, ds, cache_dir=work / f"features-{precision}", **kw)
    _sync(device)
    return n / (time.perf_counter() - t0), store


def _token_error(net, hw, device, precision: str) -> dict:
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
    x = _Images(4, hw, seed=3)
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


def _measure_probe(task: str, net, store, n: int, hw, grid, iters: int, device, work: Path, workers: int) -> tuple[dict, object]:
    """One probe alone: `iters` steps at the paper's batch size on cached tokens and cached targets, once
    with the rows held on the device and once streamed from the stores; evaluation on the same rows."""
    from snd.eval.features import final_norm_params
    from snd.eval.probes import ProbeData, default_spec, evaluate_probe, train_probe
    from snd.eval.probes.rows import row_bytes
    from snd.eval.targets import ensure_targets

    from snd.eval import datasets as D

    dim = int(net.embed_dim)
    spec = default_spec(task, 795)
    images = _Images(n, hw, classes=D.num_classes("scannetpp") or 150)  # the streamed split's labels
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
    return ({"batch": spec.batch, "train_iters_per_s_alone": rates, "graph": graph, "row_bytes": row_bytes(data),
             "targets_images_per_s": targets_rate, "eval_images_per_s": n / (time.perf_counter() - t0),
             "paper_iters": spec.iters}, targets)


def _measure_wave(wave: list[PlanGroup], net, store, targets: dict, hw, grid, iters: int, device, workers: int,
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
            items = _Images(pool, hw, classes=D.num_classes(g.dataset) or 150, seed=gi)
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


def _measure_corr(dim: int, grid: tuple[int, int], n_pairs: int, device, p: int = 14) -> float:
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


def _real_iters(task: str, n_train: int, batch: int) -> int:
    from snd.eval.probes import default_spec

    return default_spec(task, n_train).iters if task != "normals" else 10 * -(-n_train // batch)


def bench(cfg: BenchEvalConfig) -> dict:
    """Measure the pieces, project the suite (a --baseline repeats the features, probes and evaluation; the
    target cache is model-independent and made once), print and return the JSON."""
    from snd.eval.features import PRECISIONS, load_eval_backbone
    from snd.eval.probes.rows import budget_bytes
    from snd.pipeline.device import resolve_device

    device = resolve_device(cfg.device)
    hw = (cfg.img_height, cfg.img_width)
    net = load_eval_backbone(cfg.model, weights=cfg.weights, init=cfg.init).to(device).eval()
    from snd.models.backbone import _unwrap, patch_size

    p = patch_size(_unwrap(net))
    grid = (hw[0] // p, hw[1] // p)
    dim = int(net.embed_dim)
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="snd-bench-eval-"))
    t_start = time.perf_counter()
    extract, store = {}, None
    for prec in PRECISIONS:
        rate, st = _measure_extract(net, hw, cfg.images, device, work, prec, cfg.workers)
        extract[prec] = {"images_per_s": rate, "token_rel_error_vs_fp32": _token_error(net, hw, device, prec)}
        if prec == cfg.extract_precision:
            store = st
    extract_rate = extract[cfg.extract_precision]["images_per_s"]
    probes, targets = {}, {}
    for t in ("depth", "normals", "seg"):
        probes[t], targets[t] = _measure_probe(t, net, store, cfg.images, hw, grid, cfg.probe_iters, device, work,
                                               cfg.workers)
    budget = budget_bytes(device, cfg.resident_gib)  # the resident-rows budget `snd eval` would use here
    waves = plan_training(hw, 1 + grid[0] * grid[1], dim, budget)
    measured_waves = [_measure_wave(w, net, store, targets, hw, grid, cfg.probe_iters, device, cfg.workers,
                                    pool=min(cfg.images, 64)) for w in waves]
    corr_rate = _measure_corr(dim, grid, cfg.corr_pairs, device, p)
    measured_s = time.perf_counter() - t_start

    # ---- projection ----
    rate_of = {(r["task"], r["dataset"]): (wi, r) for wi, rs in enumerate(measured_waves) for r in rs}
    rows, feats_done = [], set()
    for e in SUITE:
        row = asdict(e)
        if e.task == "correspondence":
            row.update(corr_pairs_per_s=corr_rate, features_s=2 * e.n_val / extract_rate, targets_s=0.0, train_s=0.0,
                       eval_s=e.n_val / corr_rate)
        else:
            pr = probes[e.task]
            feats = 0.0 if e.dataset in feats_done else (e.n_train + e.n_val) / extract_rate
            feats_done.add(e.dataset)
            wi, wr = rate_of[e.task, e.dataset]
            iters = _real_iters(e.task, e.n_train, pr["batch"])
            row.update(features_s=feats, targets_s=e.n_train / pr["targets_images_per_s"], probe_iters=iters,
                       probe_batch=pr["batch"], residency=wr["residency"], wave=wi, rows_shared_by=wr["rows_shared_by"],
                       iters_per_s_together=wr["iters_per_s"], train_s=iters / wr["iters_per_s"],
                       train_s_alone=iters / pr["train_iters_per_s_alone"][wr["residency"]],
                       eval_s=e.n_val / pr["eval_images_per_s"])
        rows.append(row)
    wave_s = [max((r["train_s"] for r in rows if r.get("wave") == wi), default=0.0) for wi in range(len(waves))]
    parts = {k: sum(r[k] for r in rows) for k in ("features_s", "targets_s", "eval_s")}
    parts["train_s"] = sum(wave_s)
    parts["train_s_one_probe_at_a_time"] = sum(r.get("train_s_alone", 0.0) for r in rows)
    one = parts["features_s"] + parts["targets_s"] + parts["train_s"] + parts["eval_s"]
    per_model = one - parts["targets_s"]  # what a second backbone adds: its features, probes and evaluation
    out = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "measured": {"img_hw": list(hw), "images": cfg.images, "extract": extract, "extract_images_per_s": extract_rate,
                     "probes": probes, "waves": measured_waves, "corr_pairs_per_s": corr_rate,
                     "probe_iters_timed": cfg.probe_iters, "resident_budget_gib": budget / 2**30,
                     "seconds": measured_s},
        "projected": {"rows": rows,
                      "waves": [{"groups": [{"dataset": g.dataset, "tasks": g.tasks, "residency": g.where,
                                             "gib": g.need / 2**30} for g in w], "seconds": s}
                                for w, s in zip(waves, wave_s)],
                      "parts_s": parts,
                      "suite_hours_one_model": one / 3600,
                      "suite_hours_with_baseline": (one + per_model) / 3600,
                      "suite_hours_one_model_targets_cached": per_model / 3600,
                      "bottleneck": max(rows, key=lambda r: r["train_s"] + r["features_s"])["dataset"],
                      "median_row_s": statistics.median(r["features_s"] + r["targets_s"] + r["train_s"] + r["eval_s"]
                                                        for r in rows)},
        "goal_hours": 2.0,
        "note": "measured = rates of snd's own code on generated inputs at the real size and batch; projected = "
                "real dataset sizes / measured rates. Features are cached once per dataset (ScanNet++ depth and seg "
                "share them); targets once per machine (model-independent, so a baseline does not repeat them). "
                "Training: the suite's probes in the groups and waves snd eval makes, each wave measured running "
                "together; a wave lasts as long as its slowest probe at the rate measured with all of them running "
                "(an upper bound). Streamed rows were read from the page cache; decoding real image and label files "
                "(features, targets) is not included.",
    }
    out["protocol"] = cfg.protocol
    if cfg.protocol == "paper":  # the paper protocol's extra passes and rows (`snd.eval.bench_paper`)
        from snd.eval.bench_paper import paper_projection

        out["paper"] = paper_projection(rows, hw=hw, extract_rate=extract_rate, probes=probes, fast_parts=parts,
                                        patch=p)
    if not all(math.isfinite(x) for x in parts.values()):
        raise RuntimeError(f"a projected part is not finite: {parts}")
    from snd.pipeline.jsonout import emit_json

    return emit_json(out, cfg.out)
