"""`snd eval` end to end on the procedural dataset: every task, tables, figures, resume, missing data."""
from __future__ import annotations

import json

import pytest

from snd.errors import SndError
from snd.pipeline.config import EvalConfig
from snd.stages import evaluate


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(data_root, out, **kw):
    base = dict(model="snd_test_vit_patch14", init="random", baseline="snd_test_vit_patch14", data_root=data_root,
                datasets=["synth"], out=out, img_height=56, img_width=84, iters=4, batch=2, max_images=4,
                device="cpu", seed=0, num_workers=0)
    base.update(kw)
    return EvalConfig(**base)


def test_eval_end_to_end_on_synth_then_resume(synth_root, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    res = evaluate.run(_cfg(synth_root, out), tasks=["depth", "normals", "seg", "corr"])
    recs = json.loads((out / "results.json").read_text())["records"]
    got = {(r["role"], r["task"]) for r in recs if r["status"] == "ok"}
    assert got == {(role, t) for role in ("model", "baseline") for t in ("depth", "normals", "seg", "corr")}
    by = {(r["role"], r["task"]): r for r in recs}
    assert 0 < by["model", "depth"]["metrics"]["abs_rel"] < 10
    assert 0 <= by["model", "seg"]["metrics"]["mIoU"] <= 100
    assert 0 <= by["model", "corr"]["metrics"]["recall_10px"] <= 100
    assert by["model", "normals"]["n_train"] == 4 and by["model", "normals"]["iters"] == 4
    # same weights: the baseline reuses the model's records, so every delta is "="
    md = (out / "results.md").read_text()
    assert "baseline: snd_test_vit_patch14" in md
    delta_cells = [ln.strip("|").split("|")[4].strip() for ln in md.splitlines()
                   if ln.startswith("| synth")]
    assert len(delta_cells) == 22 and all(c.endswith("=") or c == "–" for c in delta_cells), delta_cells
    for t in ("depth", "normals", "seg", "corr"):
        assert (out / f"results_{t}.md").is_file()
    for f in ("depth_synth.png", "normals_synth.png", "seg_synth.png", "corr_synth.png"):
        assert (out / "figures" / f).stat().st_size > 0
    assert res["tables"] == md

    # second run: every (model, dataset, task) is finished -> nothing is trained or extracted again
    import snd.eval.probes as probes

    def no_training(*a, **k):
        raise AssertionError("a finished probe was trained again")

    monkeypatch.setattr(probes, "train_probe", no_training)
    again = evaluate.run(_cfg(synth_root, out), tasks=["depth", "seg"])
    assert {r["task"] for r in again["records"]} == {"depth", "seg"}
    assert again["records"][0]["metrics"] == by["model", "depth"]["metrics"]


def test_eval_without_data_names_what_is_missing(tmp_path):
    with pytest.raises(SndError) as e:
        evaluate.run(_cfg(tmp_path / "empty", tmp_path / "out", datasets=[]), tasks=["depth", "normals"])
    msg = str(e.value)
    assert "depth: no dataset found" in msg and "normals: no dataset found" in msg
    assert "nyuv2" in msg and "synth" in msg and "snd data synth" in msg
    assert not (tmp_path / "out" / "results.json").exists()


def test_eval_rejects_unknown_dataset(tmp_path):
    with pytest.raises(SndError, match="unknown dataset"):
        evaluate.run(_cfg(tmp_path, tmp_path / "out", datasets=["nope"]), tasks=["depth"])


def test_eval_live_path_without_feature_cache(synth_root, tmp_path):
    out = tmp_path / "live"
    res = evaluate.run(_cfg(synth_root, out, baseline=None, feature_cache=False, iters=2), tasks=["normals"])
    (rec,) = res["records"]
    assert rec["status"] == "ok" and rec["task"] == "normals" and 0 <= rec["metrics"]["rmse"] <= 180
    assert not (out / "features").exists()  # the backbone ran per step instead


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_eval_end_to_end_on_cuda(synth_root, tmp_path):
    res = evaluate.run(_cfg(synth_root, tmp_path / "gpu", device="cuda", baseline=None, iters=20, num_workers=2),
                       tasks=["depth", "normals", "seg", "corr"])
    assert {r["task"] for r in res["records"] if r["status"] == "ok"} == {"depth", "normals", "seg", "corr"}
    assert (tmp_path / "gpu" / "results.md").is_file()


def test_paper_and_fast_protocols_end_to_end_are_labelled(synth_root, tmp_path):
    """`snd eval --protocol paper` (the default) runs every task on procedural data; its records, JSON and
    tables say so, the flipped validation pass is cached, and fast (on the same token cache) differs."""
    assert EvalConfig().protocol == "paper"
    feats = tmp_path / "features"
    paper = evaluate.run(_cfg(synth_root, tmp_path / "paper", baseline=None, feature_cache_dir=feats),
                         tasks=["depth", "normals", "seg", "corr"])
    fast = evaluate.run(_cfg(synth_root, tmp_path / "fast", baseline=None, feature_cache_dir=feats, protocol="fast"),
                        tasks=["depth", "corr"])
    for res, name in ((paper, "paper"), (fast, "fast")):
        assert json.loads((tmp_path / name / "results.json").read_text())["protocol"] == name
        assert all(r["protocol"] == name for r in res["records"])
        assert f"(protocol: {name})" in (tmp_path / name / "results.md").read_text()
    assert any(p.name.startswith("val_flip") for p in feats.rglob("*.json"))
    pd = {r["task"]: r for r in paper["records"]}
    fd = {r["task"]: r for r in fast["records"]}
    assert pd["depth"]["recipe"]["beta1_cycle"] and not fd["depth"]["recipe"]["beta1_cycle"]
    assert fd["depth"]["train_live"] is False  # fast trains on cached tokens
    assert pd["corr"]["geometry"] == "probe3d" and fd["corr"]["geometry"] == "snd"
    assert pd["depth"]["metrics"]["abs_rel"] != fd["depth"]["metrics"]["abs_rel"]


@pytest.mark.parametrize("model,store", [("snd_test_vit_patch14", "nyuv2@490x490"),
                                         ("snd_test_vit_patch16_dinov3", "nyuv2@480x480")])
def test_paper_nyu_normals_are_tested_at_the_padded_square_on_their_own_token_store(tmp_path, model, store):
    """The paper's NYU normals run end to end: trained live on a GeoNet stand-in in file order, validation tokens
    of the 480x480 crop padded to the patch (490x490 for /14; 480x480 for /16, a multiple already) in a store
    of their own, the 1x1 head applied on the 35x35 / 30x30 grid."""
    import gzip
    import pickle

    import numpy as np

    from tests.test_eval_datasets import write_mat_v5, write_mat_v73

    rng = np.random.default_rng(0)
    d = tmp_path / "data" / "nyuv2"
    d.mkdir(parents=True)
    depth = rng.uniform(0.5, 9.0, (2, 480, 640)).astype(np.float32)
    write_mat_v73(d / "nyu_depth_v2_labeled.mat", {
        "images": rng.integers(0, 256, (2, 3, 640, 480), dtype=np.uint8),
        "depths": depth.transpose(0, 2, 1), "rawDepths": depth.transpose(0, 2, 1)})
    write_mat_v5(d / "splits.mat", {"trainNdxs": np.array([[1]]), "testNdxs": np.array([[2]])})
    normals = np.tile(np.array([0.0, 0.0, 1.0], np.float32), (2, 480, 640, 1))
    with gzip.open(d / "all_normals.pklz", "wb") as f:
        pickle.dump({"all_normals": normals}, f, protocol=2)
    from snd.eval.datasets.geonet import write_geonet_standin

    hw = dict(img_height=64, img_width=96) if "16" in model else {}  # the probe input: multiples of the patch
    with pytest.raises(SndError, match="GeoNet"):  # the paper trains NYU normals on GeoNet: it names the download
        evaluate.run(_cfg(tmp_path / "data", tmp_path / "out0", datasets=["nyuv2"], baseline=None, iters=2,
                          model=model, **hw), tasks=["normals"])
    write_geonet_standin(tmp_path / "data" / "nyuv2_geonet", n=3, hw=(48, 64))
    res = evaluate.run(_cfg(tmp_path / "data", tmp_path / "out", datasets=["nyuv2"], baseline=None, iters=2,
                            model=model, **hw), tasks=["normals"])
    (rec,) = res["records"]
    assert rec["status"] == "ok" and rec["protocol"] == "paper" and 0 <= rec["metrics"]["rmse"] <= 180
    assert rec["n_train"] == 3 and rec["recipe"]["shuffle"] is False and rec["probe"]["mask"] == "finite"
    assert list((tmp_path / "out" / "features").rglob(store))
    assert not list((tmp_path / "out" / "features").rglob("nyuv2/train*"))  # GeoNet rows ran live, not cached
    # the trivial constant is fit on the un-augmented GeoNet targets: each 48x48 centre square less its 3 rows
    # of zero depth (the stand-in's zero normals lie outside the square), never one epoch's random crops
    (triv,) = res["trivial"]
    assert triv["n_pixels"] == 3 * 45 * 48


@pytest.mark.parametrize("model,store,grid", [("snd_test_vit_patch14", "kitti@364x1218", [26, 51]),
                                              ("snd_test_vit_patch16_dinov3", "kitti@352x1216", [22, 44])])
def test_paper_kitti_depth_tests_the_whole_kb_crop_and_trains_live_on_its_crops(tmp_path, model, store, grid):
    """KITTI under the paper protocol end to end: val and flipped-val tokens of the whole KB crop padded to the
    patch (364x1218, 26x87 patches, for /14; 352x1216, 22x76, for /16) in stores of their own, scored against the
    native 352x1216 map; training runs the backbone live on the config's 352x704 crops of the KB crop (padded to
    364x714 / 352x704: 26x51 / 22x44 patches), so no training store is written."""
    from tests.test_eval_protocol_sizes import write_kitti_frame

    write_kitti_frame(tmp_path / "data")
    hw = dict(img_height=64, img_width=96) if "16" in model else {}
    res = evaluate.run(_cfg(tmp_path / "data", tmp_path / "out", datasets=["kitti"], baseline=None, iters=2,
                            model=model, **hw), tasks=["depth"])
    (rec,) = res["records"]
    assert rec["status"] == "ok" and rec["n_train"] == 2 and rec["n_val"] == 1
    (folder,) = (tmp_path / "out" / "features").glob(f"*/{store}")
    assert {p.name for p in folder.glob("*.json")} == {"val.json", "val_flip.json"}
    assert rec["train_live"] is True and rec["train_grid"] == grid and rec["recipe"]["shuffle"] is True
    assert res["trivial"][0]["n_pixels"] == 2 * 352 * 1216  # un-augmented native training maps: every pixel 2 m


def test_paper_nyu_depth_trains_on_crops_of_the_nyucrop_frame_and_tests_the_whole_frame(tmp_path):
    """NYU depth under the paper protocol end to end (/14): training runs the backbone live on 416x544 crops of the
    NYUCrop region padded to 420x546 (30x39 patches), test and flipped-test tokens of the whole 480x640 frame padded
    to 490x644 (35x46) in a store of their own; the trivial constant is fit on the native 427x565 training map."""
    from tests.test_eval_protocol_sizes import _nyu_480x640

    t = _nyu_480x640(tmp_path / "data")
    res = evaluate.run(_cfg(tmp_path / "data", tmp_path / "out", datasets=["nyuv2"], baseline=None, iters=2),
                       tasks=["depth"])
    (rec,) = res["records"]
    assert rec["status"] == "ok" and rec["n_train"] == 1 and rec["n_val"] == 1
    (key,) = [p for p in (tmp_path / "out" / "features").iterdir() if (p / "model.json").is_file()]
    stores = {p.name: {j.name for j in p.glob("*.json")} for p in key.iterdir() if p.is_dir()}
    # no store at the fast 56x84 size: each split has the size of its own frame
    assert stores == {"nyuv2@490x644-bts": {"val.json", "val_flip.json"}}  # BTS frames: never the labelled set's
    assert rec["train_live"] is True and rec["train_grid"] == [30, 39]
    crop = t["depths"][0][45:472, 43:608]  # the un-augmented source targets (float32: nothing cached)
    assert res["trivial"][0]["n_pixels"] == int(((crop > 1e-3) & (crop < 10.0)).sum())


def test_paper_seg_trains_live_on_mmseg_crops_and_tests_by_sliding_windows(synth_root, tmp_path, monkeypatch):
    """Paper-protocol segmentation end to end: training reads 518x518 mmseg crops through the live backbone (no
    token store), the test slides 512x512 windows over each image rescaled to short side 512 and scores at the
    label's own size; fast, on the same data, caches both splits and scores at the probe input size."""
    from snd.eval import mmseg

    sizes, calls = [], []
    real = mmseg.slide_logits

    def spy(probe, backbone, image, norm, **kw):
        sizes.append(tuple(image.shape[-2:]))
        out = real(probe, backbone, image, norm, **kw)
        calls.append(tuple(out.shape))
        return out

    monkeypatch.setattr("snd.eval.probes.evaluate.slide_logits", spy)
    feats = tmp_path / "features"
    paper = evaluate.run(_cfg(synth_root, tmp_path / "paper", baseline=None, feature_cache_dir=feats, iters=2,
                              max_images=2), tasks=["seg"])
    assert not list(feats.rglob("*.zarr"))  # neither split is cached: both run the backbone live
    (rec,) = paper["records"]
    assert rec["status"] == "ok" and rec["protocol"] == "paper" and rec["n_val"] == 2
    assert rec["recipe"]["shuffle"] is True and rec["train_live"] is True  # mmseg's training loader shuffles
    assert sizes and all(min(s) == 512 for s in sizes)  # short side 512 (synth frames are wider than tall)
    assert all(c[1] == rec["probe"]["num_classes"] for c in calls)
    fast = evaluate.run(_cfg(synth_root, tmp_path / "fast", baseline=None, feature_cache_dir=feats, iters=2,
                             max_images=2, protocol="fast"), tasks=["seg"])
    assert list(feats.rglob("*.zarr")) and fast["records"][0]["status"] == "ok"
    assert rec["metrics"]["aAcc"] != fast["records"][0]["metrics"]["aAcc"]


def test_live_rows_forward_at_the_suites_extract_precision(synth_root, tmp_path, monkeypatch):
    """The paper protocol's live forwards (seg training on mmseg crops, the sliding-window test) run at
    --extract-precision like the cached rows, not at a fixed fp32: one arithmetic per suite."""
    from snd.eval import features

    seen = []
    real = features.extract_tokens

    def spy(model, images01, precision="fp32", **kw):
        seen.append(precision)
        return real(model, images01, precision, **kw)

    monkeypatch.setattr(features, "extract_tokens", spy)
    res = evaluate.run(_cfg(synth_root, tmp_path / "bf16", baseline=None, iters=2, max_images=2,
                            extract_precision="bf16"), tasks=["seg"])
    (rec,) = res["records"]
    assert rec["status"] == "ok" and rec["train_live"] is True
    # 2 training steps + at least one window batch per test image, every one of them in bf16
    assert len(seen) >= 2 + 2 and set(seen) == {"bf16"}
