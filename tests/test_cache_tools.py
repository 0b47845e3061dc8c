"""`snd cache info | verify | gc` on real procedural stores and evaluation caches (issue #22)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from snd.cache import manifest as M
from snd.cache.gc import gc
from snd.cache.info import cache_info
from snd.cache.reader import CacheReader
from snd.cache.verify import verify_store
from snd.errors import SndError
from snd.pipeline.config import PrecomputeConfig
from snd.stages.precompute import run as precompute
from tests._cli import run_cli
from tests._stage_one import H, W
from tests._stage_one import make_cfg as stage_one_cfg



def make_cfg(data: Path, out: Path, **kw) -> PrecomputeConfig:
    """Stage one's test config at two pairs per scene (operators on, the default: every kind of array is stored)."""
    return stage_one_cfg(data, out, **{"pairs_per_scene": 2, **kw})


@pytest.fixture(scope="module")
def written(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tools") / "store"
    s = precompute(make_cfg(synth_root, out), progress=False)
    assert (s.scenes_done, s.failed) == (2, 0)
    return out, s


@pytest.fixture
def store(written, tmp_path) -> Path:
    """A private copy of the module's store (tests corrupt and repair it)."""
    dst = tmp_path / "store"
    shutil.copytree(written[0], dst)
    return dst


def _arrays(root: Path, scene: str) -> list[str]:
    return sorted(p.name for p in (root / scene).iterdir() if p.is_dir())


def _with_chunks(root: Path, scene: str) -> list[str]:
    """Arrays with chunk files (an all-zero small array, e.g. `offset_range` of the depth source, has none)."""
    return [a for a in _arrays(root, scene) if any(p.is_file() and p.name != "zarr.json" for p in (root / scene / a).rglob("*"))]


def _flip(root: Path, scene: str, array: str) -> Path:
    """Flip one byte of the first chunk data file of `array` (pair 0's chunk, or the small array's only chunk)."""
    f = sorted(p for p in (root / scene / array).rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    data = bytearray(f.read_bytes())
    data[0] ^= 0x5A
    f.write_bytes(bytes(data))
    return f


def test_info_matches_what_precompute_wrote(written, synth_root, capsys):
    out, s = written
    info = cache_info(out)
    assert info["kind"] == "scaffold" and info["scenes"]["complete"] == 2 and info["scenes"]["incomplete"] == {}
    assert info["pairs"] == s.pairs == 4 and info["bytes"] == s.bytes
    assert info["mb_per_pair"] == pytest.approx(s.mb_per_pair)
    r = CacheReader(out)  # targets: the valid target slots of every pair, read back independently
    assert info["targets"] == sum(int((r.scene(n).read_stored(p)["tgt_index"] >= 0).sum())
                                  for n in r.scenes for p in range(r.scene(n).n_pairs))
    header = json.loads((M.meta_dir(out) / "header.json").read_text())
    assert {k: v for k, v in info["header"].items() if k != "totals"} == header
    assert info["header"]["operator"]["ctx_hw"] == [8, 12] and info["header"]["sampler"]["pairs_per_scene"] == 2
    names = r.scene(r.scenes[0]).specs
    frames = {"frame_index", "frame_nbytes", "frame_bytes", "frame_crc32c"}  # the default stores JPEG frames
    assert set(info["arrays"]) == set(names) | {"crc32c", "op_crc32c"} | frames and info["images_stored"] is True
    assert info["arrays"]["quats"]["row_shape"] == [2, 4, H, W] and info["arrays"]["quats"]["dtype"] == "int8"
    assert sum(a["bytes"] for a in info["arrays"].values()) <= s.bytes
    assert len(info["runs"]) == 1 and info["runs"][0]["pairs"] == 4 and info["runs"][0]["scenes_done"] == 2
    assert run_cli(["cache", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 4
    assert run_cli(["cache", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sampler.gap_min" in text and "operator.row_cap" in text and "MB per pair" in text


def test_size_split_parts_and_frames_shared_by_pairs(written):
    """Scaffold / operators / frames parts add up to the arrays' bytes; the frame count is the distinct
    frames the pairs use (read back from each pair's indices), not 5 per pair."""
    out, _ = written
    info = cache_info(out)
    sp = info["split"]
    r = CacheReader(out)
    used = 0
    for n in r.scenes:
        sc = r.scene(n)
        idx = set()
        for p in range(sc.n_pairs):
            rec = sc.read_stored(p)
            idx |= {int(i) for i in rec["ctx_index"]} | {int(i) for i in rec["tgt_index"] if i >= 0}
        used += len(idx)
    assert info["frames"] == sp["frames"] == used < 4 * (2 + 2)
    total = sum(a["bytes"] for a in info["arrays"].values()) / 1e6 / info["pairs"]
    assert sum(sp["mb_per_pair"].values()) == pytest.approx(total)
    assert sp["mb_per_pair"]["frames"] == pytest.approx(sum(a["bytes"] for k, a in info["arrays"].items() if k.startswith("frame_")) / 1e6 / 4)
    assert sp["mb_per_frame"] * used == pytest.approx(sp["mb_per_pair"]["frames"] * 4)
    assert sp["pairs_per_frame"] == pytest.approx(4 / used)


def test_size_split_groups_arrays_by_name():
    from snd.cache.info import size_split

    info = {"pairs": 4, "frames": 10, "arrays": {"quats": {"bytes": 2e6}, "crc32c": {"bytes": 1e6}, "op_cols": {"bytes": 3e6},
                                                  "op_vals": {"bytes": 1e6}, "frame_bytes": {"bytes": 5e6}, "frame_index": {"bytes": 0.0}}}
    sp = size_split(info)
    assert sp["mb_per_pair"] == {"scaffold": 0.75, "operators": 1.0, "frames": 1.25}
    assert sp["mb_per_frame"] == 0.5 and sp["pairs_per_frame"] == 0.4
    assert size_split({"pairs": 0, "frames": 0, "arrays": {}})["pairs_per_frame"] is None


def test_verify_reads_every_array_of_a_clean_store(written):
    out, s = written
    rep = verify_store(out, progress=False)
    n_arrays = len(_arrays(out, CacheReader(out).scenes[0]))
    attrs = [json.loads((out / n / "zarr.json").read_text())["attributes"] for n in CacheReader(out).scenes]
    checked = len(attrs[0]["checksum"]["arrays"])
    frame_rows = sum(a["frames"]["count"] * len(a["frames"]["checksum"]["arrays"]) for a in attrs)  # v3 frames, per frame
    assert frame_rows > 0
    assert rep.ok and rep.scenes == 2 and rep.arrays == 2 * n_arrays and rep.rows == s.pairs * checked + frame_rows


def test_verify_finds_a_flipped_byte_in_every_array_and_names_it(store):
    """Every array the scene group holds (geometry, masks, operators, cameras, the checksum table, and images
    once stores have them): one flipped byte is reported with its scene and array, and nothing else is."""
    scene = CacheReader(store).scenes[1]
    arrays = _with_chunks(store, scene)
    assert {"depth", "quats", "ctx_mask", "tgt_mask", "op_vals", "op_inst", "ctx_K", "crc32c"} <= set(arrays)
    for array in arrays:
        f = _flip(store, scene, array)
        rep = verify_store(store, progress=False, jobs=2)
        assert not rep.ok and rep.bad_scenes == [scene], (array, rep.problems)
        assert {p.array for p in rep.problems} == {array}, (array, [str(p) for p in rep.problems])
        data = bytearray(f.read_bytes())
        data[0] ^= 0x5A  # restore
        f.write_bytes(bytes(data))
    assert verify_store(store, progress=False).ok


def test_verify_names_the_pair_whose_bytes_differ_from_the_table(store, capsys):
    """A chunk rewritten with valid codec checksums but other values: only the per-pair table catches it."""
    import zarr

    scene = CacheReader(store).scenes[0]
    arr = zarr.open_array(str(store / scene / "op_vals"), mode="r+")
    arr[1] = (arr[1].astype(np.float32) + 1).astype(np.float16)
    rep = verify_store(store, progress=False)
    assert [(p.scene, p.array, p.row) for p in rep.problems] == [(scene, "op_vals", 1)]
    assert "checksum mismatch" in rep.problems[0].what
    assert run_cli(["cache", "verify", str(store)]) == 1
    err = capsys.readouterr().err
    assert f"scene '{scene}' pair 1 array 'op_vals'" in err and "--fix" in err


def test_fix_then_rerun_is_byte_identical_to_an_uninterrupted_run(written, store, synth_root):
    base = written[0]
    bad, good = CacheReader(store).scenes
    _flip(store, bad, "quats")
    before_good = M.scene_digests(store)[good]
    assert run_cli(["cache", "verify", str(store), "--fix"]) == 1  # corruption found (and removed)
    assert not (store / bad).exists() and not (M.markers_dir(store) / f"{bad}.json").exists()
    assert CacheReader(store).scenes == [good] and verify_store(store, progress=False).ok
    s = precompute(make_cfg(synth_root, store), progress=False)
    assert (s.scenes_done, s.scenes_skipped, s.failed) == (1, 1, 0)  # only the removed scene is redone
    assert M.scene_digests(store) == M.scene_digests(base) and M.scene_digests(store)[good] == before_good
    assert verify_store(store, progress=False).ok


def test_verify_reports_and_fixes_a_garbled_marker(store, capsys):
    """A garbled completion marker made `snd cache verify` (and --fix) stop with an error instead of naming
    the scene as bad and removing it so precompute redoes it."""
    bad, good = CacheReader(store).scenes
    (M.markers_dir(store) / f"{bad}.json").write_text('{"scene": ')
    assert run_cli(["cache", "verify", str(store)]) == 1
    assert f"scene '{bad}': completion marker unreadable" in capsys.readouterr().err.replace("\n", "")
    assert run_cli(["cache", "verify", str(store), "--fix"]) == 1
    assert not (store / bad).exists() and CacheReader(store).scenes == [good]
    assert verify_store(store, progress=False).ok


def test_gc_refuses_a_store_being_written_and_never_removes_a_complete_scene(synth_root, tmp_path):
    out = tmp_path / "live"
    seen: list = []

    def during(scene: str, pairs_done: int) -> None:  # called mid-run: the scene in flight has a temp group
        if seen:
            return
        assert any(M.tmp_dir(out).iterdir())
        for yes in (False, True):
            with pytest.raises(SndError, match="in use by a running process"):
                gc(out, yes=yes)
        with pytest.raises(SndError, match="in use"):
            verify_store(out, fix=True, progress=False)
        seen.append(sorted(p.name for p in M.tmp_dir(out).iterdir()))

    s = precompute(make_cfg(synth_root, out, operator=False), progress=False, on_batch=during)  # no operators: faster
    assert seen and s.scenes_done == 2
    complete = CacheReader(out).scenes
    digests = M.scene_digests(out)
    # leftovers of killed runs: a temp group, an unmarked group, a failure record, temp JSON files
    (M.tmp_dir(out) / "sceneX.0123456789ab").mkdir()
    (M.tmp_dir(out) / "sceneX.0123456789ab" / "zarr.json").write_text("{}")
    shutil.copytree(out / complete[0], out / "unmarked_scene")
    M.write_failure(out, "broken_scene", "boom")
    (M.markers_dir(out) / f".{complete[0]}.json.1234.tmp").write_text("{")
    (out / ".manifest.json.abcd.tmp").write_text("{")
    listed = gc(out)
    names = sorted(c.path.name for c in listed.candidates)
    assert names == sorted(["sceneX.0123456789ab", "unmarked_scene", "broken_scene.failed.json",
                            f".{complete[0]}.json.1234.tmp", ".manifest.json.abcd.tmp"])
    assert (out / "unmarked_scene").exists() and not listed.removed  # listing removes nothing
    assert cache_info(out)["scenes"]["incomplete"].keys() == {"broken_scene", "sceneX", "unmarked_scene"}
    assert gc(out, yes=True).removed
    assert M.scene_digests(out) == digests and CacheReader(out).scenes == complete
    assert not (out / "unmarked_scene").exists() and not any(M.tmp_dir(out).iterdir())
    assert gc(out).candidates == [] and verify_store(out, progress=False).ok


# ---- evaluation caches ---------------------------------------------------------------------------
def test_eval_cache_info_and_gc_keep(tmp_path, monkeypatch):
    from snd.cache import gc as G
    from snd.cache.inuse import hold_in_use
    from snd.eval.features import cache_key, ensure_features, weights_fingerprint
    from snd.models.backbone import create_backbone

    hw = (28, 42)
    torch.manual_seed(0)
    a, b = create_backbone("snd_test_vit_patch14", init="random"), create_backbone("snd_test_vit_patch14", init="random")
    images = [{"image": torch.rand(3, *hw)} for _ in range(3)]
    cache = tmp_path / "features"
    ensure_features(a, images, cache_dir=cache, dataset_name="toy", split="train", img_hw=hw, batch=2)
    ensure_features(b, images, cache_dir=cache, dataset_name="toy", split="val", img_hw=hw, batch=2, indices=[0, 1],
                    precision="bf16")
    ka, kb = cache_key(a, hw), cache_key(b, hw, "bf16")
    info = cache_info(tmp_path)  # the eval --out folder: its features/ is found
    keys = {k["key"]: k for k in info["keys"]}
    assert keys.keys() == {ka, kb} and keys[ka]["weights_sha256"] == weights_fingerprint(a)
    assert keys[kb]["precision"] == "bf16" and keys[ka]["img_hw"] == list(hw)
    sa, sb = keys[ka]["stores"][0], keys[kb]["stores"][0]
    assert (sa["dataset"], sa["store"], sa["rows"], sa["complete"]) == ("toy", "train", 3, True) and sa["mb"] > 0
    assert (sb["store"], sb["rows"], sb["complete"]) == ("val_n2", 2, True)
    import io

    from rich.console import Console

    from snd.cache.info import print_info

    con = Console(file=io.StringIO(), width=80)  # what a pipe gets: every key whole (`gc --keep` takes it), no "…"
    print_info(info, con)
    text = con.file.getvalue()
    assert "…" not in text and ka in text and kb in text and "toy/val_n2" in text and "MB" in text
    # gc: keys of weights not kept go; by hash recorded in model.json, or (older folders) by recomputing the key
    mj = cache / kb / "model.json"
    mj.write_text(json.dumps({k: v for k, v in json.loads(mj.read_text()).items() if k != "weights_sha256"}))
    monkeypatch.setattr(G, "_fingerprint", lambda spec: {"A": weights_fingerprint(a), "B": weights_fingerprint(b)}[spec])
    assert [c.path.name for c in gc(cache).candidates] == sorted([ka, kb])
    assert [c.path.name for c in gc(cache, keep=["B"]).candidates] == [ka]
    assert [c.path.name for c in gc(cache, keep=["A", kb]).candidates] == []
    with hold_in_use(cache):  # a running `snd eval` holds it
        with pytest.raises(SndError, match="in use"):
            gc(cache, keep=["B"], yes=True)
    rep = gc(cache, keep=["B"], yes=True)
    assert rep.removed and not (cache / ka).exists() and (cache / kb).exists()


def test_not_a_cache_is_one_clear_error(tmp_path):
    assert run_cli(["cache", "info", str(tmp_path)]) == 2
    with pytest.raises(SndError, match="not a cache folder"):
        cache_info(tmp_path)


def test_distill_verify_store_checks_before_training(store, tmp_path, monkeypatch, capsys):
    import snd.stages.distill as D
    from snd.pipeline.config import DistillConfig
    from snd.train.loop import TrainSummary

    calls: list = []
    monkeypatch.setattr(D, "train", lambda c: calls.append(c) or TrainSummary(run=c.run, start_step=0, step=1))
    cfg = DistillConfig(shards=store, run=tmp_path / "run", img_height=56, img_width=84, iters=1, verify_store=True)
    D.run(cfg)
    assert len(calls) == 1 and "verified" in capsys.readouterr().err
    bad = CacheReader(store).scenes[0]
    _flip(store, bad, "op_inst")
    with pytest.raises(SndError, match=f"corrupted.*{bad}"):
        D.run(cfg)
    assert len(calls) == 1, "training must not start on a corrupted store"
    D.run(DistillConfig(shards=store, run=tmp_path / "run", img_height=56, img_width=84, iters=1))  # off by default
    assert len(calls) == 2
