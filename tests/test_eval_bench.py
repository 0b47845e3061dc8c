"""`snd bench eval`: measured rates of the real code, and the projection's arithmetic."""
from __future__ import annotations

import json

import pytest

from snd.eval.bench import SUITE, bench
from snd.pipeline.config import BenchEvalConfig


def test_bench_eval_measures_and_projects(tmp_path, capsys):
    out = tmp_path / "bench_eval.json"
    r = bench(BenchEvalConfig(model="snd_test_vit_patch14", img_height=56, img_width=84, images=6, probe_iters=4,
                              corr_pairs=2, device="cpu", workdir=tmp_path / "w", out=out, workers=0,
                              resident_gib=0.05))
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
    m = r["measured"]
    assert m["extract_images_per_s"] > 0 and m["corr_pairs_per_s"] > 0
    assert set(m["probes"]) == {"depth", "normals", "seg"}
    assert m["probes"]["depth"]["batch"] == 2 and m["probes"]["depth"]["paper_iters"] == 307_200
    rows = r["projected"]["rows"]
    assert [(x["task"], x["dataset"]) for x in rows] == [(e.task, e.dataset) for e in SUITE]
    by = {(x["task"], x["dataset"]): x for x in rows}
    # a split trains on device-resident rows iff they fit the budget, at the rate measured that way
    budget = m["resident_budget_gib"] * 2**30
    assert budget == pytest.approx(0.05 * 2**30)
    for x in rows:
        if x["task"] != "correspondence":
            pr = m["probes"][x["task"]]
            assert set(pr["train_iters_per_s"]) == {"device", "stream"} and pr["row_bytes"] > 0
            assert x["residency"] == ("device" if x["n_train"] * pr["row_bytes"] <= budget else "stream")
            assert x["train_s"] == pytest.approx(x["probe_iters"] / pr["train_iters_per_s"][x["residency"]])
            assert x["targets_s"] == pytest.approx(x["n_train"] / pr["targets_images_per_s"])
    assert {x.get("residency") for x in rows} >= {"device", "stream"}  # NYUv2 fits 51 MiB, ScanNet++ does not
    d = by[("depth", "nyuv2")]
    assert d["residency"] == "device"
    assert d["features_s"] == pytest.approx((795 + 654) / m["extract_images_per_s"])
    assert d["eval_s"] == pytest.approx(654 / m["probes"]["depth"]["eval_images_per_s"])
    # features are cached once per dataset: ScanNet++ seg reuses the depth probe's
    assert by[("seg", "scannetpp")]["features_s"] == 0 and by[("depth", "scannetpp")]["features_s"] > 0
    n = by[("normals", "nyuv2")]
    assert n["probe_iters"] == 10 * -(-795 // 8) and n["features_s"] == 0  # NYUv2 features already cached
    total = sum(x["total_s"] for x in rows)
    assert r["projected"]["suite_hours_one_model"] == pytest.approx(total / 3600)
    assert r["projected"]["suite_hours_with_baseline"] == pytest.approx(2 * total / 3600)
