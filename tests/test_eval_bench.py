"""`snd bench eval`: measured rates of the real code, and the projection's arithmetic."""
from __future__ import annotations

import json
import math

import pytest
import torch

from snd.bench.eval import bench
from snd.bench.eval_suite import SUITE, plan_training
from snd.pipeline.config import BenchEvalConfig


def test_training_plan_groups_shared_rows_and_packs_waves_into_the_budget():
    hw, T, C = (476, 630), 1531, 384
    row = {"depth": T * C * 2 + 2 * 476 * 630, "seg": T * C * 2 + 476 * 630}
    waves = plan_training(hw, T, C, budget=131 * 2**30)  # an H200's free memory less 8 GiB
    groups = [g for w in waves for g in w]
    by = {(g.dataset, g.batch): g for g in groups}
    # ScanNet++ depth and seg read one copy of the rows (tokens once, both targets); too big: streamed
    spp = by["scannetpp", 2]
    assert sorted(spp.tasks) == ["depth", "seg"] and spp.row_bytes == row["depth"] + 476 * 630
    assert spp.where == "stream"
    # NYUv2 depth (batch 2) and normals (batch 8) cannot share a batch order: two groups
    assert by["nyuv2", 2].tasks == ["depth"] and by["nyuv2", 8].tasks == ["normals"]
    assert by["kitti", 2].need == 23_158 * row["depth"] and by["ade20k", 2].need == 20_210 * row["seg"]
    # everything else is resident and fits one wave on 131 GiB; on 60 GiB it takes more than one
    assert len(waves) == 1 and all(g.where == "device" for g in groups if g.dataset != "scannetpp")
    small = plan_training(hw, T, C, budget=60 * 2**30)
    assert len(small) > 1
    for w in small:
        assert sum(g.need for g in w if g.where == "device") <= 60 * 2**30


