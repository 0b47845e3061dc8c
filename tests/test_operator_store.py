"""Stored transfer operators (schema v2): stage one writes them, stage two's operator path equals its render path."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from snd.cache.manifest import read_header
from snd.cache.opcodec import operator_from_batch
from snd.cache.reader import CacheReader
from snd.cache.stream import ShardStream
from snd.errors import SndError
from snd.pipeline.config import DistillConfig, PrecomputeConfig
from snd.splat.gaussians import PixelGaussians
from snd.splat.operator import apply_operator
from snd.splat.target import target_features
from snd.train.data import use_stored_operators
from snd.train.distiller import rigid_inverse

HW = (56, 84)
GRID = (4, 6)


def _build(synth_root, tmp_path_factory, **kw) -> Path:
    from snd.stages.precompute import run

    out = tmp_path_factory.mktemp("opstore") / "cache"
    kw = dict(dict(pairs_per_scene=2), **kw)
    s = run(PrecomputeConfig(data=synth_root, out=out, height=HW[0], width=HW[1], targets_per_pair=2,
                             batch_pairs=2, device="cpu", source="depth", **kw), progress=False)
    assert s.failed == 0, s.failures
    return out


@pytest.fixture(scope="module")
def store(synth_root, tmp_path_factory) -> Path:
    return _build(synth_root, tmp_path_factory)


@pytest.fixture(scope="module")
def snd_store(synth_root, tmp_path_factory) -> Path:
    """A store whose operators bake in the "snd" protocol."""
    return _build(synth_root, tmp_path_factory, targets_protocol="snd", pairs_per_scene=1)


@pytest.mark.parametrize("protocol", ["official", "snd"])
def test_stored_operator_equals_rendering_the_stored_scaffold(store, snd_store, protocol):
    store = store if protocol == "official" else snd_store
    hdr = read_header(store)
    assert hdr["schema_version"] == 5 and hdr["operator"]["ctx_hw"] == list(GRID)
    assert hdr["operator"]["protocol"] == protocol
    r = CacheReader(store)
    torch.manual_seed(0)
    checked = 0
    for name in r.scenes:
        sr = r.scene(name)
        for p in range(sr.n_pairs):
            d = sr.pair(p)
            assert d.operator is not None and d.operator["op_cols"].dtype == torch.int16
            for t, ti in enumerate(d.tgt_index):
                if ti < 0:
                    continue
                stats = d.operator["op_stats"][t]
                assert stats[0] == 0 and stats[1] == 0 and 0 < stats[2] <= 64  # nothing dropped at the defaults
                feats = torch.randn(2, 8, *GRID)
                ref, ref_valid = target_features(
                    feats, PixelGaussians(d.means, d.quats, d.scales, d.opacities), d.ctx_masks, d.tgt_masks[t],
                    d.tgt_K[t], rigid_inverse(d.tgt_c2w[t]), GRID, backend="torch", protocol=protocol)
                op = operator_from_batch({k: v[t][None] for k, v in d.operator.items()})
                got, valid = apply_operator(op, feats[None], GRID)
                assert torch.equal(valid[0], ref_valid)
                scale = ref.abs().max()
                assert scale > 0.1 and (got[0] - ref).abs().max() < 2e-3 * scale  # fp16 coefficients
                checked += 1
    assert checked >= (4 if protocol == "official" else 2)


def test_stream_without_gaussians_carries_operators(store):
    s = ShardStream(store, img_hw=HW, seed=0, gaussians=False, operator=True)
    x = s.sample(0)
    assert x["means"].numel() == 0 and x["op_cols"].shape == (GRID[0] * GRID[1], 64)
    assert x["op_inst"].shape == (128, 2 * GRID[0] * GRID[1]) and x["op_valid"].shape == (GRID[0] * GRID[1],)
    full = ShardStream(store, img_hw=HW, seed=0).sample(0)
    assert torch.equal(full["op_vals"], x["op_vals"]) and full["means"].shape[1:3] == HW


def _cfg(store: Path, run: Path, **kw) -> DistillConfig:
    base = dict(shards=store, run=run, model="snd_test_vit_patch14", init="random", img_height=HW[0], img_width=HW[1],
                head_hidden=64, head_bottleneck=32, head_prototypes=256, iters=4, num_workers=0, log_every=1,
                ckpt_every=100, device="cpu", renderer="torch", lora_dropout=0.0)
    base.update(kw)
    return DistillConfig(**base)


def test_which_targets_a_run_uses(store, tmp_path):
    hdr = read_header(store)
    assert use_stored_operators(_cfg(store, tmp_path), hdr)
    assert not use_stored_operators(_cfg(store, tmp_path, targets="render"), hdr)
    assert not use_stored_operators(_cfg(store, tmp_path, upsample="bilinear"), hdr)  # auto falls back
    assert not use_stored_operators(_cfg(store, tmp_path, render_to_context=True), hdr)
    with pytest.raises(SndError, match="do not fit this run"):
        use_stored_operators(_cfg(store, tmp_path, targets="operator", blend=False), hdr)
    with pytest.raises(SndError, match="no operators"):
        use_stored_operators(_cfg(store, tmp_path, targets="operator"), {"operator": None})


def test_distill_operator_path_matches_render_path(store, tmp_path):
    from snd.stages.distill import run

    a = run(_cfg(store, tmp_path / "op", targets="operator"))
    b = run(_cfg(store, tmp_path / "render", targets="render"))
    la = [a.losses[s] for s in sorted(a.losses)]
    lb = [b.losses[s] for s in sorted(b.losses)]
    assert len(la) == 4 and all(math.isfinite(x) for x in la)
    assert la == pytest.approx(lb, rel=2e-3, abs=1e-4)
    # the run's config.json records the protocol and the target path
    import json

    rec_a = json.loads((tmp_path / "op" / "config.json").read_text())
    rec_b = json.loads((tmp_path / "render" / "config.json").read_text())
    assert rec_a["config"]["targets_protocol"] == "official"
    assert rec_a["targets"]["path"] == "operator" and rec_a["targets"]["protocol"] == "official"
    assert rec_b["targets"]["path"] == "render" and "--targets render" in rec_b["targets"]["why"]


def test_snd_protocol_run_on_an_official_store_renders(store, snd_store, tmp_path):
    """auto: a store built for the other protocol is not used (rendered instead, and said so); with the
    matching protocol the operators are used."""
    import json

    from snd.stages.distill import run

    run(_cfg(store, tmp_path / "a", targets_protocol="snd", iters=1))
    rec = json.loads((tmp_path / "a" / "config.json").read_text())["targets"]
    assert rec["path"] == "render" and "protocol 'official' vs 'snd'" in rec["why"]
    run(_cfg(snd_store, tmp_path / "b", targets_protocol="snd", iters=1))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["targets"]["path"] == "operator"


def test_fast_path_body_equals_the_eager_step(store, tmp_path):
    """GraphStep's body (static buffers, warm-up with forced skips, RNG restore) run eagerly on CPU gives
    the eager loop's losses exactly, with LoRA dropout on; resume reproduces the uninterrupted run."""
    from snd.stages.distill import run

    kw = dict(lora_dropout=0.1, iters=6, ema_every=2, ckpt_every=3)
    a = run(_cfg(store, tmp_path / "eager", fast="off", **kw))
    b = run(_cfg(store, tmp_path / "fast", fast="on", **kw))
    assert [a.losses[s] for s in sorted(a.losses)] == [b.losses[s] for s in sorted(b.losses)]
    assert a.param_digest == b.param_digest and b.ema_updates == 3
    # kill after step 3 (checkpointed), resume: the same losses as the uninterrupted fast run
    from snd.train.loop import train

    c_dir = tmp_path / "fast_resumed"
    train(_cfg(store, c_dir, fast="on", **kw), stop_after=3, progress=False)
    c = run(_cfg(store, c_dir, fast="on", **kw))
    assert c.start_step == 3 and [c.losses[s] for s in sorted(c.losses)] == [b.losses[s] for s in range(4, 7)]
    with pytest.raises(SndError, match="--fast on"):
        run(_cfg(store, tmp_path / "bad", fast="on", targets="render"))


