"""Backbone input sizes left to the default follow the backbone's patch: a frame size floored to whole
patches (stage two 576x880, probes 480x640), so DINOv2 gets the official 574x868 / 476x630 and DINOv3 runs
with no size flags (576x880 / 480x640)."""
from __future__ import annotations

import json

import pytest

from snd.bench.distill import model_sized
from snd.errors import SndError
from snd.models.backbone import DISTILL_FRAME_HW, PROBE_FRAME_HW, with_input_hw
from snd.pipeline.config import BenchDistillConfig, DistillConfig, EvalConfig
from snd.stages.eval_plan import probe_input_sized
from snd.train.loop import input_sized

V2, V3 = "snd_test_vit_patch14", "snd_test_vit_patch16_dinov3"


@pytest.mark.parametrize("patch, distill, probe", [(14, (574, 868), (476, 630)), (16, (576, 880), (480, 640))])
def test_frame_sizes_floored_to_the_patch(patch, distill, probe):
    # 574 = 41 * 14, 868 = 62 * 14, 476 = 34 * 14, 630 = 45 * 14; 576 = 36 * 16, 880 = 55 * 16, 480 = 30 * 16
    got = with_input_hw(DistillConfig(), patch, DISTILL_FRAME_HW)
    assert (got.img_height, got.img_width) == distill
    got = with_input_hw(EvalConfig(), patch, PROBE_FRAME_HW)
    assert (got.img_height, got.img_width) == probe


def test_given_sizes_are_kept_and_one_missing_size_is_filled():
    cfg = DistillConfig(img_height=448, img_width=672)
    assert with_input_hw(cfg, 16, DISTILL_FRAME_HW) is cfg
    half = with_input_hw(DistillConfig(img_height=448), 16, DISTILL_FRAME_HW)
    assert (half.img_height, half.img_width) == (448, 880)


def test_distill_config_is_sized_by_its_model():
    assert (input_sized(DistillConfig(model=V2)).img_height, input_sized(DistillConfig(model=V2)).img_width) == (574, 868)
    v3 = input_sized(DistillConfig(model=V3))
    assert (v3.img_height, v3.img_width) == (576, 880)


def test_distill_with_dinov3_and_no_size_flags_passes_the_size_check(tmp_path):
    """Before: the 574x868 default failed every DINOv3 run with "not a multiple of the patch size 16"; now the
    run gets as far as the (missing) store."""
    from snd.stages.distill import run

    with pytest.raises(SndError, match="scaffold store not found"):
        run(DistillConfig(model=V3, init="random", shards=tmp_path / "none", run=tmp_path / "run"))


def test_bench_distill_default_is_snd_distills_size_per_model():
    cfg = BenchDistillConfig()
    assert [(c.img_height, c.img_width) for c in (model_sized(cfg, V2), model_sized(cfg, V3))] == [(574, 868), (576, 880)]
    given = model_sized(BenchDistillConfig(img_height=574, img_width=868), V3)  # a given size is rounded up
    assert (given.img_height, given.img_width) == (576, 880)


def test_probe_size_of_model_and_baseline():
    assert (probe_input_sized(EvalConfig(), [14, 14]).img_height, probe_input_sized(EvalConfig(), [14]).img_width) == (476, 630)
    assert (probe_input_sized(EvalConfig(), [16]).img_height, probe_input_sized(EvalConfig(), [16]).img_width) == (480, 640)
    given = EvalConfig(img_height=224, img_width=336)
    assert probe_input_sized(given, [14, 16]) is given
    with pytest.raises(SndError) as e:
        probe_input_sized(EvalConfig(), [16, 14])
    # lcm(14, 16) = 112: 480 // 112 * 112 = 448, 640 // 112 * 112 = 560
    assert "14 and 16" in str(e.value) and "--img-height 448 --img-width 560" in e.value.hint


@pytest.mark.usefixtures("one_thread")
def test_eval_of_a_dinov3_model_runs_at_its_default_size(synth_root, tmp_path):
    from snd.stages import evaluate

    out = tmp_path / "eval"
    res = evaluate.run(EvalConfig(model=V3, init="random", data_root=synth_root, datasets=["synth"], out=out,
                                  max_images=2, device="cpu", num_workers=0), tasks=["corr"])
    assert [r["status"] for r in res["records"]] == ["ok"]
    saved = json.loads((out / "config.json").read_text())["config"]
    assert (saved["img_height"], saved["img_width"]) == (480, 640)
    with pytest.raises(SndError, match="different patch sizes"):
        evaluate.run(EvalConfig(model=V3, baseline=V2, init="random", data_root=synth_root, datasets=["synth"],
                                out=tmp_path / "mixed", device="cpu", num_workers=0), tasks=["corr"])