def test_bench_eval_measures_and_projects(tmp_path, capsys):
    out = tmp_path / "bench_eval.json"
    r = bench(BenchEvalConfig(model="snd_test_vit_patch14", img_height=56, img_width=84, images=6, probe_iters=4,
                              corr_pairs=2, device="cpu", workdir=tmp_path / "w", out=out, workers=0,
                              resident_gib=0.05))
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
    m = r["measured"]
    assert m["extract_images_per_s"] > 0 and m["corr_pairs_per_s"] > 0
    # the live forward (paper protocol) at each probe batch, and the projection pricing the live rows with it
    assert set(m["live_images_per_s"]) == {"2", "8"} and min(m["live_images_per_s"].values()) > 0
    # at the suite's --extract-precision (tf32 by default, what `snd eval`'s live rows run), fp32 beside it
    assert m["live_precision"] == "tf32" and r["paper"]["live_images_per_s"] == m["live_images_per_s"]
    assert set(m["live_images_per_s_by_precision"]) == {"tf32", "fp32"}
    assert m["live_images_per_s_by_precision"]["tf32"] == m["live_images_per_s"]
    assert set(m["extract"]) == {"fp32", "tf32", "bf16"}
    assert m["extract"]["fp32"]["token_rel_error_vs_fp32"]["max"] == 0.0  # fp32 against itself
    assert m["extract"]["bf16"]["token_rel_error_vs_fp32"]["median"] > 0  # bf16 autocast runs on CPU too
    assert set(m["probes"]) == {"depth", "normals", "seg"}
    assert m["probes"]["depth"]["batch"] == 2 and m["probes"]["depth"]["paper_iters"] == 307_200
    rows = r["projected"]["rows"]
    assert [(x["task"], x["dataset"]) for x in rows] == [(e.task, e.dataset) for e in SUITE]
    by = {(x["task"], x["dataset"]): x for x in rows}
    budget = m["resident_budget_gib"] * 2**30
    assert budget == pytest.approx(0.05 * 2**30)
    for x in rows:
        if x["task"] != "correspondence":
            pr = m["probes"][x["task"]]
            assert x["train_s"] == pytest.approx(x["probe_iters"] / x["iters_per_s_together"])
            assert x["train_s_alone"] == pytest.approx(x["probe_iters"] / pr["train_iters_per_s_alone"][x["residency"]])
            assert x["targets_s"] == pytest.approx(x["n_train"] / pr["targets_images_per_s"] + pr["targets_startup_s"])
    assert {x.get("residency") for x in rows} >= {"device", "stream"}  # NYUv2 fits 51 MiB, ScanNet++ does not
    # ScanNet++ depth and seg were measured as one shared, streamed source
    assert by[("depth", "scannetpp")]["rows_shared_by"] == 2 and by[("depth", "scannetpp")]["residency"] == "stream"
    d = by[("depth", "nyuv2")]
    assert d["residency"] == "device"
    startup = m["extract"][r["config"]["extract_precision"]]["startup_s"]  # once per cached split (train, val)
    assert d["features_s"] == pytest.approx((795 + 654) / m["extract_images_per_s"] + 2 * startup)
    assert d["eval_s"] == pytest.approx(654 / m["probes"]["depth"]["eval_images_per_s"])
    assert by[("seg", "scannetpp")]["features_s"] == 0 and by[("depth", "scannetpp")]["features_s"] > 0
    n = by[("normals", "nyuv2")]
    assert n["probe_iters"] == 10 * -(-795 // 8) and n["features_s"] == 0  # NYUv2 features already cached
    # a wave lasts as long as its slowest probe; the suite adds up its parts; a baseline repeats all but targets
    P = r["projected"]
    for wi, w in enumerate(P["waves"]):
        assert w["seconds"] == pytest.approx(max(x["train_s"] for x in rows if x.get("wave") == wi))
    parts = P["parts_s"]
    assert parts["train_s"] == pytest.approx(sum(w["seconds"] for w in P["waves"]))
    one = parts["features_s"] + parts["targets_s"] + parts["train_s"] + parts["eval_s"]
    assert P["suite_hours_one_model"] == pytest.approx(one / 3600)
    assert P["suite_hours_with_baseline"] == pytest.approx((2 * one - parts["targets_s"]) / 3600)
    # the paper protocol (the default) adds its projection beside the fast one
    assert r["protocol"] == "paper" and P["suite_hours_one_model"] < r["paper"]["suite_hours_paper"]
    assert {x["task"] for x in r["paper"]["rows"]} == {"depth", "normals", "seg", "correspondence"}
    from snd.bench.loaders import AUGMENT_FRAMES

    # the live sets' CPU side is measured and enters the live rows (every one: depth, seg, GeoNet normals)
    assert set(r["paper"]["augment_items_per_s_per_worker"]) == set(AUGMENT_FRAMES) and r["paper"]["workers"] >= 0
    assert set(r["paper"]["device_augment_items_per_s"]["cpu_1_thread"]) == set(AUGMENT_FRAMES)
    assert all("loader_wait_s" in x["extra_s_parts"] for x in r["paper"]["rows"] if x["task"] in ("seg", "normals"))
    assert r["paper"]["augment_core_hours"] > 0
    from snd.bench.summary import eval_suite  # what scripts/gpu_next.sh prints reads real keys

    s = eval_suite(json.loads(out.read_text()))
    assert s["suite_hours_paper"] == round(r["paper"]["suite_hours_paper"], 3)
    assert s["per_task_hours_paper"] == {t: round(v, 3) for t, v in r["paper"]["per_task_hours_paper"].items()}
    assert s["suite_hours_one_model"] == round(P["suite_hours_one_model"], 3) and s["protocol"] == "paper"
    assert set(s["probe_iters_per_s_alone"]) == {"depth", "normals", "seg"}
    assert s["augment_core_hours"] == round(r["paper"]["augment_core_hours"], 3) and s["workers"] == r["paper"]["workers"]
    assert set(s["augment_items_per_s_per_worker"]) == set(r["paper"]["augment_items_per_s_per_worker"])
    live = {f"{x['task']}/{x['dataset']}" for x in r["paper"]["rows"] if x["task"] in ("seg", "normals")}
    assert live <= set(s["loader"]) and all(v["workers_to_keep_up"] >= 1 for v in s["loader"].values())


def test_paper_projection_arithmetic_by_hand():
    """The paper protocol's extras from fixed rates: a one-patch fast input (14x14 for /14, 16x16 for /16),
    100 images/s, so every cost below is a token count read off the padded sizes by hand."""
    from snd.eval.bench_paper import GEONET_TRAINVAL, paper_projection

    rows = [
        {"task": "depth", "dataset": "nyuv2", "n_train": 795, "n_val": 654, "features_s": 1.0, "targets_s": 2.0,
         "train_s": 10.0, "eval_s": 3.0, "probe_iters": 100},
        {"task": "depth", "dataset": "kitti", "n_train": 100, "n_val": 10, "features_s": 1.1, "targets_s": 0.5,
         "train_s": 20.0, "eval_s": 2.0, "probe_iters": 100},
        {"task": "normals", "dataset": "nyuv2", "n_train": 795, "n_val": 654, "features_s": 0.0, "targets_s": 1.0,
         "train_s": 5.0, "eval_s": 2.0, "probe_iters": 50},
        {"task": "seg", "dataset": "voc", "n_train": 1464, "n_val": 1449, "features_s": 4.0, "targets_s": 1.0,
         "train_s": 7.0, "eval_s": 1.0, "probe_iters": 320_000},
        {"task": "correspondence", "dataset": "scannet1500", "n_train": 0, "n_val": 1500, "features_s": 30.0,
         "targets_s": 0.0, "train_s": 0.0, "eval_s": 5.0},
    ]
    probes = {"normals": {"batch": 8, "train_iters_per_s_alone": {"stream": 50.0}}, "seg": {"batch": 2},
              "depth": {"batch": 2}}
    parts = {"features_s": 36.1, "targets_s": 4.5, "train_s": 42.0, "eval_s": 13.0}
    fast_total = 36.1 + 4.5 + 42.0 + 13.0
    # tokens per image: (normals test = GeoNet square, KITTI KB crop, seg window, corr pair = NYU depth test frame,
    # depth training crop 416x544, KITTI's 352x704)
    for patch, (sq, kb, win, corr, crop, kcrop) in (
            (14, (35 * 35, 26 * 87, 37 * 37, 35 * 46, 30 * 39, 26 * 51)),  # 490², 364x1218, 518², 490x644, 420x546, 364x714
            (16, (30 * 30, 22 * 76, 32 * 32, 30 * 40, 26 * 34, 22 * 44))):  # 480², 352x1216, 512², 480x640, 416x544, 352x704
        P = paper_projection(rows, hw=(patch, patch), extract_rate=100.0, probes=probes, fast_parts=parts, patch=patch)
        by = {(r["task"], r["dataset"]): r["extra_s_parts"] for r in P["rows"]}
        assert set(P["rows"][0]) == {"task", "dataset", "extra_s_parts", "extra_s"} and P["patch"] == patch
        d = by["depth", "nyuv2"]  # the whole 480x640 test frame (and its flip); 100 live steps of 2 crops
        assert d == pytest.approx({"flip_features_s": 654 * corr / 100, "flip_eval_s": 3.0 * corr,
                                   "val_features_own_size_s": 654 * corr / 100,
                                   "augmented_live_training_s": 100 * 2 * crop / 100,
                                   "own_size_train_s": 10.0 * (crop - 1), "own_size_eval_s": 3.0 * (corr - 1),
                                   "minus_fast_caching_s": -3.0})
        k = by["depth", "kitti"]  # the whole KB crop on val and the flipped val, live 352x704 training crops
        assert k == pytest.approx({"flip_features_s": 10 * kb / 100, "flip_eval_s": 2.0 * kb,
                                   "val_features_own_size_s": 10 * kb / 100,
                                   "augmented_live_training_s": 100 * 2 * kcrop / 100,
                                   "own_size_train_s": 20.0 * (kcrop - 1), "own_size_eval_s": 2.0 * (kb - 1),
                                   "minus_fast_caching_s": -1.6})
        n = by["normals", "nyuv2"]  # 37,500 steps of 8 = 10 epochs of 30k, one live forward per image
        assert GEONET_TRAINVAL == 30_000 and n["geonet_live_backbone_s"] == pytest.approx(37_500 * 8 * sq / 100)
        assert n["geonet_probe_steps_s"] == pytest.approx(37_500 / 50)
        assert n["test_features_s"] == pytest.approx(654 * sq / 100) and n["test_eval_size_s"] == pytest.approx(2.0 * (sq - 1))
        assert n["minus_fast_training_s"] == -6.0  # its training and its normals targets are not run
        seg = by["seg", "voc"]  # live windows and live augmented training replace the seg caches
        assert seg == pytest.approx({"sliding_window_test_s": 1449 * 2 * win / 100,
                                     "augmented_live_training_s": 320_000 * 2 * win / 100, "minus_fast_caching_s": -5.0})
        assert by["correspondence", "scannet1500"] == pytest.approx({"pairs_at_paper_size_s": 3000 * corr / 100 - 30})
        extra = {"depth": sum(d.values()) + sum(k.values()), "normals": sum(n.values()), "seg": sum(seg.values()),
                 "correspondence": 3000 * corr / 100 - 30}
        assert P["per_task_extra_hours"] == pytest.approx({t: v / 3600 for t, v in extra.items()})
        assert P["suite_hours_paper"] == pytest.approx((fast_total + sum(extra.values())) / 3600)
        assert P["per_task_hours_fast"]["depth"] == pytest.approx((16.0 + 23.6) / 3600)
        assert P["per_task_hours_paper"]["seg"] == pytest.approx((13.0 + extra["seg"]) / 3600)


def _live_rows() -> tuple[list[dict], dict, dict]:
    """A fast projection's rows, probe rates and parts for one live set of each task (NYUv2 depth, VOC seg,
    NYUv2 normals), in round numbers for the hand-computed paper projections below."""
    rows = [{"task": "depth", "dataset": "nyuv2", "n_train": 795, "n_val": 654, "features_s": 1.0, "targets_s": 2.0,
             "train_s": 10.0, "eval_s": 3.0, "probe_iters": 100},
            {"task": "seg", "dataset": "voc", "n_train": 1464, "n_val": 1449, "features_s": 4.0, "targets_s": 1.0,
             "train_s": 7.0, "eval_s": 1.0, "probe_iters": 320_000},
            {"task": "normals", "dataset": "nyuv2", "n_train": 795, "n_val": 654, "features_s": 0.0,
             "targets_s": 1.0, "train_s": 5.0, "eval_s": 2.0, "probe_iters": 50}]
    probes = {"normals": {"batch": 8, "train_iters_per_s_alone": {"stream": 50.0}}, "seg": {"batch": 2},
              "depth": {"batch": 2}}
    return rows, probes, {"features_s": 5.0, "targets_s": 4.0, "train_s": 22.0, "eval_s": 6.0}


def test_paper_projection_live_rows_use_the_measured_live_rate():
    """With live rates (images/s of the fp32 live forward per probe batch at the fast size), the augmented depth
    and seg rows and GeoNet's backbone are priced at them; every cached pass keeps the extraction rate
    (by hand, /14, 1-patch input)."""
    from snd.eval.bench_paper import paper_projection

    rows, probes, parts = _live_rows()
    kw = dict(hw=(14, 14), extract_rate=100.0, probes=probes, fast_parts=parts, patch=14)
    P = paper_projection(rows, live_rates={2: 40.0, 8: 400.0}, **kw)
    plain = paper_projection(rows, **kw)
    by = {(r["task"], r["dataset"]): r["extra_s_parts"] for r in P["rows"]}
    old = {(r["task"], r["dataset"]): r["extra_s_parts"] for r in plain["rows"]}
    crop, win, sq, corr = 30 * 39, 37 * 37, 35 * 35, 35 * 46  # 420x546, 518², 490², 490x644 padded inputs
    assert by["depth", "nyuv2"]["augmented_live_training_s"] == pytest.approx(100 * 2 * crop / 40)
    assert old["depth", "nyuv2"]["augmented_live_training_s"] == pytest.approx(100 * 2 * crop / 100)
    assert by["seg", "voc"]["augmented_live_training_s"] == pytest.approx(320_000 * 2 * win / 40)
    assert by["normals", "nyuv2"]["geonet_live_backbone_s"] == pytest.approx(37_500 * 8 * sq / 400)
    assert by["depth", "nyuv2"]["flip_features_s"] == pytest.approx(654 * corr / 100)  # cached: extraction rate
    assert by["seg", "voc"]["sliding_window_test_s"] == old["seg", "voc"]["sliding_window_test_s"]
    assert P["live_images_per_s"] == {"2": 40.0, "8": 400.0} and plain["live_images_per_s"] is None


def test_paper_projection_waits_for_the_loader_where_the_workers_are_slower_than_the_gpu():
    """Live rows with measured augmentation rates: a row waits `loader_wait_s` = items / (rate x workers) minus
    its GPU parts when that is positive; the CPU time of every live item is summed (by hand, /14, 1-patch input)."""
    from snd.eval.bench_paper import paper_projection

    rows, probes, parts = _live_rows()
    rates = {"depth_nyuv2": 10.0, "seg": 0.001, "normals": 100.0}
    P = paper_projection(rows, hw=(14, 14), extract_rate=100.0, probes=probes, fast_parts=parts, patch=14,
                         augment_rates=rates, workers=4)
    by = {(r["task"], r["dataset"]): r["extra_s_parts"] for r in P["rows"]}
    crop, win, sq = 30 * 39, 37 * 37, 35 * 35  # 420x546, 518x518, 490x490 padded inputs
    assert by["depth", "nyuv2"]["loader_wait_s"] == 0.0  # 200 items / 40 per s = 5 s < the GPU's 2*crop + 10*(crop-1)
    gpu_seg = 320_000 * 2 * win / 100
    assert by["seg", "voc"]["loader_wait_s"] == pytest.approx(640_000 / (0.001 * 4) - gpu_seg)
    assert by["normals", "nyuv2"]["loader_wait_s"] == 0.0  # 300,000 / 400 = 750 s < 37,500 * 8 * sq / 100 + 750
    assert P["augment_core_hours"] == pytest.approx((200 / 10 + 640_000 / 0.001 + 300_000 / 100) / 3600)
    keep = {(r["task"], r["dataset"]): r["workers_to_keep_up"] for r in P["rows"] if "workers_to_keep_up" in r}
    gpu_depth = 100 * 2 * crop / 100 + 10 * (crop - 1)
    gpu_normals = 37_500 * 8 * sq / 100 + 37_500 / 50
    assert keep == {("depth", "nyuv2"): math.ceil(200 / (10 * gpu_depth)),  # = 1: the GPU is far slower
                    ("seg", "voc"): math.ceil(640_000 / (0.001 * gpu_seg)),
                    ("normals", "nyuv2"): math.ceil(300_000 / (100 * gpu_normals))}
    assert keep["seg", "voc"] > 4 and keep["depth", "nyuv2"] == 1  # waits with 4 workers <=> needs more than 4
    assert P["workers"] == 4 and P["augment_items_per_s_per_worker"] == rates
    plain = paper_projection(rows, hw=(14, 14), extract_rate=100.0, probes=probes, fast_parts=parts, patch=14)
    assert all("loader_wait_s" not in r["extra_s_parts"] for r in plain["rows"]) and plain["augment_core_hours"] == 0
    assert P["suite_hours_paper"] - plain["suite_hours_paper"] == pytest.approx(by["seg", "voc"]["loader_wait_s"] / 3600)


def test_augment_rates_measure_every_live_set():
    from snd.bench.loaders import AUGMENT_FRAMES, augment_rates, workers_needed

    r = augment_rates(0.01)
    assert set(r) == set(AUGMENT_FRAMES) and all(v > 0 for v in r.values())
    from snd.bench.loaders import device_augment_rates  # the batched half, on the CPU here

    r = device_augment_rates(0.01, batch=2)
    assert set(r) == set(AUGMENT_FRAMES) and all(v > 0 for v in r.values())
    assert workers_needed(25.0, 100.0, 2) == 8 and workers_needed(1000.0, 1.0, 2) == 1


def test_steady_rate_separates_start_up_from_per_item_cost(monkeypatch):
    """A pass costing 1.5 s of start-up + 4 ms per item: two passes (n/4 and n items) give 250 items/s and
    1.5 s of start-up, where one pass of 256 items would have reported 256 / 2.524 = 101 items/s."""
    import snd.bench.eval_measure as em

    clock = [0.0]
    monkeypatch.setattr(em.time, "perf_counter", lambda: clock[0])

    def cache_pass(k):
        clock[0] += 1.5 + 0.004 * k
        return f"store of {k}"

    rate, startup, out = em.steady_rate(cache_pass, 256, torch.device("cpu"))
    assert rate == pytest.approx(250.0) and startup == pytest.approx(1.5) and out == "store of 256"
    # a pass too small to split (n // 4 == n) or a second pass no slower than the first: all counted per item
    assert em.steady_rate(cache_pass, 1, torch.device("cpu"))[:2] == (pytest.approx(1 / 1.504), 0.0)

    def flat(k):  # both passes take 2 s
        clock[0] += 2.0

    assert em.steady_rate(flat, 8, torch.device("cpu"))[:2] == (pytest.approx(4.0), 0.0)
