"""Markdown report from fixed numbers: deltas, better/worse arrows per metric direction, paper columns."""
from __future__ import annotations

import torch

from snd.eval.figures import prediction_grid
from snd.eval.report import all_tables, delta_cell, task_table


def _rec(role, label, dataset, task, metrics, size="vits", protocol="paper"):
    return {"role": role, "label": label, "size": size, "dataset": dataset, "task": task, "metrics": metrics,
            "status": "ok", "protocol": protocol}


RECORDS = [
    _rec("model", "snd-run", "nyuv2", "depth", {"abs_rel": 0.1400, "rmse": 0.5000, "delta1": 0.80}),
    _rec("baseline", "dinov2_vits14", "nyuv2", "depth", {"abs_rel": 0.1500, "rmse": 0.4900, "delta1": 0.80}),
    _rec("model", "snd-run", "synth", "seg", {"aAcc": 90.0, "mIoU": 50.0, "mAcc": 60.0}),
    _rec("baseline", "dinov2_vits14", "synth", "seg", {"aAcc": 85.5, "mIoU": 52.25, "mAcc": 60.0}),
]


def test_delta_arrows_follow_metric_direction():
    assert delta_cell("depth", "abs_rel", 0.14, 0.15) == "−0.0100 ▲"  # lower AbsRel is better
    assert delta_cell("depth", "rmse", 0.50, 0.49) == "+0.0100 ▼"
    assert delta_cell("seg", "mIoU", 50.0, 52.25) == "−2.25 ▼"  # higher mIoU is better
    assert delta_cell("seg", "aAcc", 90.0, 85.5) == "+4.50 ▲"
    assert delta_cell("seg", "mAcc", 60.0, 60.0) == "0.00 ="
    assert delta_cell("seg", "mAcc", None, 60.0) == "–"


def test_depth_table_has_deltas_and_paper_numbers():
    md = task_table(RECORDS, "depth")
    header = next(ln for ln in md.splitlines() if ln.startswith("| dataset"))
    assert "model: snd-run" in header and "baseline: dinov2_vits14" in header
    assert "paper DINOv2 ViT-S" in header and "paper SnD ViT-S" in header
    row = next(ln for ln in md.splitlines() if "AbsRel" in ln)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["nyuv2", "AbsRel ↓", "0.1400", "0.1500", "−0.0100 ▲", "0.1476", "0.1406"]
    rmse = [c.strip() for c in next(ln for ln in md.splitlines() if "RMSE" in ln).strip("|").split("|")]
    assert rmse[4] == "+0.0100 ▼" and rmse[5:] == ["0.5210", "0.4912"]


def test_tables_name_the_protocol_and_fast_tables_show_no_paper_numbers():
    md = task_table(RECORDS, "depth")
    assert "### Monocular depth (protocol: paper)" in md
    fast = [dict(r, protocol="fast") for r in RECORDS]
    md = task_table(fast, "depth")
    assert "(protocol: fast)" in md and "paper DINOv2" not in md and "0.1476" not in md
    old = [{k: v for k, v in r.items() if k != "protocol"} for r in RECORDS]  # records from before protocols
    assert "(protocol: fast)" in task_table(old, "depth")
    mixed = [RECORDS[0], dict(RECORDS[1], protocol="fast")]
    assert "(protocol: mixed: fast, paper)" in task_table(mixed, "depth")


def test_seg_table_without_paper_cells_for_synth_and_combined_report():
    md = task_table(RECORDS, "seg")
    assert "paper DINOv2" not in md and "paper SnD" not in md  # the paper has no synth numbers
    row = [c.strip() for c in next(ln for ln in md.splitlines() if "mIoU" in ln).strip("|").split("|")]
    assert row == ["synth", "mIoU (%) ↑", "50.00", "52.25", "−2.25 ▼"]
    full = all_tables(RECORDS, ["depth", "normals", "seg"], notes=["normals: no dataset found under data — nyuv2: missing"])
    assert "### Monocular depth" in full and "### Semantic segmentation" in full
    assert "### Surface normals" not in full and "nyuv2: missing" in full


def test_model_only_table_has_no_delta_column():
    md = task_table([r for r in RECORDS if r["role"] == "model"], "seg")
    assert "Δ" not in md and "baseline" not in md


def test_prediction_grid_png(tmp_path):
    from PIL import Image

    s = [{"image": torch.rand(3, 8, 12), "gt": torch.rand(8, 12) + 1, "pred": torch.rand(8, 12) + 1} for _ in range(2)]
    p = prediction_grid("depth", {"model": s, "baseline": s}, tmp_path / "d.png", pad=2)
    im = Image.open(p)
    assert im.size == (4 * 12 + 5 * 2, 18 + 2 * 8 + 3 * 2)
