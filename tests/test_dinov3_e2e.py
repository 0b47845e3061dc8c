"""DINOv3 S/16 end to end on CPU: a patch-16 store, `snd distill --model vit_small_patch16_dinov3 --init random`,
`snd eval all` on the run, and the patch-grid check between a store and a run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from snd.errors import SndError
from snd.pipeline.config import DistillConfig, EvalConfig, PrecomputeConfig
from tests._cli import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

HW = (64, 96)  # 4 x 6 patches of 16
MODEL = "vit_small_patch16_dinov3"


@pytest.fixture(scope="module")
def store16(synth_root, tmp_path_factory) -> Path:
    from snd.stages.precompute import run

    out = tmp_path_factory.mktemp("v3") / "cache"
    run(PrecomputeConfig(data=synth_root, out=out, height=HW[0], width=HW[1], patch_size=16, pairs_per_scene=1,
                         targets_per_pair=1, batch_pairs=2, device="cpu", source="depth"), progress=False)
    return out


def test_store_records_its_patch_grid(store16):
    from snd.cache.manifest import read_header

    op = read_header(store16)["operator"]
    assert op["patch"] == 16 and op["ctx_hw"] == [HW[0] // 16, HW[1] // 16]


def test_distill_dinov3_then_eval_all(store16, synth_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["distill", "--shards", str(store16), "--run", str(run_dir), "--model", MODEL, "--init", "random",
            "--img-height", str(HW[0]), "--img-width", str(HW[1]), "--head-hidden", "64", "--head-bottleneck", "32",
            "--head-prototypes", "256", "--iters", "2", "--num-workers", "0", "--log-every", "1",
            "--ckpt-every", "2", "--device", "cpu", "--renderer", "torch", "--targets", "operator"]
    assert run_cli(args) == 0
    err = capsys.readouterr().err
    assert "LoRA" in err and "blocks.{0..11}.attn.qkv" in err and "blocks.{0..11}.attn.proj" in err
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)

    from snd.models.backbone import extract, normalize
    from snd.train.checkpoint import load_backbone_from_run

    m = load_backbone_from_run(run_dir)
    cls, patches = extract(m, normalize(m, torch.rand(1, 3, *HW)))
    assert cls.shape == (1, 384) and patches.shape == (1, 384, 4, 6)

    from snd.stages import evaluate

    out = tmp_path / "eval"
    cfg = EvalConfig(model=str(run_dir), baseline=MODEL, init="random", data_root=synth_root, datasets=["synth"],
                     out=out, img_height=HW[0], img_width=HW[1], iters=2, batch=2, max_images=2, device="cpu",
                     seed=0, num_workers=0)
    evaluate.run(cfg, tasks=["depth", "normals", "seg", "corr"])
    recs = json.loads((out / "results.json").read_text())["records"]
    ok = {(r["role"], r["task"]) for r in recs if r["status"] == "ok"}
    assert ok == {(role, t) for role in ("model", "baseline") for t in ("depth", "normals", "seg", "corr")}


def test_a_store_for_another_patch_grid_is_a_clear_error(store16, tmp_path):
    """A DINOv2 run (patch 14) on the patch-16 store at the same grid: --targets operator refuses, naming
    the patch sizes; auto falls back to rendering and says why."""
    from snd.cache.manifest import read_header
    from snd.train.data import operator_decision

    hdr = read_header(store16)
    base = dict(shards=store16, run=tmp_path / "r", init="random", device="cpu")
    v2 = DistillConfig(model="snd_test_vit_patch14", img_height=56, img_width=84, **base)  # also 4 x 6 patches
    use, why = operator_decision(v2, hdr)
    assert not use and "patch 16 vs 14" in why
    with pytest.raises(SndError, match="patch 16 vs 14"):
        operator_decision(DistillConfig(model="snd_test_vit_patch14", img_height=56, img_width=84, targets="operator",
                                        **base), hdr)
    v3 = DistillConfig(model=MODEL, img_height=HW[0], img_width=HW[1], **base)
    assert operator_decision(v3, hdr)[0]


def test_the_named_precompute_flags_build_a_store_that_fits(store16, synth_root, tmp_path):
    """The mismatch message names `snd precompute` flags; a store built with them serves the run's operators."""
    import shlex

    from snd.cache.manifest import read_header
    from snd.train.data import operator_decision

    v2 = DistillConfig(model="snd_test_vit_patch14", img_height=56, img_width=84, upsample="bilinear", blend=False,
                       shards=store16, run=tmp_path / "r", init="random", device="cpu")
    use, why = operator_decision(v2, read_header(store16))
    assert not use
    flags = shlex.split(why.split("`snd precompute ")[1].rstrip("`"))
    assert flags[:2] == ["--patch-size", "14"] and "--no-operator-blend" in flags
    out = tmp_path / "cache14"
    assert run_cli(["precompute", "--data", str(synth_root), "--out", str(out), "--height", str(HW[0]), "--width",
                    str(HW[1]), "--pairs-per-scene", "1", "--targets-per-pair", "1", "--device", "cpu", "--source",
                    "depth", *flags]) == 0
    assert operator_decision(v2, read_header(out)) == (True, "the store's operators match this run (official protocol)")


