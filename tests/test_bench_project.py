"""`snd bench project`: hours and disk of the paper-scale workflow from hand-written bench JSONs (expected
values computed by hand below), the choice of the newest file having each figure, and the sampler's frames
per pair on analytic cases."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from snd.bench.project import frames_per_pair, project
from snd.errors import SndError
from snd.pipeline.config import BenchProjectConfig
from tests._cli import run_cli

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
S = "vit_small_patch14_dinov2"


def _write(d: Path, name: str, obj: dict, age: int) -> Path:
    """A JSON whose mtime is `age` seconds in the past (tmp folders are not in git: mtime decides)."""
    p = d / name
    p.write_text(json.dumps(obj))
    t = 1_800_000_000 - age
    os.utime(p, (t, t))
    return p


def _pre(rate: float, e2e: float, n: int, device: str = H100, images: str | None = "lossless") -> dict:
    return {"source": {"name": "mvsplat"}, "device_name": device, "pairs_per_s": rate, "pairs_per_s_end_to_end": e2e,
            "pairs_total": n, "images": images, "batch_pairs": 8}


def _distill(paths: dict, protocol: str | None = "official", device: str = H100) -> dict:
    m = {"model": S, "device": device, "paths": {p: {"it_per_s": r, "warmup_s": w} for p, (r, w) in paths.items()}}
    if protocol:
        m["targets_protocol"] = protocol
    return {"config": {"compile": "auto"}, "models": [m]}


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bench"
    d.mkdir()
    _write(d, "bench_precompute_mvsplat_operators_h100.json", _pre(10.0, 8.0, 80), age=100)
    _write(d, "bench_precompute_mvsplat_operators_cpu.json", _pre(0.01, 0.01, 4, device="cpu"), age=1)  # never a rate
    _write(d, "bench_precompute_mvsplat_no_operator_h100.json", _pre(25.0, 20.0, 100, images=None), age=100)
    _write(d, "bench_distill_old_h100.json", _distill({"fast": (90.0, 50.0), "render": (10.0, 0.0)}, protocol=None), age=300)
    _write(d, "bench_distill_new_h100.json", _distill({"fast": (100.0, 100.0)}), age=200)
    _write(d, "bench_distill_snd_h100.json", _distill({"fast": (999.0, 0.0)}, protocol="snd"), age=10)  # not the default rules
    _write(d, "bench_eval_h200.json", {"device": H200, "projected": {"suite_hours_one_model": 1.5, "suite_hours_with_baseline": 2.5},
                                       "paper": {"suite_hours_paper": 4.0}}, age=50)
    _write(d, "store_size_cpu.json", {"device": "cpu", "runs": [
        {"source": "depth", "operator": False, "images": "jpeg", "split": _split(1.0, 0.0, 0.6, 0.2)},
        {"source": "mvsplat", "operator": True, "images": "lossless", "split": _split(6.0, 1.0, 1.5, 0.5, "grad")}]}, age=20)
    return d


def _split(s: float, o: float, f: float, mbf: float, frame_filter: str | None = None) -> dict:
    """A size split as `snd.cache.info.size_split` writes it (frame_filter: lossless frames' filter; v4 runs lacked it)."""
    out = {"mb_per_pair": {"scaffold": s, "operators": o, "frames": f}, "mb_per_frame": mbf}
    return out | ({"frame_filter": frame_filter} if frame_filter else {})


def test_frames_per_pair_analytic_cases():
    # 24 frames, gaps 8..12: 70 valid pairs, all kept; every frame is a context of some pair -> 24 / 70
    assert frames_per_pair(24, pairs_per_scene=0, targets_per_pair=3, gap_min=8, gap_max=12) == pytest.approx(24 / 70)
    assert frames_per_pair(24, pairs_per_scene=500, targets_per_pair=3, gap_min=8, gap_max=12) == pytest.approx(24 / 70)
    # one pair per scene: 2 contexts + 3 distinct targets strictly between them
    assert frames_per_pair(611, pairs_per_scene=1, targets_per_pair=3, gap_min=8, gap_max=12) == 5.0
    # the paper's sampler (180 of ~3,000 pairs on 611 frames) shares frames: fewer than 5 per pair, more than 24/70
    assert 2.0 < frames_per_pair(611, pairs_per_scene=180, targets_per_pair=3, gap_min=8, gap_max=12) < 3.2


def test_projection_hours_and_disk_by_hand(bench_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    r = project(BenchProjectConfig(bench_dir=bench_dir, frames_per_scene=24, out=out))  # 180 pairs/scene >= 70: all frames
    f = r["figures"]
    assert f["precompute_operators"]["file"].endswith("operators_h100.json")  # the newer _cpu.json is skipped for rates
    assert f["precompute_operators"]["warmup_s"] == pytest.approx(80 / 8 - 80 / 10)
    assert f["distill_fast"]["file"].endswith("new_h100.json") and f["distill_fast"]["value"] == 100.0  # snd rules skipped
    assert f["distill_render"]["file"].endswith("old_h100.json") and "before the official" in f["distill_render"]["note"]
    assert f["eval_suite"]["key"] == "paper.suite_hours_paper" and f["eval_suite"]["on_target_device"] is False
    d = r["workflows"]["default"]
    assert d["precompute_h"] == pytest.approx((2 + 50_000 / 10) / 3600)  # 1.3894 h
    assert d["distill_h"] == pytest.approx((100 + 50_000 / 100) / 3600)  # 0.1667 h
    assert d["eval_h"] == 4.0 and d["total_h"] == pytest.approx(5602 / 3600 + 4)
    n = r["workflows"]["no_operator"]
    assert n["precompute_h"] == pytest.approx((1 + 2000) / 3600) and n["distill_h"] == pytest.approx(5000 / 3600)
    assert r["workflow"]["frames_per_pair"] == pytest.approx(24 / 70)
    assert r["disk"]["lossless"]["mb_per_pair"] == pytest.approx(7 + 0.5 * 24 / 70)  # 7.171 MB
    assert r["disk"]["lossless"]["gb"] == pytest.approx((7 + 0.5 * 24 / 70) * 50)
    assert r["disk"]["jpeg"]["mb_per_pair"] == pytest.approx(7 + 0.2 * 24 / 70) and r["disk"]["jpeg"]["goal_met"]
    assert r["missing"] == {} and r["stand_ins_not_on_target_device"] == {"eval_suite": H200}
    assert "precompute_with_frames" in r["not_yet_measured"]  # the no-operator rate was measured without frames
    assert json.loads(out.read_text()) == r == json.loads(capsys.readouterr().out)


def test_disk_parts_from_the_best_source(bench_dir, tmp_path):
    """Operators' MB/pair: from the size JSON's MVSplat run with operators; without one, the difference of the
    GPU runs with and without operators; a GPU run that wrote frames and split its size gives every part."""
    split = _split
    size = tmp_path / "store_size_noop_cpu.json"
    size.write_text(json.dumps({"device": "cpu", "runs": [
        {"source": "mvsplat", "operator": False, "images": "jpeg", "split": split(6.0, 0.0, 0.6, 0.2)},
        {"source": "depth", "operator": True, "images": "lossless", "split": split(1.0, 0.3, 1.5, 0.5, "grad")}]}))
    pre = _pre(10.0, 8.0, 80) | {"mb_per_pair": 7.25}
    nop = _pre(25.0, 20.0, 100, images=None) | {"mb_per_pair": 6.5}
    (tmp_path / "pre.json").write_text(json.dumps(pre))
    (tmp_path / "nop.json").write_text(json.dumps(nop))
    cfg = dict(bench_dir=bench_dir, size=size, precompute=tmp_path / "pre.json", precompute_no_operator=tmp_path / "nop.json",
               frames_per_scene=24)
    r = project(BenchProjectConfig(**cfg))
    assert r["disk"]["jpeg"]["operators"] == pytest.approx(0.75) and "pre.json - " in r["disk_parts_from"]["operators"]
    assert r["disk"]["jpeg"]["mb_per_pair"] == pytest.approx(6.0 + 0.75 + 0.2 * 24 / 70)
    assert r["disk"]["lossless"]["mb_per_pair"] == pytest.approx(6.0 + 0.75 + 0.5 * 24 / 70)  # frames do not depend on the source
    (tmp_path / "pre.json").write_text(json.dumps(pre | {"images": "jpeg", "size_split": split(5.0, 2.0, 0.5, 0.25)}))
    r = project(BenchProjectConfig(**cfg))
    assert r["disk"]["jpeg"]["mb_per_pair"] == pytest.approx(5.0 + 2.0 + 0.25 * 24 / 70)
    assert r["disk"]["lossless"]["mb_per_pair"] == pytest.approx(5.0 + 2.0 + 0.5 * 24 / 70)
    assert r["disk_parts_from"]["frames"] == {"jpeg": str(tmp_path / "pre.json"), "lossless": str(size)}


def test_lossless_frames_of_the_row_filter_are_not_todays_size(bench_dir, tmp_path):
    """Lossless frames are stored with the v5 grad filter now: a run that recorded no filter (v4's row filter,
    ~17 % larger) gives no lossless MB/frame, even when newer, nor does a GPU run whose frames were row-filtered;
    its scaffold and operators still count."""
    import os
    import time

    newer = bench_dir / "store_size_row_cpu.json"
    newer.write_text(json.dumps({"device": "cpu", "runs": [
        {"source": "mvsplat", "operator": True, "images": "lossless", "split": _split(6.0, 1.0, 1.8, 0.6)}]}))
    os.utime(newer, (time.time() + 60, time.time() + 60))
    pre = tmp_path / "pre.json"
    pre.write_text(json.dumps(_pre(10.0, 8.0, 80) | {"size_split": _split(5.0, 2.0, 1.8, 0.6)}))  # row frames, lossless
    r = project(BenchProjectConfig(bench_dir=bench_dir, precompute=pre, frames_per_scene=24))
    assert r["figures"]["frames_lossless"]["file"].endswith("store_size_cpu.json")  # the older file, with grad frames
    assert r["disk"]["lossless"]["mb_per_pair"] == pytest.approx(5.0 + 2.0 + 0.5 * 24 / 70)
    assert r["disk_parts_from"]["frames"]["lossless"] == str(bench_dir / "store_size_cpu.json")
    (bench_dir / "store_size_cpu.json").unlink()
    newer.unlink()
    r = project(BenchProjectConfig(bench_dir=bench_dir, precompute=pre, frames_per_scene=24))
    assert "lossless" not in r["disk"] and "frames_lossless" in r["missing"]


def test_missing_figures_are_named_and_totals_left_open(tmp_path, bench_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = project(BenchProjectConfig(bench_dir=empty, eval_protocol="fast"))
    assert set(r["missing"]) == {"precompute_operators", "precompute_no_operator", "distill_fast", "distill_render",
                                 "eval_suite", "store_size", "frames_lossless", "frames_jpeg"}
    assert r["workflows"]["default"]["total_h"] is None and r["disk"] == {}
    # an explicit file without the figure: the newest file of the folder having it, noted; with none, missing, and
    # the paper protocol falls back to the fast protocol's hours
    ev = tmp_path / "bench_eval_fast_only.json"
    ev.write_text(json.dumps({"device": H100, "projected": {"suite_hours_one_model": 1.25}}))
    r = project(BenchProjectConfig(bench_dir=bench_dir, eval=ev))
    assert r["workflows"]["default"]["eval_h"] == 4.0 and "bench_eval_fast_only.json has no" in r["figures"]["eval_suite"]["note"]
    r = project(BenchProjectConfig(bench_dir=empty, eval=ev))
    assert "bench_eval_fast_only.json has no" in r["missing"]["eval_suite"]
    assert r["workflows"]["default"]["eval_h"] == 1.25 and r["workflows"]["default"]["figures"][2] == "eval_suite_fast"


def test_explicit_file_that_does_not_exist_is_one_clear_error(tmp_path, bench_dir, capsys):
    with pytest.raises(SndError, match="no bench JSON"):
        project(BenchProjectConfig(bench_dir=bench_dir, distill=tmp_path / "nope.json"))
    assert run_cli(["bench", "project", "--bench-dir", str(bench_dir), "--distill", str(tmp_path / "nope.json")]) != 0


def test_bench_precompute_reports_the_size_split_and_the_summary_reads_it(tmp_path):
    """`snd bench precompute --images jpeg` (operators on) on CPU at a tiny size: the JSON splits MB/pair into
    its three parts, and the summary scripts/gpu_next.sh prints reads its real keys."""
    from snd.bench.precompute import bench
    from snd.bench.summary import precompute as summary
    from snd.pipeline.config import BenchPrecomputeConfig

    out = tmp_path / "bp.json"
    r = bench(BenchPrecomputeConfig(source="depth", height=56, width=84, pairs=2, batch_pairs=1, images="jpeg",
                                    device="cpu", workdir=tmp_path / "w", out=out))
    sp = r["size_split"]
    assert r["operator"] is True and r["images"] == "jpeg" and r["pairs_total"] == sp["frames"] * sp["pairs_per_frame"]
    assert all(sp["mb_per_pair"][k] > 0 for k in ("scaffold", "operators", "frames"))
    assert sum(sp["mb_per_pair"].values()) <= r["mb_per_pair"]  # the arrays' bytes; the total adds Zarr metadata
    s = summary(json.loads(out.read_text()))
    assert s["mb_per_pair_split"] == {k: round(v, 3) for k, v in sp["mb_per_pair"].items()}
    assert s["operator"] is True and s["source"] == "depth" and s["pairs_per_s_end_to_end"] > 0
    assert r["operator_kernels"] is None and s["operator_kernels"] is None  # CPU: snd's CUDA kernels do not run
    assert r["mvsplat_corr_kernel"] is None and s["mvsplat_corr_kernel"] is None  # no MVSplat here
    # the pipeline as run: CPU chunk 1, one operator thread, no CUDA stream (so no priority), no trace
    assert (s["operator_chunk"], s["operator_thread"], s["operator_workers"], s["operator_priority"]) == (1, True, 1, False)
    assert r["gpu_busy"] is None and s["gpu_busy"] is None


def test_measured_figures_leave_the_not_yet_measured_list(bench_dir, tmp_path):
    """A precompute JSON of the batched builder (it records its chunk) and an e2e result (default `snd distill`
    vs the bench in one call) are reported as measured, with the e2e ratio carried into the projection."""
    r = project(BenchProjectConfig(bench_dir=bench_dir, out=tmp_path / "a.json"))
    assert {"batched_operators", "default_distill_vs_bench"} <= set(r["not_yet_measured"]) and r["default_distill_vs_bench"] is None
    _write(bench_dir, "bench_precompute_mvsplat_operators_b_h100.json", dict(_pre(6.0, 1.0, 80), operator_chunk=4), age=5)
    _write(bench_dir, "e2e_h100.json", {"distill": {"it_per_s_last_half": 90.0}, "bench_fast": {"it_per_s": 100.0},
                                        "distill_vs_bench": 0.9, "distill_vs_bench_goal": 0.95}, age=5)
    r = project(BenchProjectConfig(bench_dir=bench_dir, out=tmp_path / "b.json"))
    assert not {"batched_operators", "default_distill_vs_bench"} & set(r["not_yet_measured"])
    e = r["default_distill_vs_bench"]
    assert (e["ratio"], e["goal"], e["distill_it_per_s"], e["bench_it_per_s"]) == (0.9, 0.95, 90.0, 100.0)


def test_e2e_runs_all_listed_newest_first_and_last_name_within_a_commit(bench_dir, tmp_path):
    """Every e2e result is listed (host-to-host differences stay visible); the headline is the newest, and among
    files of equal age the last name (run numbers grow)."""
    e2e = lambda ratio: {"distill": {"it_per_s_last_half": 100.0 * ratio}, "bench_fast": {"it_per_s": 100.0},  # noqa: E731
                         "distill_vs_bench": ratio, "distill_vs_bench_goal": 0.95}
    _write(bench_dir, "e2e_h100.json", e2e(0.8), age=50)
    _write(bench_dir, "e2e_h100_run3.json", e2e(0.9), age=5)
    _write(bench_dir, "e2e_h100_run4.json", e2e(0.97), age=5)
    _write(bench_dir, "e2e_bench_distill_h100_run4.json", {"models": []}, age=1)  # not an e2e result: skipped
    r = project(BenchProjectConfig(bench_dir=bench_dir, out=tmp_path / "p.json"))
    e = r["default_distill_vs_bench"]
    assert e["ratio"] == 0.97 and e["file"].endswith("e2e_h100_run4.json")
    assert [x["ratio"] for x in e["runs"]] == [0.97, 0.9, 0.8]
