"""`snd bench eval`: how long `snd eval all` takes on the real datasets' sizes, measured piece by piece.

Why measure pieces and project: the full suite is ~2 M probe iterations over ~240 k images; no one call to
the lent GPU (10 min) can run it. So each piece runs through snd's real code on generated inputs at the
real image size and batch, for a bounded count (`snd.bench.eval_measure`), and the suite's time is
projected here from the measured rates with the real sizes and schedules (`snd.bench.eval_suite`):

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
from dataclasses import asdict
from pathlib import Path

import torch

from snd.bench.eval_measure import (measure_corr, measure_extract, measure_live, measure_probe,
                                    measure_wave, token_error)
from snd.bench.eval_suite import SUITE, plan_training, real_iters
from snd.pipeline.config import BenchEvalConfig

__all__ = ["bench"]


def bench(cfg: BenchEvalConfig) -> dict:
    """Measure the pieces, project the suite (a --baseline repeats the features, probes and evaluation; the
    target cache is model-independent and made once), print and return the JSON."""
    from snd.eval.features import PRECISIONS, load_eval_backbone
    from snd.eval.probes.rows import budget_bytes
    from snd.pipeline.device import resolve_device

    from snd.models.backbone import PROBE_FRAME_HW, _unwrap, patch_size, with_input_hw

    device = resolve_device(cfg.device)
    net = load_eval_backbone(cfg.model, weights=cfg.weights, init=cfg.init).to(device).eval()
    p = patch_size(_unwrap(net))
    cfg = with_input_hw(cfg, p, PROBE_FRAME_HW)  # `snd eval`'s default size for this backbone
    hw = (cfg.img_height, cfg.img_width)
    grid = (hw[0] // p, hw[1] // p)
    dim = int(net.embed_dim)
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="snd-bench-eval-"))
    t_start = time.perf_counter()
    extract, store = {}, None
    for prec in PRECISIONS:
        rate, startup, st = measure_extract(net, hw, cfg.images, device, work, prec, cfg.workers)
        extract[prec] = {"images_per_s": rate, "startup_s": startup,
                         "token_rel_error_vs_fp32": token_error(net, hw, device, prec)}
        if prec == cfg.extract_precision:
            store = st
    extract_rate = extract[cfg.extract_precision]["images_per_s"]
    extract_startup = extract[cfg.extract_precision]["startup_s"]  # once per cached split (steady_rate)
    probes, targets = {}, {}
    for t in ("depth", "normals", "seg"):
        probes[t], targets[t] = measure_probe(t, net, store, cfg.images, hw, grid, cfg.probe_iters, device, work,
                                               cfg.workers)
    budget = budget_bytes(device, cfg.resident_gib)  # the resident-rows budget `snd eval` would use here
    waves = plan_training(hw, 1 + grid[0] * grid[1], dim, budget)
    measured_waves = [measure_wave(w, net, store, targets, hw, grid, cfg.probe_iters, device, cfg.workers,
                                    pool=min(cfg.images, 64)) for w in waves]
    corr_rate = measure_corr(dim, grid, cfg.corr_pairs, device, p)
    live_batches = tuple(sorted({pr["batch"] for pr in probes.values()}))  # the paper protocol's live forwards
    # at the suite's precision (what the live rows run), and fp32 beside it (the official arithmetic's cost)
    live_by = {prec: measure_live(net, hw, live_batches, device, prec)
               for prec in dict.fromkeys((cfg.extract_precision, "fp32"))} if cfg.protocol == "paper" else {}
    live = live_by.get(cfg.extract_precision, {})
    measured_s = time.perf_counter() - t_start

    # ---- projection ----
    rate_of = {(r["task"], r["dataset"]): (wi, r) for wi, rs in enumerate(measured_waves) for r in rs}
    rows, feats_done = [], set()
    for e in SUITE:
        row = asdict(e)
        if e.task == "correspondence":
            row.update(corr_pairs_per_s=corr_rate, features_s=2 * e.n_val / extract_rate + extract_startup,
                       targets_s=0.0, train_s=0.0, eval_s=e.n_val / corr_rate)
        else:
            pr = probes[e.task]
            feats = 0.0 if e.dataset in feats_done else (e.n_train + e.n_val) / extract_rate + 2 * extract_startup
            feats_done.add(e.dataset)
            wi, wr = rate_of[e.task, e.dataset]
            iters = real_iters(e.task, e.n_train, pr["batch"])
            targets_s = e.n_train / pr["targets_images_per_s"] + pr["targets_startup_s"]
            row.update(features_s=feats, targets_s=targets_s, probe_iters=iters, probe_batch=pr["batch"],
                       residency=wr["residency"], wave=wi, rows_shared_by=wr["rows_shared_by"],
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
                     "live_images_per_s": {str(b): r for b, r in live.items()}, "live_precision": cfg.extract_precision,
                     "live_images_per_s_by_precision": {p: {str(b): r for b, r in v.items()} for p, v in live_by.items()},
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
                "real dataset sizes / measured rates. Feature and target caching rates are steady rates (two passes "
                "of different sizes), plus their start-up once per cached split. Features are cached once per "
                "dataset (ScanNet++ depth and seg share them); targets once per machine (model-independent, so a "
                "baseline does not repeat them). "
                "Training: the suite's probes in the groups and waves snd eval makes, each wave measured running "
                "together; a wave lasts as long as its slowest probe at the rate measured with all of them running "
                "(an upper bound). Streamed rows were read from the page cache; decoding real image and label files "
                "(features, targets) is not included.",
    }
    out["protocol"] = cfg.protocol
    if cfg.protocol == "paper":  # the paper protocol's extra passes and rows (`snd.eval.bench_paper`)
        from snd.bench.loaders import augment_rates
        from snd.eval.bench_paper import paper_projection
        from snd.stages.eval_plan import resolve_eval_workers

        # the live training sets' CPU side, with the workers `snd eval`'s default gives this machine
        out["paper"] = paper_projection(rows, hw=hw, extract_rate=extract_rate, probes=probes, fast_parts=parts,
                                        patch=p, live_rates=live, augment_rates=augment_rates(1.0, patch=p),
                                        workers=resolve_eval_workers("auto", device))
        # the other half of the live sets' augmentation: `device_augment` per batch, on the CPU (one thread, what
        # it would cost a worker) and on the training device (where `snd eval` runs it)
        from snd.bench.loaders import device_augment_rates

        da = {"cpu_1_thread": device_augment_rates(1.0, patch=p)}
        if torch.device(device).type == "cuda":
            da["device"] = device_augment_rates(1.0, patch=p, batch=16, device=device, threads=None)
        out["paper"]["device_augment_items_per_s"] = da
    if not all(math.isfinite(x) for x in parts.values()):
        raise RuntimeError(f"a projected part is not finite: {parts}")
    from snd.pipeline.jsonout import emit_json

    return emit_json(out, cfg.out)