def test_nan_hunt_script_names_the_first_non_finite_stage(store, monkeypatch):
    """`scripts/gpu_nan_hunt.py` (the next device call's diagnosis of skipped steps): a clean store has no bad item;
    an item whose teacher tokens are NaN is counted at that stage, not later ones."""
    import importlib.util

    from snd.train.step import StepRunner

    spec = importlib.util.spec_from_file_location("nan_hunt", Path(__file__).parents[1] / "scripts" / "gpu_nan_hunt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kw = dict(items=3, amp="fp32", device=torch.device("cpu"), model="snd_test_vit_patch14", hw=HW, workers=0)
    clean = mod.hunt(store, **kw)
    assert clean["bad"] == 0 and clean["first_bad_stage"] == {} and clean["items"] == 3
    real, calls = StepRunner.teacher, []

    def teacher(self, batch):
        calls.append(1)
        out = real(self, batch)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(StepRunner, "teacher", teacher)
    bad = mod.hunt(store, **kw)
    assert bad["bad"] == 1 and bad["first_bad_stage"] == {"teacher_tokens": 1}
    assert bad["examples"][0]["stage"] == "teacher_tokens" and bad["examples"][0]["position"] == [1]


def test_a_non_finite_operator_leaves_its_target_out_of_the_store(store, synth_root, tmp_path_factory, monkeypatch, caplog):
    """Stage one never stores an operator with a NaN: the first target of the first pair of each batch gets one
    (as a faulty builder would make it), is left out with a warning naming it, and the pair's second target moves
    up into slot 0 with its operator unchanged; the stream then serves one item fewer per batch."""
    import dataclasses

    import snd.splat.operator as O

    real = O.build_operators

    def poisoned(*a, **kw):
        ops = real(*a, **kw)
        vals = ops.vals.clone()
        vals[0, 0, 0] = float("nan")
        return dataclasses.replace(ops, vals=vals)

    monkeypatch.setattr(O, "build_operators", poisoned)
    with caplog.at_level("WARNING"):
        bad = _build(synth_root, tmp_path_factory)
    assert "left out of the store" in caplog.text
    clean_r, bad_r = CacheReader(store), CacheReader(bad)
    assert clean_r.scenes == bad_r.scenes
    for name in clean_r.scenes:
        c, b = clean_r.scene(name).pair(0), bad_r.scene(name).pair(0)
        assert sum(i >= 0 for i in c.tgt_index) == 2, "the test needs a first pair with two targets"
        assert list(b.tgt_index) == [c.tgt_index[1], -1]
        assert torch.equal(b.tgt_K[0], c.tgt_K[1]) and torch.equal(b.tgt_masks[0], c.tgt_masks[1])
        for k, v in c.operator.items():
            assert torch.equal(b.operator[k][0], v[1]), k
            assert not b.operator[k][1].any(), k
        assert all(torch.isfinite(v.float()).all() for v in b.operator.values())
    n_clean = len(ShardStream(store, img_hw=HW, seed=0).items)
    assert len(ShardStream(bad, img_hw=HW, seed=0).items) == n_clean - len(clean_r.scenes)  # one batch per scene


def test_a_store_from_before_the_builder_fix_is_read_with_one_warning(store, tmp_path, caplog):
    """Stores record the operator builder's revision; one written without it (before the GPU builder's fix) still
    reads, with one warning per store naming it and the remedy."""
    import shutil

    import zarr

    import snd.cache.reader as R
    from snd.cache.schema import OPERATOR_BUILDER

    scene = CacheReader(store).scenes[0]
    assert dict(zarr.open_group(str(store / scene), mode="r").attrs)["operator_builder"] == OPERATOR_BUILDER
    with caplog.at_level("WARNING"):
        CacheReader(store).scene(scene).pair(0)
    assert "operator builder" not in caplog.text
    old = tmp_path / "old"
    shutil.copytree(store, old)
    for name in CacheReader(old).scenes:
        del zarr.open_group(str(old / name), mode="r+").attrs["operator_builder"]
    R._warned.clear()
    with caplog.at_level("WARNING"):
        r = CacheReader(old)
        for name in r.scenes:
            assert r.scene(name).pair(0).operator["op_vals"].shape[0] == 2
    assert caplog.text.count("operator builder revision") == 1 and str(old) in caplog.text
    assert "rebuild the store" in caplog.text


def _op_fields(sr) -> list[str]:
    return [n for n, s in sr.specs.items() if s.kind == "field" and n.startswith("op_")]


def test_each_target_slot_is_its_own_chunk_and_reads_alone(store):
    """Schema v4: an operator field is chunked per (pair, target slot); reading one slot gives exactly that slot
    of the whole pair's arrays, checked against the slot's own checksums."""
    r = CacheReader(store)
    for name in r.scenes:
        sr = r.scene(name)
        assert sr._op_cols is not None and list(sr._op_cols) == _op_fields(sr)
        for n in _op_fields(sr):
            assert sr._array(n).chunks == (1, 1, *sr.specs[n].shape[1:])
        for p in range(sr.n_pairs):
            whole = sr.read_stored(p)
            for t in range(sr.n_targets):
                one = sr.read_stored(p, op_target=t)
                for n in whole:
                    want = whole[n][t:t + 1] if n.startswith("op_") else whole[n]
                    assert one[n].shape == want.shape and (one[n] == want).all(), (n, p, t)


def test_a_slot_rewritten_under_valid_codec_checksums_is_caught(store, tmp_path):
    """Slot 0 of a pair overwritten with slot 1's bytes (Zarr's chunk CRCs stay valid): the slot's read fails
    naming array, pair and slot; `snd cache verify` reports that row once."""
    import shutil

    import zarr

    from snd.cache.verify import verify_store

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    scene = CacheReader(copy).scenes[0]
    arr = zarr.open_array(str(copy / scene / "op_cols"), mode="r+")
    assert not (arr[1, 0] == arr[1, 1]).all()
    arr[1, 0] = arr[1, 1]
    sr = CacheReader(copy).scene(scene)
    sr.read_stored(1, op_target=1)  # the untouched slot still reads
    with pytest.raises(SndError, match=r"pair 1: array 'op_cols' target 0 checksum mismatch"):
        sr.read_stored(1, op_target=0)
    rep = verify_store(copy, progress=False)
    assert [(p.scene, p.array, p.row) for p in rep.problems] == [(scene, "op_cols", 1)]
    assert "the row and target slot(s) [0]" in rep.problems[0].what


def test_a_v3_store_reads_whole_pairs_and_gives_the_same_items(store, tmp_path):
    """A store marked schema v3 (no slot checksums): the reader reads each pair's whole operator rows, checks
    them against the per-pair table and slices the slot; the items carry the same operators. (The chunks stay
    per slot here; a whole-row read is the same Zarr call for either chunking.)"""
    import json
    import shutil

    old = tmp_path / "v3"
    shutil.copytree(store, old)
    for meta in [old / "_snd" / "header.json", old / "manifest.json"]:
        if meta.exists():
            h = json.loads(meta.read_text())
            h["schema_version"] = 3
            meta.write_text(json.dumps(h))
    for zj in old.glob("*/zarr.json"):
        z = json.loads(zj.read_text())
        z["attributes"]["schema_version"] = 3
        del z["attributes"]["checksum_ops"]
        zj.write_text(json.dumps(z))
        shutil.rmtree(zj.parent / "op_crc32c")
    assert read_header(old)["schema_version"] == 3
    sr = CacheReader(old).scene(CacheReader(old).scenes[0])
    assert sr._op_cols is None
    a = ShardStream(old, img_hw=HW, seed=0, gaussians=False, operator=True)
    b = ShardStream(store, img_hw=HW, seed=0, gaussians=False, operator=True)
    assert a.num_items == b.num_items >= 4
    for j in range(a.num_items):
        x, y = a.sample(j), b.sample(j)
        ops = [k for k in y if k.startswith("op_")]
        assert len(ops) == 7 and all(torch.equal(x[k], y[k]) for k in ops)
