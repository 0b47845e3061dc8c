"""Stage one end to end on procedural scenes: CLI, geometry against the mesh, PSNR loss of the encoding,
kill -9 + resume, ranks, and failing scenes."""
from __future__ import annotations

import json

import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from snd.cache import manifest as M
from snd.cache.encode import decode_scaffold, encode_scaffold
from snd.cache.reader import CacheReader
from snd.cache.schema import Encoding
from snd.stages.precompute import run
from tests._stage_one import H, W, kill_mid_second_scene, make_cfg, store_files

@pytest.fixture(scope="module")
def baseline(synth_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "cache"
    s = run(make_cfg(synth_root, out), progress=False)
    assert (s.scenes_done, s.failed, s.pairs) == (2, 0, 8), s
    return out


def test_run_writes_complete_store(baseline, synth_root):
    man = M.read_manifest(baseline)
    assert len(man["scenes"]) == 2 and all(r["status"] == "complete" for r in man["scenes"].values())
    assert man["data_root"] == str(synth_root.resolve()) and man["dataset"]["layout"] == "scannetpp"
    assert man["source"]["name"] == "depth" and man["encoding"]["offset"] is False
    r = CacheReader(baseline)
    assert r.verify_all() == 8
    s = r.scene(r.scenes[0])
    pair = s.pair(0)
    assert pair.means.shape == (2, H, W, 3) and pair.tgt_masks.shape == (2, H, W)
    assert 8 <= pair.ctx_index[1] - pair.ctx_index[0] <= 12
    assert all(pair.ctx_index[0] < t < pair.ctx_index[1] for t in pair.tgt_index)
    # a rerun skips every complete scene and changes nothing
    before = {n: store_files(baseline, n) for n in r.scenes}
    s2 = run(make_cfg(synth_root, baseline), progress=False)
    assert (s2.scenes_done, s2.scenes_skipped, s2.failed) == (0, 2, 0)
    assert {n: store_files(baseline, n) for n in r.scenes} == before


def test_cli_precompute(synth_root, tmp_path):
    from snd.cli import main

    out = tmp_path / "cli_cache"
    with pytest.raises(SystemExit) as e:
        main(["precompute", "--data", str(synth_root), "--scenes", "2", "--out", str(out), "--height", str(H),
              "--width", str(W), "--pairs-per-scene", "1", "--targets-per-pair", "1", "--device", "cpu"])
    assert e.value.code in (0, None)
    assert len(CacheReader(out).scenes) == 2


def test_depth_scaffold_lies_on_the_mesh(baseline, synth_root):
    """Decoded means of the cached depth scaffold sit on the true (mesh) surface: < 1e-3 relative. Every
    pair of every scene: the stage queues batch k+1 before it stores batch k, and a field landing with
    another batch's cameras would decode off the surface."""
    from snd.data.ply import read_mesh
    from snd.data.raycast import MeshRaycaster

    r = CacheReader(baseline)
    rng = np.random.default_rng(0)
    for name in r.scenes:
        verts, faces, _ = read_mesh(synth_root / "data" / name / "scans" / "mesh_aligned_0.05.ply")
        s = r.scene(name)
        for p in range(s.n_pairs):
            _check_on_mesh(s.pair(p), MeshRaycaster(verts, faces), verts, faces, rng)


def _check_on_mesh(pair, rc, verts, faces, rng) -> None:
    for v in range(2):
        m = pair.means[v].double().numpy().reshape(-1, 3)
        valid = pair.opacities[v].numpy().reshape(-1) > 0
        assert valid.mean() > 0.9
        idx = rng.choice(np.flatnonzero(valid), 500, replace=False)
        c = pair.ctx_c2w[v, :3, 3].double().numpy()
        dirs = m[idx] - c
        rng_dist = np.linalg.norm(dirs, axis=1)
        face = rc.first_face(np.repeat(c[None], len(idx), 0), dirs)
        assert (face >= 0).all()
        tri = verts[faces[face]]  # [n, 3, 3]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        # point-to-plane distance along the ray, relative to the range
        dist = np.abs(((m[idx] - tri[:, 0]) * normal).sum(1)) / np.abs((dirs / rng_dist[:, None] * normal).sum(1))
        assert np.quantile(dist / rng_dist, 0.99) < 1e-3 and np.median(dist / rng_dist) < 3e-4, np.max(dist / rng_dist)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-20))


