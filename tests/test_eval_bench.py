"""`snd bench eval`: measured rates of the real code, and the projection's arithmetic."""
from __future__ import annotations

import json

import pytest

from snd.eval.bench import SUITE, bench
from snd.pipeline.config import BenchEvalConfig


def test_bench_eval_measures_and_projects(tmp_path, capsys):
    out = tmp_path / "bench_eval.json"
    r = bench(BenchEvalConfig(model="snd_test_vit_patch14", img_height=56, img_width=84, images=6, probe_iters=4,
                              corr_pairs=2, device="cpu", workdir=tmp_path / "w", out=out))
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
    m = r["measured"]
    assert m["extract_images_per_s"] > 0 and m["corr_pairs_per_s"] > 0
    assert set(m["probes"]) == {"depth", "normals", "seg"}
    assert m["probes"]["depth"]["batch"] == 2 and m["probes"]["depth"]["paper_iters"] == 307_200
    rows = r["projected"]["rows"]
    assert [(x["task"], x["dataset"]) for x in rows] == [(e.task, e.dataset) for e in SUITE]
    by = {(x["task"], x["dataset"]): x for x in rows}
    d = by[("depth", "nyuv2")]
    assert d["train_s"] == pytest.approx(307_200 / m["probes"]["depth"]["train_iters_per_s"])
    assert d["features_s"] == pytest.approx((795 + 654) / m["extract_images_per_s"])
    assert d["eval_s"] == pytest.approx(654 / m["probes"]["depth"]["eval_images_per_s"])
    # features are cached once per dataset: ScanNet++ seg reuses the depth probe's
    assert by[("seg", "scannetpp")]["features_s"] == 0 and by[("depth", "scannetpp")]["features_s"] > 0
    n = by[("normals", "nyuv2")]
    assert n["probe_iters"] == 10 * -(-795 // 8) and n["features_s"] == 0  # NYUv2 features already cached
    total = sum(x["total_s"] for x in rows)
    assert r["projected"]["suite_hours_one_model"] == pytest.approx(total / 3600)
    assert r["projected"]["suite_hours_with_baseline"] == pytest.approx(2 * total / 3600)
