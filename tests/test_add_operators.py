"""`snd cache add-operators`: operators built from a store alone equal the ones stage one builds, the copy is
otherwise the source's, a killed run resumes, and bad input fails clearly without touching the source."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from snd.cache.manifest import read_header
from snd.cache.reader import CacheReader
from snd.cache.stream import ShardStream
from snd.errors import SndError
from snd.pipeline.config import CacheAddOperatorsConfig, PrecomputeConfig
from snd.stages.precompute.add_operators import add_operators

HW = (56, 84)
IMG = (28, 42)  # stage two's input: 2x3 patches of 14


def _precompute(synth_root: Path, out: Path, **kw) -> Path:
    from snd.stages.precompute import run

    s = run(PrecomputeConfig(data=synth_root, out=out, height=HW[0], width=HW[1], pairs_per_scene=2, targets_per_pair=2,
                             batch_pairs=2, device="cpu", source="depth", operator_img_height=IMG[0], operator_img_width=IMG[1],
                             **kw), progress=False)
    assert s.failed == 0, s.failures
    return out


@pytest.fixture(scope="module")
def stores(synth_root, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("addops")
    return {"with": _precompute(synth_root, base / "with"), "without": _precompute(synth_root, base / "without", operator=False)}


def _pairs(root: Path):
    r = CacheReader(root)
    for name in r.scenes:
        sr = r.scene(name)
        for p in range(sr.n_pairs):
            yield name, p, sr.read_stored(p)


def test_operators_from_the_store_equal_stage_ones_and_the_rest_is_copied(stores, tmp_path):
    src = stores["without"]
    before = {p.relative_to(src): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
    rep = add_operators(src, CacheAddOperatorsConfig(out=tmp_path / "added", device="cpu"), progress=False)
    assert rep["scenes_written"] == 2 and rep["scenes_already_complete"] == 0 and rep["pairs"] == 4
    assert {p.relative_to(src): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()} == before  # untouched
    added, direct, plain = (list(_pairs(x)) for x in (tmp_path / "added", stores["with"], src))
    assert len(added) == len(direct) == len(plain) == 4
    for (n, p, a), (n2, p2, d), (_, _, s) in zip(added, direct, plain):
        assert (n, p) == (n2, p2) and a.keys() == d.keys()
        ops = [k for k in a if k.startswith("op_")]
        assert len(ops) == 7 and all(np.array_equal(a[k], d[k]) for k in ops), (n, p)  # bit-identical on the CPU
        assert all(np.array_equal(a[k], s[k]) for k in s)  # everything else as the source holds it
    ra, rs = CacheReader(tmp_path / "added"), CacheReader(src)
    for name in rs.scenes:
        assert all(torch.equal(ra.scene(name).frame(i), rs.scene(name).frame(i)) for i in rs.scene(name)._frame_row)
    assert ra.verify_all() > 0
    h = read_header(tmp_path / "added")
    assert h["operator"] == read_header(stores["with"])["operator"] and h["operators_added_from"]["store"] == str(src.resolve())
    # stage two takes the fast path's inputs from it: the same items as from the store stage one built with operators
    a = ShardStream(tmp_path / "added", img_hw=IMG, seed=0, gaussians=False)
    b = ShardStream(stores["with"], img_hw=IMG, seed=0, gaussians=False)
    x, y = a.sample(1), b.sample(1)
    assert all(torch.equal(x[k], y[k]) for k in y if isinstance(y[k], torch.Tensor))


def test_a_killed_run_resumes_and_other_settings_are_refused(stores, tmp_path, monkeypatch):
    import snd.stages.precompute.add_operators as mod

    src, out = stores["without"], tmp_path / "added"
    real, calls = mod._build_operators, []

    def dies_in_the_second_scene(fields, batch, *a, **k):
        calls.append(batch.scene)
        if len(set(calls)) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C / kill mid-scene
        return real(fields, batch, *a, **k)

    monkeypatch.setattr(mod, "_build_operators", dies_in_the_second_scene)
    with pytest.raises(KeyboardInterrupt):
        add_operators(src, CacheAddOperatorsConfig(out=out, device="cpu", batch_pairs=1), progress=False)
    assert CacheReader(out).scenes == [calls[0]] and not list((out / "_snd" / "tmp").iterdir())  # one complete, no debris
    monkeypatch.setattr(mod, "_build_operators", real)
    rep = add_operators(src, CacheAddOperatorsConfig(out=out, device="cpu"), progress=False)
    assert rep["scenes_written"] == 1 and rep["scenes_already_complete"] == 1
    assert [(n, p) for n, p, _ in _pairs(out)] == [(n, p) for n, p, _ in _pairs(stores["with"])]
    assert all(np.array_equal(a["op_vals"], d["op_vals"]) for (_, _, a), (_, _, d) in zip(_pairs(out), _pairs(stores["with"])))
    with pytest.raises(SndError, match="different settings"):  # the same --out with other operators
        add_operators(src, CacheAddOperatorsConfig(out=out, device="cpu", targets_protocol="snd"), progress=False)


def test_scenes_split_over_ranks_make_the_same_store(stores, tmp_path):
    """--rank/--world-size split the scenes as stage one does: two ranks (run one after the other here) write the
    store one process writes."""
    reps = [add_operators(stores["without"], CacheAddOperatorsConfig(out=tmp_path / "two", device="cpu", rank=r, world_size=2),
                          progress=False) for r in (0, 1)]
    assert [(x["rank"], x["scenes_written"]) for x in reps] == [(0, 1), (1, 1)]
    two, one = list(_pairs(tmp_path / "two")), list(_pairs(stores["with"]))
    assert [(n, p) for n, p, _ in two] == [(n, p) for n, p, _ in one]
    assert all(np.array_equal(a[k], b[k]) for (_, _, a), (_, _, b) in zip(two, one) for k in b)


def test_rebuilding_for_another_input_size_replaces_the_operators(stores, tmp_path):
    """A store's operators built for one backbone size, rebuilt for another: the new grid, as stage one builds it."""
    rep = add_operators(stores["with"], CacheAddOperatorsConfig(out=tmp_path / "b", device="cpu", operator_img_height=42,
                                                                 operator_img_width=56), progress=False)
    assert rep["operator"]["ctx_hw"] == [3, 4]
    h = read_header(tmp_path / "b")
    assert h["operator"]["ctx_hw"] == [3, 4] and h["config"]["operator_img_height"] == 42
    _, _, row = next(_pairs(tmp_path / "b"))
    assert row["op_cols"].shape[1] == 12  # 3x4 target patches per slot


