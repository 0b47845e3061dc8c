"""Frozen-token extraction and the on-disk feature cache: reference agreement, hits, misses, resume."""
from __future__ import annotations

import json

import pytest
import torch

from snd.eval.features import (apply_final_norm, cache_key, ensure_features, extract_tokens, final_norm_params,
                               split_tokens)
from snd.models.backbone import create_backbone, extract, normalize

HW = (28, 42)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return create_backbone("snd_test_vit_patch14", init="random")


def _images(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, *HW, generator=g)} for _ in range(n)]


def _reference_tokens(model, images01):
    """Slow, obvious path: patch embed -> pos embed -> every block by hand, no final norm."""
    x = model.patch_embed(normalize(model, images01))
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    for blk in model.blocks:
        x = blk(x)
    return torch.cat([x[:, :1], x[:, model.num_prefix_tokens:]], 1)


def test_tokens_match_block_loop_and_final_norm_matches_extract(model):
    imgs = torch.stack([d["image"] for d in _images(2)])
    tok = extract_tokens(model, imgs)
    with torch.no_grad():
        ref = _reference_tokens(model, imgs)
        cls, patches = extract(model, normalize(model, imgs))
    assert tok.shape == (2, 1 + 2 * 3, 64)
    torch.testing.assert_close(tok, ref, rtol=1e-5, atol=1e-5)
    ncls, npatch = split_tokens(apply_final_norm(tok, final_norm_params(model)), (2, 3))
    torch.testing.assert_close(ncls, cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(npatch, patches, rtol=1e-5, atol=1e-5)


def test_cache_hits_without_backbone_and_misses_on_new_weights(model, tmp_path, monkeypatch):
    data = _images(5)
    s1 = ensure_features(model, data, cache_dir=tmp_path, dataset_name="toy", split="train", img_hw=HW, batch=2)
    want = extract_tokens(model, torch.stack([d["image"] for d in data]))
    got = torch.stack([s1.tokens(i) for i in range(5)])
    assert got.dtype == torch.float16  # rows come back as stored
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)

    calls = {"n": 0}
    real = model.forward_intermediates

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(model, "forward_intermediates", counting)
    s2 = ensure_features(model, data, cache_dir=tmp_path, dataset_name="toy", split="train", img_hw=HW, batch=2)
    assert calls["n"] == 0 and torch.equal(s2.tokens(3), s1.tokens(3))

    key_before = cache_key(model, HW)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] += 1.0
    assert cache_key(model, HW) != key_before
    s3 = ensure_features(model, data, cache_dir=tmp_path, dataset_name="toy", split="train", img_hw=HW, batch=2)
    assert calls["n"] == 3  # ceil(5 / 2) batches recomputed under the new key
    assert s3.path != s1.path and not torch.equal(s3.tokens(0), s1.tokens(0))


def test_interrupted_extraction_resumes(model, tmp_path, monkeypatch):
    data = _images(6, seed=1)
    real = model.forward_intermediates
    calls = {"n": 0}

    def dies_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(model, "forward_intermediates", dies_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_features(model, data, cache_dir=tmp_path, dataset_name="toy", split="val", img_hw=HW, batch=2)
    prog = json.loads(next(tmp_path.rglob("val.json")).read_text())
    assert prog["n_done"] == 2 and not prog["complete"]
    calls["n"] = 10  # from now on every call succeeds; count the resumed batches
    store = ensure_features(model, data, cache_dir=tmp_path, dataset_name="toy", split="val", img_hw=HW, batch=2)
    assert calls["n"] == 12  # only the 4 remaining images (2 batches)
    want = extract_tokens(model, torch.stack([d["image"] for d in data]))
    torch.testing.assert_close(torch.stack([store.tokens(i) for i in range(6)]).float(), want, rtol=2e-3, atol=2e-3)


def test_subset_gets_its_own_store(model, tmp_path):
    data = _images(4, seed=2)
    s = ensure_features(model, data, cache_dir=tmp_path, dataset_name="toy", split="train", img_hw=HW,
                        indices=[1, 3], batch=4)
    assert len(s) == 2 and s.path.name == "train_n2.zarr"
    want = extract_tokens(model, data[3]["image"][None])[0]
    torch.testing.assert_close(s.tokens(1).float(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tokens_match_cpu_and_cache_extracts_on_cuda(model, tmp_path):
    data = _images(3, seed=3)
    imgs = torch.stack([d["image"] for d in data])
    cpu = extract_tokens(model, imgs)
    gpu = extract_tokens(model.cuda(), imgs.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)  # TF32 / kernel differences only
    s = ensure_features(model, data, cache_dir=tmp_path, dataset_name="toy", split="train", img_hw=HW, batch=2,
                        device="cuda")
    torch.testing.assert_close(torch.stack([s.tokens(i) for i in range(3)]).float(), cpu, rtol=3e-3, atol=3e-3)