def _render(g: tuple, colours: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    from snd.splat.inputs import SplatInput
    from snd.splat.render import render_features

    means, quats, scales, opac = (x.reshape(-1, x.shape[-1]) if x.dim() == 4 else x.reshape(-1) for x in g)
    w2c = torch.linalg.inv(c2w.double()).float()
    img, _ = render_features(SplatInput(means, quats, scales, opac, K.float(), w2c, H, W), colours, backend="torch")
    return img.clamp(0, 1)


@pytest.mark.parametrize("kind", ["depth", "mvsplat_like"])
def test_cached_scaffold_psnr_loss_below_0p1_db(synth_root, kind):
    """Render the target view's colours from the decoded vs the float32 scaffold: PSNR loss < 0.1 dB."""
    from snd.data import open_dataset
    from snd.data.pairs import sample_pairs
    from snd.splat.from_depth import gaussians_from_depth

    ds = open_dataset(synth_root, height=H, width=W)
    scene = ds.scene(ds.scene_names("distill")[0])
    pair = sample_pairs(scene, gap_min=8, gap_max=8, pairs_per_scene=1, targets_per_pair=1, seed=0)[0]
    cams = [scene.camera(i) for i in pair.ctx]
    K = torch.tensor(np.stack([c.K for c in cams]))[None]
    c2w = torch.tensor(np.stack([c.c2w for c in cams]))[None]
    depth = torch.tensor(np.stack([scene.depth(i) for i in pair.ctx]))
    g = gaussians_from_depth(depth, K[0].float(), c2w[0].float())
    means, quats, scales, opac = g.means[None], g.quats[None], g.scales[None], g.opacities[None]
    enc = Encoding(offset=kind != "depth")
    if kind == "mvsplat_like":  # anisotropic, rotated, partly transparent, off-centre Gaussians
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(quats.shape, generator=gen)
        quats = q / q.norm(dim=-1, keepdim=True)
        scales = scales * torch.exp(0.4 * torch.randn(scales.shape, generator=gen))
        opac = torch.where(opac > 0, 0.5 + 0.49 * torch.rand(opac.shape, generator=gen), opac)
        off = (torch.rand(*means.shape[:-1], 2, generator=gen, dtype=torch.float64) - 0.5)
        z = depth.double()[None]
        v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
        uv1 = torch.stack([u + off[..., 0], v + off[..., 1], torch.ones_like(off[..., 0])], -1)
        d = torch.einsum("bvij,bvhwj->bvhwi", torch.linalg.inv(K), uv1) * z[..., None]
        means = (torch.einsum("bvij,bvhwj->bvhwi", c2w[..., :3, :3], d) + c2w[:, :, None, None, :3, 3]).float()
    dec = decode_scaffold(encode_scaffold(means, quats, scales, opac, K, c2w, enc=enc), K, c2w, enc=enc)
    colours = torch.tensor(np.stack([scene.image(i) for i in pair.ctx]), dtype=torch.float32).reshape(-1, 3) / 255
    t = pair.targets[0]
    tcam = scene.camera(t)
    gt = torch.tensor(scene.image(t), dtype=torch.float32).permute(2, 0, 1) / 255
    ref = _render((means[0], quats[0], scales[0], opac[0]), colours, torch.tensor(tcam.K), torch.tensor(tcam.c2w))
    got = _render(tuple(x[0] for x in dec), colours, torch.tensor(tcam.K), torch.tensor(tcam.c2w))
    loss = _psnr(ref, gt) - _psnr(got, gt)
    print(f"{kind}: PSNR fp32 {_psnr(ref, gt):.3f} dB, cached {_psnr(got, gt):.3f} dB, loss {loss:.4f} dB, cached-vs-fp32 {_psnr(got, ref):.1f} dB")
    assert abs(loss) < 0.1, (loss, _psnr(ref, gt), _psnr(got, gt))
    assert _psnr(got, ref) > 40, _psnr(got, ref)


def test_operators_on_the_main_thread_give_the_same_store(baseline, synth_root, tmp_path):
    """The operator stage on a thread of its own (the default) and inline on the main thread (the pipeline
    before 2026-12-06, `--no-operator-thread`) write byte-identical scene groups: same batches, same order."""
    out = tmp_path / "inline"
    s = run(make_cfg(synth_root, out, operator_thread=False), progress=False)
    assert (s.scenes_done, s.failed, s.pairs) == (2, 0, 8)
    names = CacheReader(baseline).scenes
    assert CacheReader(out).scenes == names
    for n in names:
        assert store_files(out, n) == store_files(baseline, n), n
    assert M.read_manifest(out)["scenes"] == M.read_manifest(baseline)["scenes"]


def test_two_operator_workers_give_the_same_store(baseline, synth_root, tmp_path):
    """`--operator-workers 2` builds successive batches at once; the writer still gets them in order (one pair a
    batch here, so four batches per scene interleave), so the scene groups are byte-identical."""
    out = tmp_path / "workers2"
    s = run(make_cfg(synth_root, out, operator_workers=2, batch_pairs=1), progress=False)
    assert (s.scenes_done, s.failed, s.pairs) == (2, 0, 8)
    # as run: two workers, and no streams of their own on the CPU (the defaults ask for them on CUDA only)
    assert (s.operator_workers, s.operator_stream, s.operator_priority) == (2, False, False)
    for n in CacheReader(baseline).scenes:
        assert store_files(out, n) == store_files(baseline, n), n


@pytest.mark.parametrize("threaded,workers", [(True, 1), (False, 1), (True, 2)])
def test_an_operator_error_stops_the_run_with_that_error(synth_root, tmp_path, monkeypatch, threaded, workers):
    """A builder that fails (a bug, not a bad scene) stops stage one with its own exception, in the main thread,
    threaded or not; no scene is committed with a batch missing, and the run does not hang on a full queue."""
    from snd.stages.precompute import operators as mod

    real, calls = mod._build_operators, []

    def fails_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("builder bug")
        return real(*a, **kw)

    monkeypatch.setattr(mod, "_build_operators", fails_second)
    out = tmp_path / "err"
    with pytest.raises(RuntimeError, match="builder bug"):
        run(make_cfg(synth_root, out, batch_pairs=1, operator_thread=threaded, operator_workers=workers), progress=False)
    assert CacheReader(out).scenes == []  # the store exists (begun before the first batch), with no scene in it
    assert 2 <= len(calls) <= 1 + workers  # after the failure, at most the batch a second worker had begun


ERROR_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from snd.pipeline.config import PrecomputeConfig
    from snd.stages.precompute import operators, run
    real, calls = operators._build_operators, []
    def fails_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(0.5)  # the other worker is inside the next batch's build by now
            raise RuntimeError("builder bug")
        if len(calls) == 3:  # a build still running when the error reaches the main thread
            x = torch.randn(1000, 1000)
            t = time.time()
            while time.time() - t < 1:
                x = torch.tanh(x @ x)
        return real(*a, **kw)
    operators._build_operators = fails_second
    run(PrecomputeConfig(data=Path(sys.argv[1]), out=Path(sys.argv[2]), height=112, width=168, pairs_per_scene=4,
                         targets_per_pair=2, batch_pairs=1, device="cpu", source="depth", seed=0, operator_workers=2),
        progress=False)
""")


def test_an_operator_error_exits_with_its_message_and_status_1(synth_root, tmp_path):
    """With two operator workers, a builder error ends the process with its message and status 1, while the
    other worker is still inside a build (`OperatorStage.stop_now` lets it finish unseen and joins it)."""
    proc = subprocess.run([sys.executable, "-c", ERROR_SCRIPT, str(synth_root), str(tmp_path / "c")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "RuntimeError: builder bug" in proc.stderr and "terminate called" not in proc.stderr


def test_kill_9_then_resume_gives_byte_identical_shards(baseline, synth_root, tmp_path):
    out = tmp_path / "killed"
    proc, _, _ = kill_mid_second_scene(synth_root, out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = CacheReader(baseline).scenes
    assert len(CacheReader(out).scenes) <= 1  # the scene in flight is not complete
    s = run(make_cfg(synth_root, out), progress=False)
    assert s.failed == 0 and s.scenes_done + s.scenes_skipped == 2
    assert CacheReader(out).scenes == names
    for n in names:
        assert store_files(out, n) == store_files(baseline, n), n
    assert not list(M.tmp_dir(out).iterdir())


def test_two_ranks_write_disjoint_scenes_whose_union_is_the_single_run(baseline, synth_root, tmp_path, monkeypatch):
    out = tmp_path / "ranks"
    names = CacheReader(baseline).scenes
    s0 = run(make_cfg(synth_root, out, rank=0, world_size=2), progress=False)
    after0 = set(CacheReader(out).scenes)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    s1 = run(make_cfg(synth_root, out), progress=False)  # rank from torchrun's env
    after1 = set(CacheReader(out).scenes)
    assert s0.scenes_done == 1 and s1.scenes_done == 1 and s1.scenes_skipped == 0
    assert len(after0) == 1 and after0 < after1 and after1 == set(names)
    for n in names:
        assert store_files(out, n) == store_files(baseline, n), n
    assert M.scene_digests(out) == M.scene_digests(baseline) and set(M.scene_digests(out)) == set(names)
    runs = sorted((M.meta_dir(out) / "runs").glob("*.json"), key=lambda p: p.name[-10:])
    recs = [json.loads(p.read_text()) for p in runs]
    assert [(r["rank"], r["world_size"], r["pairs"]) for r in recs] == [(0, 2, s0.pairs), (1, 2, s1.pairs)]
    assert len(recs[0]["scenes"]) == len(recs[1]["scenes"]) == 1 and sorted(recs[0]["scenes"] + recs[1]["scenes"]) == sorted(names)


def test_bad_scene_is_reported_and_others_complete(synth_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    from snd.data import open_dataset

    bad = open_dataset(data).scene_names("distill")[0]
    for img in (data / "data" / bad / "dslr" / "resized_undistorted_images").iterdir():
        img.write_bytes(b"not a jpeg")
    s = run(make_cfg(data, tmp_path / "cache"), progress=False)
    assert s.failed == 1 and s.scenes_done == 1 and list(s.failures) == [bad], s
    man = M.read_manifest(tmp_path / "cache")
    assert man["scenes"][bad]["status"] == "failed"
    assert not (tmp_path / "cache" / bad).exists() and not list(M.tmp_dir(tmp_path / "cache").iterdir())


def test_missing_mvsplat_checkpoint_is_a_clear_error(synth_root, tmp_path):
    from snd.errors import SndError

    with pytest.raises(SndError, match="--mvsplat-ckpt"):
        run(make_cfg(synth_root, tmp_path / "c", source="mvsplat"), progress=False)
    with pytest.raises(SndError, match="MVSplat checkpoint"):
        run(make_cfg(synth_root, tmp_path / "c", source="mvsplat", mvsplat_ckpt=tmp_path / "nope.ckpt"), progress=False)


def test_mvsplat_source_through_the_stage_on_cpu(synth_root, tmp_path):
    """Random-init MVSplat (tiny size): offsets are stored and the decoded means match the fp32 ones."""
    from snd.scaffold import create_source

    src = create_source("mvsplat", device="cpu", random_init=True, config="re10k")
    cfg = make_cfg(synth_root, tmp_path / "c", height=64, width=96, scenes=1, pairs_per_scene=1, targets_per_pair=1,
                   source="mvsplat", mvsplat_config="re10k")
    s = run(cfg, source=src, progress=False)
    assert (s.scenes_done, s.failed, s.pairs) == (1, 0, 1)
    r = CacheReader(tmp_path / "c")
    assert r.manifest["encoding"]["offset"] is True and r.manifest["source"]["name"] == "mvsplat"
    sr = r.scene(r.scenes[0])
    p = sr.pair(0)
    from snd.data import open_dataset

    scene = open_dataset(synth_root, height=64, width=96).scene(r.scenes[0])
    imgs = torch.stack([torch.from_numpy(np.array(scene.image(i))).permute(2, 0, 1).float() / 255 for i in p.ctx_index])[None]
    st = sr.read_stored(0)
    g = src.predict(imgs, torch.from_numpy(st["ctx_K"])[None].float(), torch.from_numpy(st["ctx_c2w"])[None].float())[0]
    rel = (p.means - g.means).norm(dim=-1) / (g.means - p.ctx_c2w[:, None, None, :3, 3]).norm(dim=-1)
    assert rel.max() < 1e-3, rel.max()
    assert (p.opacities - g.opacities).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mvsplat_random_init_precompute_on_gpu(tmp_path):
    """The mvsplat source through the whole stage at a small size (random weights; checks plumbing)."""
    from snd.data.synth import generate_dataset
    from snd.pipeline.config import SynthConfig
    from snd.scaffold import create_source

    generate_dataset(SynthConfig(out=tmp_path / "d", scenes=2, frames=16, height=128, width=192, objects=3, seed=1))
    cfg = make_cfg(tmp_path / "d", tmp_path / "c", height=128, width=192, device="cuda", source="mvsplat")
    src = create_source("mvsplat", device="cuda", random_init=True)
    s = run(cfg, source=src, progress=False)
    assert s.failed == 0 and s.pairs == 8
    r = CacheReader(tmp_path / "c")
    p = r.scene(r.scenes[0]).pair(0)
    assert torch.isfinite(p.means).all() and r.manifest["encoding"]["offset"] is True
    assert os.path.getsize(tmp_path / "c" / "manifest.json") > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["depth", "mvsplat"])
def test_launch_queues_a_batch_without_synchronising(tmp_path, kind):
    """Stage one queues batch k+1 before it lands batch k; that only overlaps if launching a batch (copy in,
    network, quantiser, copy out) never waits for the device. CUDA's sync debug mode reports every wait
    (with its source line); the landed fields equal the one-batch-at-a-time encoding."""
    from snd.scaffold import create_source
    from snd.stages.precompute import _Batch, _land, _launch

    h, w, B = 128, 192, 2
    g = torch.Generator().manual_seed(0)
    K = np.tile(np.array([[150.0, 0, w / 2], [0, 150.0, h / 2], [0, 0, 1]]), (B, 2, 1, 1))
    c2w = np.tile(np.eye(4), (B, 2, 1, 1))
    c2w[:, 1, 0, 3] = 0.2
    batches = [_Batch("s", torch.randint(0, 256, (B, 2, h, w, 3), dtype=torch.uint8, generator=g).pin_memory(),
                      (2 + torch.rand(B, 2, h, w, generator=g)).pin_memory() if kind == "depth" else None,
                      K, c2w, {}) for _ in range(2)]
    src = create_source(kind, device="cuda", random_init=True, compile="off")
    enc = Encoding(offset=src.has_offset)
    ref = [_land(_launch(src, b, enc, {}), enc, {}) for b in batches]  # also warms up lazy inits
    torch.cuda.synchronize()
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # every synchronising call, not just the first
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            first = _launch(src, batches[0], enc, {})
            second = _launch(src, batches[1], enc, {})
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert not syncs, syncs
    for f, r in zip((first, second), ref):
        got = _land(f, enc, {})
        assert set(got) == set(r)
        for k in r:  # exact for the depth source; a network run twice may differ by a quantisation step
            d = np.abs(got[k].astype(np.float64) - r[k].astype(np.float64))
            assert d.max() <= (0 if kind == "depth" else 1) + 1e-3 * np.abs(r[k]).max(), (k, d.max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_operators_on_their_own_stream_equal_those_queued_behind_the_network(tmp_path):
    """`--operator-stream` (the default on CUDA) builds a batch's operators on a second stream while the next
    batch's scaffold is computed; the stores must hold the same operators as with the builder queued behind it
    (compared as dense matrices, since near-equal coefficients may swap places in a row; float16 as stored, and
    the instance part comes from gsplat's atomic backward, hence a float16 step of tolerance)."""
    from snd.data.synth import generate_dataset
    from snd.pipeline.config import SynthConfig

    generate_dataset(SynthConfig(out=tmp_path / "d", scenes=1, frames=16, height=128, width=192, objects=3, seed=2))
    scenes = {}
    for on in (True, False):
        out = tmp_path / f"c{int(on)}"
        cfg = make_cfg(tmp_path / "d", out, height=128, width=192, device="cuda", operator=True, operator_stream=on,
                       pairs_per_scene=6, batch_pairs=2)
        s = run(cfg, progress=False)
        assert s.failed == 0 and s.pairs == 6
        assert (s.operator_stream, s.operator_priority) == (on, on)  # as run (priority on by default)
        r = CacheReader(out)
        scenes[on] = r.scene(r.scenes[0])
    names = {"op_cols", "op_vals", "op_inst", "op_inst_ids", "op_inst_w", "op_valid", "tgt_index"}
    for p in range(6):
        x, y = scenes[True].read_stored(p, names), scenes[False].read_stored(p, names)
        for k in ("tgt_index", "op_inst_ids", "op_valid"):
            assert np.array_equal(x[k], y[k]), (p, k)
        T, P, R = x["op_cols"].shape
        J = x["op_inst"].shape[-1]
        dense = []
        for z in (x, y):
            m = np.zeros((T, P, J))
            np.add.at(m, (np.arange(T)[:, None, None], np.arange(P)[None, :, None], z["op_cols"].astype(np.int64)),
                      z["op_vals"].astype(np.float64))
            dense.append(m)
        assert np.abs(dense[0] - dense[1]).max() <= 1e-3 * np.abs(dense[1]).max(), p
        for k in ("op_inst_w", "op_inst"):
            d = np.abs(x[k].astype(np.float32) - y[k].astype(np.float32))
            assert d.max() <= 1e-3 * max(np.abs(y[k]).max(), 1e-3), (p, k, d.max())