def test_distill_rejects_sizes_off_the_patch16_grid(store16, tmp_path):
    from snd.stages.distill import run

    with pytest.raises(SndError, match="patch size 16") as e:
        run(DistillConfig(shards=store16, run=tmp_path / "r", model=MODEL, init="random", img_height=574, img_width=868))
    assert "576" in e.value.hint and "880" in e.value.hint


def test_dinov3_export_round_trips_through_plain_timm(store16, tmp_path):
    import timm

    import snd
    from snd.models.backbone import extract, normalize
    from snd.stages.distill import run
    from snd.train.checkpoint import load_backbone_from_run

    tiny = "snd_test_vit_patch16_dinov3"
    run(DistillConfig(shards=store16, run=tmp_path / "run", model=tiny, init="random", img_height=HW[0],
                      img_width=HW[1], head_hidden=64, head_bottleneck=32, head_prototypes=256, iters=2,
                      num_workers=0, ckpt_every=2, device="cpu", lr=1e-2))
    out = tmp_path / "exp"
    assert run_cli(["export", str(tmp_path / "run"), "--out", str(out), "--format", "snd-release"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == tiny and cfg["snd"]["patch_size"] == 16 and cfg["snd"]["family"] == "dinov3"
    assert "H, W multiples of 16" in (out / "README.md").read_text()
    ref = load_backbone_from_run(tmp_path / "run")
    m = timm.create_model(tiny, pretrained=True, num_classes=0, dynamic_img_size=True,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    base = timm.create_model(tiny, num_classes=0, dynamic_img_size=True).eval()
    x = torch.rand(2, 3, 48, 112)  # not the trained size: RoPE is computed per grid, the same in both
    with torch.no_grad():
        msd, rsd = m.state_dict(), ref.state_dict()
        assert set(msd) == set(rsd) and all(torch.equal(msd[k], rsd[k]) for k in msd)
        p_ref = extract(ref, normalize(ref, x))[1]
        assert torch.equal(extract(m, normalize(m, x))[1], p_ref)
        assert (extract(base, normalize(base, x))[1] - p_ref).abs().max() > 1e-3  # the file really was loaded
        # the official-layout release file loads back strictly through snd.load_backbone
        rel_file = out / "snd_test_snd.pth" if (out / "snd_test_snd.pth").exists() else next(out.glob("*_snd.pth"))
        rel = snd.load_backbone(rel_file)
        assert rel.snd_load_report.layout == "dinov3"
        assert torch.equal(extract(rel, normalize(rel, x))[1], p_ref)


def test_fast_path_body_with_rope_equals_the_eager_step(store16, tmp_path):
    """The fast path's body (static buffers, warm-up, then replay; on CPU run eagerly) with the DINOv3
    test model (RoPE tables cached per grid) gives the eager loop's losses exactly."""
    from snd.stages.distill import run

    kw = dict(model="snd_test_vit_patch16_dinov3", init="random", img_height=HW[0], img_width=HW[1], head_hidden=64,
              head_bottleneck=32, head_prototypes=256, iters=4, ema_every=2, ckpt_every=4, num_workers=0,
              device="cpu", targets="operator", lora_dropout=0.1)
    a = run(DistillConfig(shards=store16, run=tmp_path / "eager", fast="off", **kw))
    b = run(DistillConfig(shards=store16, run=tmp_path / "fast", fast="on", **kw))
    assert [a.losses[s] for s in sorted(a.losses)] == [b.losses[s] for s in sorted(b.losses)]
    assert a.param_digest == b.param_digest


def test_rope_table_is_cached_per_grid_and_equals_timms():
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    from snd.models.backbone import create_backbone

    m = create_backbone("snd_test_vit_patch16_dinov3", init="random")
    rope = m.rope
    a = rope.get_embed(shape=[4, 6])
    assert rope.get_embed(shape=[4, 6]) is a  # no host work (nor host-to-device copy) after the first call
    ref = RotaryEmbeddingDinoV3.get_embed(rope, shape=[4, 6])
    assert torch.equal(a, ref) and not torch.equal(rope.get_embed(shape=[3, 6])[:18], a[:18])
    m.to(torch.float64)
    assert "_snd_rope_cache" not in rope.__dict__  # a move/cast drops the table


def test_rope_cache_works_with_older_timm_get_embed_without_dtype(monkeypatch):
    """timm 1.0.29 (the GPU machine's) has `get_embed(self, shape=None)`: the cache must not pass a dtype."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    import snd.models.dinov3 as d3
    from snd.models.backbone import create_backbone

    newer = RotaryEmbeddingDinoV3.get_embed
    ref = newer(create_backbone("snd_test_vit_patch16_dinov3", init="random").rope, shape=[4, 6])

    def older(self, shape=None):  # the older signature: a dtype argument would be a TypeError
        return newer(self, shape)

    monkeypatch.setattr(RotaryEmbeddingDinoV3, "get_embed", older)
    monkeypatch.setattr(d3, "_GET_EMBED_DTYPE", False)
    rope = create_backbone("snd_test_vit_patch16_dinov3", init="random").rope
    a = rope.get_embed(shape=[4, 6])
    assert rope.get_embed(shape=[4, 6]) is a and torch.equal(a, ref)
    monkeypatch.setattr(d3, "_GET_EMBED_DTYPE", True)  # the check is what routes the call: without it, TypeError
    rope._apply(lambda t: t)
    with pytest.raises(TypeError):
        rope.get_embed(shape=[4, 6])


def test_bench_distill_times_both_families_at_their_own_sizes(tmp_path, capsys):
    """One `snd bench distill` call with a patch-14 and a patch-16 model: each at its own input size (a
    size off a model's patch grid rounded up to it: 28x42 -> 32x48 for patch 16)."""
    from snd.bench.distill import bench
    from snd.pipeline.config import BenchDistillConfig

    res = bench(BenchDistillConfig(models=["snd_test_vit_patch14", "snd_test_vit_patch16_dinov3"], img_height=28,
                                   img_width=42, scaffold_height=14, scaffold_width=21, head_prototypes=128, iters=2,
                                   warmup=1, renderer="torch", device="cpu", out=tmp_path / "b.json"))
    v2, v3 = res["models"]
    assert v2["img_hw"] == [28, 42] and v2["patch_grid"] == [2, 3]
    assert v3["model"] == "snd_test_vit_patch16_dinov3" and v3["img_hw"] == [32, 48] and v3["patch_grid"] == [2, 3]
    assert v3["it_per_s"] > 0