def test_bad_input_names_the_folder_and_writes_nothing(stores, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(SndError, match="CUDA"):
            add_operators(stores["without"], CacheAddOperatorsConfig(out=tmp_path / "c", device="cuda"), progress=False)
        assert not (tmp_path / "c").exists()
    with pytest.raises(SndError, match="source store itself"):
        add_operators(stores["without"], CacheAddOperatorsConfig(out=stores["without"], device="cpu"), progress=False)
    with pytest.raises(SndError) as e:
        add_operators(tmp_path / "nothing", CacheAddOperatorsConfig(out=tmp_path / "o", device="cpu"), progress=False)
    assert "nothing" in str(e.value) and not (tmp_path / "o").exists()
    broken = tmp_path / "broken"
    shutil.copytree(stores["without"], broken)
    name = CacheReader(broken).scenes[0]
    z = json.loads((broken / name / "zarr.json").read_text())
    shard = next(p for p in sorted((broken / name / "quats").rglob("*")) if p.is_file() and p.name != "zarr.json")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(SndError, match=name):
        add_operators(broken, CacheAddOperatorsConfig(out=tmp_path / "o2", device="cpu"), progress=False)
    assert z["attributes"]["n_pairs"] >= 1 and CacheReader(tmp_path / "o2").scenes == []  # the bad scene not written
