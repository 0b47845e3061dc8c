"""`snd bench eval`: measured rates of the real code, and the projection's arithmetic."""
from __future__ import annotations

import json

import pytest

from snd.bench.eval import SUITE, bench, plan_training
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
            assert x["targets_s"] == pytest.approx(x["n_train"] / pr["targets_images_per_s"])
    assert {x.get("residency") for x in rows} >= {"device", "stream"}  # NYUv2 fits 51 MiB, ScanNet++ does not
    # ScanNet++ depth and seg were measured as one shared, streamed source
    assert by[("depth", "scannetpp")]["rows_shared_by"] == 2 and by[("depth", "scannetpp")]["residency"] == "stream"
    d = by[("depth", "nyuv2")]
    assert d["residency"] == "device"
    assert d["features_s"] == pytest.approx((795 + 654) / m["extract_images_per_s"])
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
    assert r["protocol"] == "paper" and P["suite_hours_one_model"] < r["paper"]["suite_hours_paper_implemented"]
    assert {x["task"] for x in r["paper"]["rows"]} == {"depth", "normals", "seg", "correspondence"}
    from snd.bench.summary import eval_suite  # what scripts/gpu_next.sh prints reads real keys

    s = eval_suite(json.loads(out.read_text()))
    assert s["suite_hours_paper_implemented"] == round(r["paper"]["suite_hours_paper_implemented"], 3)
    assert s["suite_hours_one_model"] == round(P["suite_hours_one_model"], 3) and s["protocol"] == "paper"
    assert set(s["probe_iters_per_s_alone"]) == {"depth", "normals", "seg"}


def test_paper_projection_arithmetic_by_hand():
    """The paper protocol's extras from fixed rates: 14x14-pixel fast input (1 token), 100 images/s."""
    from snd.eval.bench_paper import GEONET_TRAINVAL, paper_projection

    rows = [
        {"task": "depth", "dataset": "nyuv2", "n_train": 795, "n_val": 654, "features_s": 1.0, "targets_s": 2.0,
         "train_s": 10.0, "eval_s": 3.0, "probe_iters": 100},
        {"task": "normals", "dataset": "nyuv2", "n_train": 795, "n_val": 654, "features_s": 0.0, "targets_s": 1.0,
         "train_s": 5.0, "eval_s": 2.0, "probe_iters": 50},
        {"task": "seg", "dataset": "voc", "n_train": 1464, "n_val": 1449, "features_s": 4.0, "targets_s": 1.0,
         "train_s": 7.0, "eval_s": 1.0, "probe_iters": 320_000},
        {"task": "correspondence", "dataset": "scannet1500", "n_train": 0, "n_val": 1500, "features_s": 30.0,
         "targets_s": 0.0, "train_s": 0.0, "eval_s": 5.0},
    ]
    probes = {"normals": {"batch": 8, "train_iters_per_s_alone": {"stream": 50.0}}, "seg": {"batch": 2}}
    parts = {"features_s": 35.0, "targets_s": 4.0, "train_s": 22.0, "eval_s": 11.0}
    P = paper_projection(rows, hw=(14, 14), extract_rate=100.0, probes=probes, fast_parts=parts)
    by = {r["task"]: r for r in P["rows"]}
    assert by["depth"]["implemented_extra_s"] == {"flip_features_s": 6.54, "flip_eval_s": 3.0}
    assert by["normals"]["implemented_extra_s"]["test_features_490_s"] == pytest.approx(654 * 35 * 35 / 100)
    geo = 10 * GEONET_TRAINVAL * 1225 / 100 + 10 * GEONET_TRAINVAL / 8 / 50 - 5.0  # live GeoNet replaces fast training
    assert by["normals"]["implemented_extra_s"]["geonet_live_backbone_s"] == pytest.approx(10 * GEONET_TRAINVAL * 1225 / 100)
    assert by["normals"]["implemented_extra_s"]["geonet_probe_steps_s"] == pytest.approx(10 * GEONET_TRAINVAL / 8 / 50)
    seg = by["seg"]["implemented_extra_s"]  # live windows and live augmented training replace the seg caches
    assert seg["sliding_window_test_s"] == pytest.approx(1449 * 2 * 37 * 37 / 100)
    assert seg["augmented_live_training_s"] == pytest.approx(320_000 * 2 * 1369 / 100)
    assert seg["minus_fast_caching_s"] == -5.0 and by["seg"]["not_yet_implemented_s"] == {}
    assert by["correspondence"]["implemented_extra_s"]["pairs_at_490x644_s"] == pytest.approx(3000 * 35 * 46 / 100 - 30)
    seg_extra = 1449 * 2 * 1369 / 100 + 320_000 * 2 * 1369 / 100 - 5.0
    extra = 6.54 + 3.0 + 654 * 1225 / 100 + geo + 3000 * 1610 / 100 - 30 + seg_extra
    assert P["suite_hours_paper_implemented"] == pytest.approx((72.0 + extra) / 3600)
    assert P["per_task_hours_fast"]["depth"] == pytest.approx(16.0 / 3600)
    assert P["per_task_hours_paper_implemented"]["depth"] == pytest.approx((16.0 + 9.54) / 3600)
    assert P["suite_hours_paper_all_rows"] == pytest.approx(P["suite_hours_paper_implemented"])
    assert P["per_task_hours_paper_implemented"]["seg"] == pytest.approx((13.0 + seg_extra) / 3600)
